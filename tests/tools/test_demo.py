"""The demo pipeline at --tiny size: label noise on digits, its table (accuracy, memorization, final lambda_max),
PNG, report and results."""

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
    assert demo.main(["--tiny", "--output_dir", str(tmp_path), "--methods", "sgd,sam,sampa"]) == 0
    out = capsys.readouterr().out
    header = ("| method | processes | test accuracy | memorized | final λ_max | time per step (ms) | "
              "speed-up vs SAM |")
    assert header in out
    data = json.loads((tmp_path / "results.json").read_text())
    results = data["results"]
    for label, r in zip(("SGD", "SAM", "SAMPa-0.2"), results):
        [row] = [line for line in out.splitlines() if line.startswith(f"| {label} | 1 |")]
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2:5] == [f"{r['test_accuracy']:.3f}", f"{r['memorized']:.3f}", f"{r['lambda_max']:.1f}"]

    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "| SAM | 1 |" in report and "1.00x" in report and "curves.png" in report
    assert "final λ_max |" in report and "fixed sample of 16 training examples" in report
    assert "40% of the 256 training labels (102)" in report
    assert [r["method"] for r in results] == ["sgd", "sam", "sampa"]
    # the optimizers of SAMPa's §5.4: SGD with momentum as the base, rho = 0.1 for SAM and SAMPa-0.2 alike
    assert [(r["optim"], r["optim_args"]) for r in results] == [
        ("sgd", "momentum=0.9"), ("sam", "rho=0.1,base=sgd,momentum=0.9"),
        ("sampa", "rho=0.1,lam=0.2,base=sgd,momentum=0.9")]
    for r in results:
        assert r["steps"] == 2 * 256 // 32  # 2 epochs of 256 examples in batches of 32
        assert r["corrupted"] == round(256 * 0.4) and r["train_examples"] == 256
        # test accuracy and memorization after each epoch, the last one the final model's
        assert [c[0] for c in r["curve"]] == [1.0, 2.0]
        assert r["curve"][-1][1:] == [r["test_accuracy"], r["memorized"]]
        assert r["sec_per_step"] > 0 and 0 <= r["test_accuracy"] <= 1 and 0 <= r["memorized"] <= 1
        assert math.isfinite(r["lambda_max"]) and r["lambda_max"] > 0 and r["sharpness_seconds"] > 0
    assert len({r["lambda_max"] for r in results}) == 3  # same sample, different training


def test_epoch_figures_change_nothing_in_training(tmp_path, monkeypatch):
    """The demo's per-epoch evaluation (eval mode, no gradients) leaves training as it was: the same losses,
    final accuracy and final lambda_max with and without it."""
    measured = demo.train_one("sam", demo.parse_args(["--tiny"]), tmp_path)
    monkeypatch.setattr(demo, "TINY", demo.replace(demo.TINY, curves=False))
    plain = demo.train_one("sam", demo.parse_args(["--tiny"]), tmp_path)
    assert plain["curve"] == [] and len(measured["curve"]) == 2
    assert measured["loss_curve"] == plain["loss_curve"]
    assert measured["test_accuracy"] == plain["test_accuracy"]
    assert measured["lambda_max"] == plain["lambda_max"]


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
    assert [c[0] for c in one["curve"]] == [c[0] for c in two["curve"]] == [1.0, 2.0]
    # the lambda_max sample is sharded over the 2 processes and the products all-reduced: the same figure
    assert one["lambda_max"] == pytest.approx(two["lambda_max"], rel=1e-3)


def test_the_plot_shows_every_run(tmp_path):
    """2-process SAMPa equals 1-process SAMPa up to round-off: its curves are dashed with hollow markers on top,
    and the legend says they are the same, so neither hides the other."""
    curve = {"loss_curve": [(1, 2.0), (2, 1.5), (3, 1.2)], "curve": [(1.0, 0.60, 0.30), (2.0, 0.70, 0.20)]}
    results = [{"label": "SAM", "processes": 1, "loss_curve": [(1, 2.0), (2, 1.4), (3, 1.0)],
                "curve": [(1.0, 0.62, 0.28), (2.0, 0.72, 0.18)], "lambda_max": 30.0},
               {"label": "SAMPa-0.2", "processes": 1, **curve, "lambda_max": 40.0},
               {"label": "SAMPa-0.2, 2 processes", "processes": 2,
                "loss_curve": [(s, v * (1 + 1e-6)) for s, v in curve["loss_curve"]], "curve": curve["curve"],
                "lambda_max": 40.0}]
    sam, one, two = demo.curve_styles(results)
    assert sam["label"] == "SAM" and one["label"] == "SAMPa-0.2"
    assert two["label"] == "SAMPa-0.2, 2 processes (same curves as SAMPa-0.2)"
    assert (two["linestyle"], two["markerfacecolor"]) != (one["linestyle"], one["markerfacecolor"])
    assert two["zorder"] > one["zorder"]  # drawn over the solid line, which stays visible through it
    # a different per-epoch figure (memorized) is a different run, even with the same losses
    other = {**results[2], "curve": [(1.0, 0.60, 0.30), (2.0, 0.70, 0.25)]}
    assert demo.curve_styles(results[:2] + [other])[2]["label"] == "SAMPa-0.2, 2 processes"
    demo.plot(results, tmp_path / "curves.png", demo.TINY)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
