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
