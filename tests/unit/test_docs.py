"""The user docs that are generated or indexed from the code stay current."""

from pathlib import Path

import sam_hf
from sam_hf import registry
from sam_hf.config import options_reference

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_options_reference_is_current():
    """docs/options.md is `sam-hf options` (options_reference()): regenerate it after changing an option."""
    assert (DOCS / "options.md").read_text() == options_reference() + "\n", (
        "docs/options.md is stale: python -c \"import sam_hf; from sam_hf.config import options_reference; "
        "open('docs/options.md', 'w').write(options_reference() + '\\n')\"")


def test_every_registered_method_has_a_method_card():
    missing = [s.name for s in registry.specs() if not (DOCS / "methods" / f"{s.name}.md").exists()]
    assert not missing, f"no docs/methods/<name>.md for {missing}"
    assert sam_hf.METHODS == registry.names()


def _github_anchor(heading: str) -> str:
    """GitHub's id for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(path: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            anchors.add(_github_anchor(line.lstrip("#")))
    return anchors


def test_every_relative_link_in_the_docs_resolves():
    """Each relative link of the README and the markdown docs and results names a file that exists and, where it
    names a heading (`file.md#heading`), a heading of that file."""
    import re

    root = DOCS.parent
    pages = [root / "README.md", *DOCS.rglob("*.md"), *(root / "benchmarks").rglob("*.md"),
             *(root / "studies").rglob("*.md"), *(root / "glue_scripts").rglob("*.md")]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:", link):  # http(s):, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(root)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _headings(target):
                broken.append(f"{page.relative_to(root)}: {link} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
