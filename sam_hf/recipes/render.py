"""`sam-hf train RECIPE --print`: the resolved recipe as YAML, with the recipe files' comments kept.

The shipped recipes cite the papers in YAML comments: a header per file, and a comment beside (or above) each
key saying where its value comes from. `yaml.safe_dump` drops comments, so they are read back from the files
(the recipe and the ones it `extends`, the nearer file winning) and put beside the same keys of the resolved
recipe. A key whose value an override changed says so, with the recipe's own value next to its citation.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .schema import Recipe, load_yaml, resolve

_KEY = re.compile(r"^( *)([A-Za-z_][\w.]*):(?:\s|$)")


def _split_comment(line: str) -> tuple[str, str | None]:
    """(the YAML before the comment, the comment text without '#') of one line; quotes are respected."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), None


def file_comments(path: Path) -> tuple[list[str], dict]:
    """The file's header (its leading comment lines) and, per key path (`(section,)` or `(section, key)`), the
    comment lines above the key and the comment beside it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    while lines and lines[0].lstrip().startswith("#"):
        header.append(lines.pop(0).strip())
    keyed, above, section, child_indent = {}, [], None, None
    for line in lines:
        body, comment = _split_comment(line)
        if not body.strip():
            above = above + [comment] if comment is not None else []
            continue
        match = _KEY.match(body)
        indent = len(body) - len(body.lstrip())
        if match and indent == 0:
            section, child_indent, key = match.group(2), None, (match.group(2),)
        elif match and section is not None and (child_indent is None or indent == child_indent):
            child_indent, key = indent, (section, match.group(2))
        else:  # inside a value (a nested mapping, a list item)
            above = []
            continue
        keyed[key] = {"above": above, "inline": comment}
        above = []
    return header, keyed


def _chain(path: Path) -> list[Path]:
    """The recipe file and the files it extends, nearest first."""
    out = [path]
    parent = (load_yaml(path.read_text(encoding="utf-8")) or {}).get("extends")
    while parent is not None and len(out) < 20:
        out.append(resolve(str(parent), relative_to=out[-1].parent))
        parent = (load_yaml(out[-1].read_text(encoding="utf-8")) or {}).get("extends")
    return out


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip().removesuffix("...").strip()


def render(recipe: Recipe, path: Path, as_written: Recipe | None = None) -> str:
    """`recipe` as YAML with the comments of `path` and the files it extends; `as_written` is the recipe
    without overrides (a key whose value differs from it is marked as overridden)."""
    chain = _chain(path)
    headers, keyed = [], {}
    for file in reversed(chain):  # the nearer file's comment replaces its parent's for the same key
        header, comments = file_comments(file)
        if header:
            headers.append((file, header))
        for key, c in comments.items():
            if c["inline"] is not None or c["above"] or key not in keyed:
                keyed[key] = c
    data = recipe.to_dict()
    original = as_written.to_dict() if as_written is not None else data
    out = []
    for file, header in reversed(headers):
        if len(headers) > 1:
            out.append(f"# --- {file.name}")
        out += header
    section = None
    for line in yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110).splitlines():
        match = _KEY.match(line)
        if not match or len(match.group(1)) > 2:
            out.append(line)
            continue
        indent, name = match.groups()
        key = (name,) if not indent else (section, name)
        section = name if not indent else section
        c = keyed.get(key, {"above": [], "inline": None})
        out += [f"{indent}# {text}" if text else f"{indent}#" for text in c["above"]]
        now = data.get(key[0]) if len(key) == 1 else (data.get(key[0]) or {}).get(key[1])
        was = original.get(key[0]) if len(key) == 1 else (original.get(key[0]) or {}).get(key[1])
        note = c["inline"]
        if now != was and not (isinstance(now, dict) and isinstance(was, dict) and len(key) == 1):
            note = f"overridden; the recipe has {_flow(was)}" + (f" ({note})" if note else "")
        out.append(f"{line}  # {note}" if note else line)
    return "\n".join(out) + "\n"
