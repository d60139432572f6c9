"""Run an unmodified Hugging Face training script with the sam_hf optimizer names.

    sam-hf launch run_glue.py --optim sampa --optim_args "rho=0.05,lam=0.2" ...
    python -m sam_hf.launch run_glue.py ...
    torchrun --nproc_per_node 2 -m sam_hf.launch run_glue.py ...
    accelerate launch --num_processes 2 -m sam_hf.launch run_glue.py ...
    sam-hf launch -m some.package.module ...

`import sam_hf` registers `sam`, `msam`, `sampa`, `asyncsam` as `--optim`
choices and makes whatever Trainer the script builds run them; the script
then runs as `__main__` with its own `sys.argv`, as if started directly.
With `--optim asyncsam --optim_args "ascent_device=cpu"` on 2 processes, rank 1
is put on the CPU first (placement.py).
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: sam-hf launch SCRIPT.py [ARGS...]  |  sam-hf launch -m MODULE [ARGS...]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    import sam_hf  # noqa: F401  (registers the names and patches Trainer)
    from .config import SharpnessConfigError
    from .placement import place_from_argv

    as_module = argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if as_module and len(argv) > 1 else (argv[0], argv[1:])
    if as_module and len(argv) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    if not as_module and not os.path.isfile(target):
        print(f"sam-hf launch: no such script: {target}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        args = place_from_argv(args)  # ascent_device=cpu: rank 1 on the CPU, before the script builds its arguments
    except SharpnessConfigError as err:
        print(f"sam-hf launch: {err}", file=sys.stderr)
        return 2
    sys.argv = [target, *args]
    if as_module:
        cwd = os.getcwd()  # as `python -m` does; a console script (`sam-hf`) starts without it on sys.path
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python script.py` does
        runpy.run_path(target, run_name="__main__")
    return 0

if __name__ == "__main__":
    sys.exit(main())
