"""The demo pipeline at --tiny size writes its table (with the final lambda_max), loss and sharpness PNG,
report and results."""

from __future__ import annotations

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from sam_hf import demo  # noqa: E402


def test_tiny_demo_writes_table_plot_and_report(tmp_path, capsys):
    assert demo.main(["--tiny", "--output_dir", str(tmp_path), "--methods", "adamw,sam,sampa"]) == 0
    out = capsys.readouterr().out
    header = "| method | processes | eval accuracy | time per step (ms) | speed-up vs SAM | final λ_max |"
    assert header in out
    data = json.loads((tmp_path / "results.json").read_text())
    results = data["results"]
    for label, r in zip(("AdamW", "SAM", "SAMPa-0.2"), results):
        [row] = [line for line in out.splitlines() if line.startswith(f"| {label} | 1 |")]
        assert row.split("|")[-2].strip() == f"{r['lambda_max']:.1f}"  # the final lambda_max column

    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "| SAM | 1 |" in report and "1.00x" in report and "curves.png" in report
    assert "final λ_max |" in report and "SharpnessCallback(every=3, samples=16)" in report
    assert [r["method"] for r in results] == ["adamw", "sam", "sampa"]
    assert data["sharpness_samples"] == demo.TINY.sharpness_samples
    assert data["sharpness_every"] == demo.TINY.sharpness_every
    for r in results:
        assert r["steps"] == demo.TINY.max_steps
        assert len(r["loss_curve"]) == demo.TINY.max_steps  # logged every step at --tiny
        assert r["sec_per_step"] > 0 and 0 <= r["eval_accuracy"] <= 1
        # measured every 3 steps: at 3 and 6, the last one on the final model
        assert [s for s, _ in r["sharpness_curve"]] == [3, 6]
        assert all(math.isfinite(v) and v > 0 for _, v in r["sharpness_curve"])
        assert r["lambda_max"] == r["sharpness_curve"][-1][1]
        assert r["sharpness_seconds"] > 0
    assert len({r["lambda_max"] for r in results}) == 3  # same sample, different training


def test_measuring_changes_nothing_in_training(tmp_path, monkeypatch):
    """The demo's SharpnessCallback leaves training as it was: the same losses with and without it."""
    measured = demo.train_one("sam", demo.parse_args(["--tiny"]), tmp_path)
    monkeypatch.setattr(demo, "TINY", demo.replace(demo.TINY, sharpness_every=0))  # 0: no callback
    plain = demo.train_one("sam", demo.parse_args(["--tiny"]), tmp_path)
    assert plain["sharpness_curve"] == [] and math.isnan(plain["lambda_max"])
    assert measured["loss_curve"] == plain["loss_curve"]
    assert measured["eval_accuracy"] == plain["eval_accuracy"]


def test_two_process_row_is_skipped_with_a_reason(tmp_path, capsys, monkeypatch):
    """Without 2 cores the 2-process row is left out and the report says why; the rest still runs."""
    monkeypatch.setattr(demo, "cpu_cores", lambda: 1)
    assert demo.main(["--tiny", "--output_dir", str(tmp_path), "--methods", "sam,sampa-2proc"]) == 0
    assert "skipped, needs 2 CPU cores" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "SAMPa-0.2, 2 processes: needs 2 CPU cores" in report
    assert json.loads((tmp_path / "results.json").read_text())["skipped"].keys() == {"sampa-2proc"}


def test_unknown_method_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--tiny", "--output_dir", str(tmp_path), "--methods", "adamw,sgdd"])


@pytest.mark.skipif(demo.cpu_cores() < 2, reason="launches torchrun (~20 s): needs a machine with 2+ cores")
def test_two_process_sampa_row_matches_one_process(tmp_path):
    """The torchrun row runs and, as DESIGN.md requires, gives the 1-process losses up to round-off."""
    assert demo.main(["--tiny", "--output_dir", str(tmp_path), "--methods", "sampa,sampa-2proc"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["skipped"] == {}
    one, two = data["results"]
    assert two["processes"] == 2 and two["steps"] == one["steps"]
    assert [s for s, _ in one["loss_curve"]] == [s for s, _ in two["loss_curve"]]
    for (_, a), (_, b) in zip(one["loss_curve"], two["loss_curve"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    # the sample is sharded over the 2 processes and the products all-reduced: the same figures as on one
    assert [s for s, _ in one["sharpness_curve"]] == [s for s, _ in two["sharpness_curve"]] == [3, 6]
    for (_, a), (_, b) in zip(one["sharpness_curve"], two["sharpness_curve"]):
        assert a == pytest.approx(b, rel=1e-3)


def test_the_plot_shows_every_run(tmp_path):
    """2-process SAMPa equals 1-process SAMPa up to round-off: its curves are dashed with hollow markers on top,
    and the legend says they are the same, so neither hides the other."""
    curve = {"loss_curve": [(1, 2.0), (2, 1.5), (3, 1.2)], "sharpness_curve": [(3, 40.0)]}
    results = [{"label": "SAM", "processes": 1, "loss_curve": [(1, 2.0), (2, 1.4), (3, 1.0)],
                "sharpness_curve": [(3, 30.0)]},
               {"label": "SAMPa-0.2", "processes": 1, **curve},
               {"label": "SAMPa-0.2, 2 processes", "processes": 2,
                "loss_curve": [(s, v * (1 + 1e-6)) for s, v in curve["loss_curve"]],
                "sharpness_curve": curve["sharpness_curve"]}]
    sam, one, two = demo.curve_styles(results)
    assert sam["label"] == "SAM" and one["label"] == "SAMPa-0.2"
    assert two["label"] == "SAMPa-0.2, 2 processes (same curves as SAMPa-0.2)"
    assert (two["linestyle"], two["markerfacecolor"]) != (one["linestyle"], one["markerfacecolor"])
    assert two["zorder"] > one["zorder"]  # drawn over the solid line, which stays visible through it
    demo.plot(results, tmp_path / "curves.png", samples=16)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
