"""`sam-hf` command line: launch, train, demo, bench, sharpness.

Each sub-command lives in its own module and is imported only when used, so
`sam-hf launch` starts as fast as the script it runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "launch": ("sam_hf.launch", "run an unmodified Hugging Face training script with the sam_hf optimizer names"),
    "train": ("sam_hf.recipes", "run a YAML recipe: sam-hf train RECIPE [--section.key value ...]"),
    "demo": ("sam_hf.demo", "offline demo: 40% label noise on scikit-learn's digits, SGD against SAM, SAMPa and more"),
    "bench": ("sam_hf.bench", "step-time and memory benchmark of every method, 1 and 2 processes"),
    "sharpness": ("sam_hf.sharpness", "Hessian lambda_max and trace of a saved text classifier on its training data"),
    "options": ("sam_hf.config", "every method's options, with defaults and help (docs/options.md)"),
}


def version() -> str:
    """sam_hf's version, with the torch and transformers it runs on (from the installed metadata: no import)."""
    from importlib import metadata

    def of(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    ours = of("sam_hf")
    if ours is None:  # run from a checkout that is not installed
        from sam_hf import __version__ as ours
    return f"sam-hf {ours} (torch {of('torch') or 'not installed'}, transformers {of('transformers') or 'not installed'})"


def _usage() -> str:
    lines = ["usage: sam-hf COMMAND [ARGS...]  |  sam-hf --version", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sam-hf: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
