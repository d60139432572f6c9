"""The variants study's 2-process rows, launched for real: torchrun starts its workers in studies.variants, so
rows that exist only there (not in sam_hf.label_noise) train, and role mode gives the 1-process run."""

from __future__ import annotations

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
    DESIGN.md: with the default flags 2-process Asynchronous SAM equals 1 process (r = 1: the stale ascent on
    the same whole batch), up to float round-off."""
    run = replace(TINY, curves=False, sharpness_samples=0)
    two = variants.train_row("asyncsam_2proc", replace(run, method="asyncsam_2proc"), tmp_path / "two")
    one = train_digits(replace(run, method="asyncsam"), tmp_path / "one")
    assert two["processes"] == 2 and "parallel=on" in two["optim_args"].split(",") and two["steps"] == one["steps"]
    assert [s for s, _ in one["loss_curve"]] == [s for s, _ in two["loss_curve"]]
    for (_, a), (_, b) in zip(one["loss_curve"], two["loss_curve"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert one["test_accuracy"] == two["test_accuracy"]
