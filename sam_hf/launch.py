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
is put on the CPU first (distributed/placement.py).

The launcher's own options come before the script:

    sam-hf launch --sharpness_every 50 [--sharpness_samples 256] run_glue.py ...

adds a `SharpnessCallback` (sharpness.py) to every Trainer the script builds,
whatever its optimizer (AdamW runs too): `sharpness/lambda_max` is logged
every N optimizer steps and at the end of training.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = """\
usage: sam-hf launch [LAUNCHER OPTIONS] SCRIPT.py [ARGS...]  |  sam-hf launch [LAUNCHER OPTIONS] -m MODULE [ARGS...]

launcher options (before the script; they add sam_hf.SharpnessCallback to every Trainer, any optimizer):
  --sharpness_every N          log sharpness/lambda_max of the training loss every N optimizer steps
  --sharpness_samples S        fixed sample of S training examples (default 256)
  --sharpness_top_k K          also sharpness/lambda_2 .. lambda_K (default 1)
  --sharpness_trace_samples T  also sharpness/trace, Hutchinson with T probes (default 0: none)
  cost per measurement: about 2 x (Lanczos iterations, typically 20-60) forward-backward passes over S"""

# launcher option -> SharpnessCallback keyword
SHARPNESS_OPTIONS = {"--sharpness_every": "every", "--sharpness_samples": "samples",
                     "--sharpness_top_k": "top_k", "--sharpness_trace_samples": "trace_samples"}


def split_launcher_options(argv: list[str]) -> tuple[dict, list[str]]:
    """The leading `--sharpness_*` options as SharpnessCallback keywords (empty if none), and the rest."""
    options, rest = {}, list(argv)
    while rest and rest[0].startswith("--sharpness"):
        flag, _, value = rest.pop(0).partition("=")
        if flag not in SHARPNESS_OPTIONS:
            raise ValueError(f"unknown launcher option {flag}; known: {', '.join(SHARPNESS_OPTIONS)}")
        if not value:
            if not rest:
                raise ValueError(f"{flag} needs a value")
            value = rest.pop(0)
        try:
            options[SHARPNESS_OPTIONS[flag]] = int(value)
        except ValueError:
            raise ValueError(f"{flag} {value}: expected an integer") from None
    if options and "every" not in options:
        raise ValueError("--sharpness_samples/_top_k/_trace_samples need --sharpness_every N")
    return options, rest


def misplaced_launcher_options(script_args: list[str]) -> list[str]:
    """The launcher's own options among the script's arguments (`run_glue.py ... --sharpness_every 10`), which
    transformers would report as unused arguments of the script."""
    found = []
    for arg in script_args:
        flag = arg.partition("=")[0]
        flag = "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag
        if flag in SHARPNESS_OPTIONS and flag not in found:
            found.append(flag)
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    import sam_hf  # noqa: F401  (registers the names and patches Trainer)
    from .trainer import integration
    from .config import SharpnessConfigError
    from .distributed.placement import place_from_argv
    from .sharpness import SharpnessCallback

    try:
        sharpness, argv = split_launcher_options(argv)
        if sharpness:
            SharpnessCallback(**sharpness)  # bad values fail here, before the script starts
    except ValueError as err:
        print(f"sam-hf launch: {err}\n{USAGE}", file=sys.stderr)
        return 2
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2

    as_module = argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if as_module and len(argv) > 1 else (argv[0], argv[1:])
    if as_module and len(argv) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    misplaced = misplaced_launcher_options(args)
    if misplaced:
        print(f"sam-hf launch: {', '.join(misplaced)} after the script would reach the script, not the launcher: "
              f"launcher options go before the script (sam-hf launch {misplaced[0]} N {' '.join(argv[:2 if as_module else 1])} "
              "...)", file=sys.stderr)
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
    integration.sharpness_callback_options = sharpness or None
    try:
        if as_module:
            cwd = os.getcwd()  # as `python -m` does; a console script (`sam-hf`) starts without it on sys.path
            if cwd not in sys.path and "" not in sys.path:
                sys.path.insert(0, cwd)
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python script.py` does
            runpy.run_path(target, run_name="__main__")
    finally:
        integration.sharpness_callback_options = None  # for the Trainers of this script only
    return 0

if __name__ == "__main__":
    sys.exit(main())
