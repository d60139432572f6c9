"""The variants study's 2-process rows, launched for real: torchrun starts its workers in studies.variants, so
rows that exist only there (not in sam_hf.label_noise) train, and role mode gives the 1-process run."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("sklearn")

from sam_hf.distributed.placement import cpu_cores  # noqa: E402
from sam_hf.label_noise import train_digits  # noqa: E402
from sam_hf.demo import TINY  # noqa: E402
from studies import variants  # noqa: E402


@pytest.mark.skipif(cpu_cores() < 2, reason="launches torchrun (~20 s): needs a machine with 2+ cores")
def test_asynchronous_sam_row_on_two_processes_equals_one_process(tmp_path):
    """asyncsam_2proc is not a label_noise method: it trains only if the workers register the study's rows.
    DESIGN.md: with the default flags 2-process Asynchronous SAM equals 1 process. Here exactly: at r = 1 each
    role runs the 1-process pass's kernels on the same batch in the same order (one thread each), and the
    gradients cross as fp32 copies (gloo), so no sum is reordered and the losses and per-epoch figures agree
    bit for bit (the study's 240-step runs do too)."""
    run = replace(TINY, sharpness_samples=0)
    two = variants.train_row("asyncsam_2proc", replace(run, method="asyncsam_2proc"), tmp_path / "two")
    one = train_digits(replace(run, method="asyncsam"), tmp_path / "one")
    assert two["processes"] == 2 and "parallel=on" in two["optim_args"].split(",") and two["steps"] == one["steps"]
    as_json = json.loads(json.dumps(one))  # two crossed JSON: tuples came back as lists
    assert two["loss_curve"] == as_json["loss_curve"] and len(one["loss_curve"]) >= 1
    assert two["curve"] == as_json["curve"] and [c[0] for c in one["curve"]] == [1.0, 2.0]
    assert (two["test_accuracy"], two["train_fit"]) == (one["test_accuracy"], one["train_fit"])
