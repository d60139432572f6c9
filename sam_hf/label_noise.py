"""Label noise (the SAMPa paper's §5.4) and the offline task that shows its effect: a small CNN on digits.

Label noise. Of the n training labels, exactly k = round(n * rate) (Python's
round), chosen uniformly without replacement, are replaced by a class drawn
uniformly from the C - 1 *other* classes: y' = (y + s) mod C with s uniform on
{1, ..., C - 1}, so y' is never y and each other class has probability
1 / (C - 1). The test labels are never touched. Everything is drawn from
`numpy.random.default_rng(seed)`: a seed gives the same corrupted set on any
machine. (SAMPa §5.4, following Foret et al. 2021: "a fraction of the labels in
the training set are corrupted to another label sampled uniformly at random".)

The task. scikit-learn's 8x8 handwritten digits (1,797 images, shipped with
scikit-learn, offline), one fixed 80/20 split (1,437 train, 360 test), the
training labels corrupted as above, and a small CNN with BatchNorm trained from
scratch with Hugging Face Trainer: the closest a CPU gets in minutes to the
paper's ResNet-32 on CIFAR-10 (about 11 parameters per training example, as
ResNet-32's 0.46M on CIFAR-10's 45k). Settings follow SAMPa §5.1, which §5.4
keeps ("Other experimental setup is the same as in Section 5.1"): SGD with
momentum 0.9 as the base optimizer of every method, weight decay 5e-4, batch
128, cosine schedule from 0.1, label smoothing 0.1; rho = 0.1, or 0.01 at 80%
noise (§5.4). What differs: a fixed number of epochs for every method (the
paper gives SGD twice SAM's epochs), no augmentation (no flips for digits),
and the final model is reported (the paper selects on a validation split).

`sam-hf demo` runs one noise rate with a few methods; `studies/vision_noise.py`
in the repository runs the whole grid of SAMPa Table 7 with this code. A run on
several processes (role mode, DDP) goes through `train_digits_torchrun`, whose
workers start in `python -m sam_hf.label_noise` (or a study's own module).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- label noise


def corrupt_labels(labels, num_classes: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, changed mask): round(n * rate) labels replaced by a uniformly drawn other class."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"corrupt_labels: labels must be a 1-d array of class ids, got shape {labels.shape} "
                         f"dtype {labels.dtype}")
    if num_classes < 2:
        raise ValueError(f"corrupt_labels: num_classes={num_classes}; label noise needs at least 2 classes")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"corrupt_labels: labels must lie in [0, {num_classes}), found {labels.min()}.."
                         f"{labels.max()}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"corrupt_labels: rate={rate!r}; use a fraction in [0, 1] (0.4 for 40% noise)")
    n = len(labels)
    k = round(n * rate)
    rng = np.random.default_rng(seed)
    changed = np.zeros(n, dtype=bool)
    changed[rng.permutation(n)[:k]] = True
    noisy = labels.copy()
    noisy[changed] = (labels[changed] + rng.integers(1, num_classes, size=k)) % num_classes
    return noisy, changed


# ---------------------------------------------------------------- the methods

# The paper's base optimizer (SAMPa §5.1): SGD with momentum 0.9; the sharpness-aware methods run around it.
BASE = "base=sgd,momentum=0.9"

# name -> (label, optim, optim_args without rho and the base). SAMPa-0.2 takes SAM's rho here: §5.4 sets
# "rho = 0.1 for SAM, SAMPa-0 and SAMPa-0.2" (it is §5.1 and §5.5 that double it for SAMPa-0.2).
# mSAM: micro-batches of 32 (SAMPa Appendix B.4), 4 in a batch of 128; Asynchronous SAM: the ascent on the
# whole batch (r = 1: one process stands for two equal devices), both with SAM's rho (mSAM §4).
METHODS = {
    "sgd": ("SGD", "sgd", ""),
    "sam": ("SAM", "sam", ""),
    "sampa0": ("SAMPa-0", "sampa", "lam=0"),
    "sampa": ("SAMPa-0.2", "sampa", "lam=0.2"),
    "msam": ("mSAM (m=4)", "msam", "micro_batches=4"),
    "asyncsam": ("Asynchronous SAM", "asyncsam", "ascent_batch_ratio=1"),
    # not the paper's label-noise setting: SAMPa-0.2 with twice SAM's rho, as §5.1 configures it on clean data
    "sampa2rho": ("SAMPa-0.2, 2ρ", "sampa", "lam=0.2"),
}
RHO_FACTOR = {"sampa2rho": 2.0}
# methods with no ascent step, hence no rho (SAF and MESA add a trajectory loss instead)
NO_ASCENT = ("saf", "mesa")


def rho_for(noise: float, method: str = "sam") -> float:
    """SAMPa §5.4: rho = 0.1, "except for adjusting rho = 0.01 when the noise rate is 80%" (times RHO_FACTOR)."""
    return (0.01 if math.isclose(noise, 0.8) else 0.1) * RHO_FACTOR.get(method, 1.0)


def method_optim(method: str, noise: float, extra: str = "") -> tuple[str, str, str]:
    """(label, optim, optim_args) of a method at a noise rate; `extra` is appended (e.g. parallel=on)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    label, optim, own = METHODS[method]
    if optim == "sgd":
        parts = ["momentum=0.9"]
    elif optim in NO_ASCENT:
        parts = [own, BASE]
    else:
        parts = [f"rho={rho_for(noise, method):g}", own, BASE]
    return label, optim, ",".join(p for p in [*parts, extra] if p)


# ---------------------------------------------------------------- data and model


class DigitsDataset:
    """8x8 images in [-1, 1] and labels, as Trainer feeds a vision model: {"pixel_values", "labels"}; with
    `id_column` set, also the example's index under that key (SAF's per-example memory reads it)."""

    def __init__(self, x, y, id_column: str | None = None):
        self.x, self.y, self.id_column = x, y, id_column

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        item = {"pixel_values": self.x[i], "labels": self.y[i]}
        if self.id_column:
            item[self.id_column] = i
        return item


@dataclass
class NoisyDigits:
    train: DigitsDataset  # noisy labels
    test: DigitsDataset  # clean labels
    true_train_labels: np.ndarray
    changed: np.ndarray  # which training labels were corrupted


def digits_splits(noise: float, seed: int, tiny: bool = False) -> NoisyDigits:
    """The fixed 80/20 split of scikit-learn's digits (the same for every seed), with `noise` of the training
    labels corrupted by `corrupt_labels(..., seed)`; the test labels stay clean. `tiny`: 256 train, 64 test."""
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # pixels are 0..16
    y = np.asarray(data.target, dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    if tiny:
        train, test = train[:256], test[:64]
    noisy, changed = corrupt_labels(y[train], 10, noise, seed)
    return NoisyDigits(train=DigitsDataset(x[train], torch.from_numpy(noisy)),
                       test=DigitsDataset(x[test], torch.from_numpy(y[test].copy())),
                       true_train_labels=y[train].copy(), changed=changed)


def small_cnn(width: int = 16, label_smoothing: float = 0.1, num_classes: int = 10):
    """Four 3x3 convolutions with BatchNorm and ReLU (width, width, pool, 2 width, 2 width), global average
    pooling and a linear head; its loss is cross-entropy with label smoothing (SAMPa §5.1: 0.1)."""
    import torch.nn.functional as F
    from torch import nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2),
                                          *block(width, 2 * width), *block(2 * width, 2 * width),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, pixel_values, labels=None):
            logits = self.head(self.features(pixel_values))
            if labels is None:
                return {"logits": logits}
            return {"loss": F.cross_entropy(logits, labels, label_smoothing=label_smoothing), "logits": logits}

    return SmallCNN()


# ---------------------------------------------------------------- one run


@dataclass
class DigitsRun:
    method: str = "sgd"
    noise: float = 0.4
    seed: int = 1
    epochs: float = 20
    batch: int = 128
    learning_rate: float = 0.1
    weight_decay: float = 5e-4
    width: int = 16
    label_smoothing: float = 0.1
    sharpness_samples: int = 256  # lambda_max of the final model on this many training examples (0: none)
    extra_optim_args: str = ""  # e.g. parallel=on for the 2-process SAMPa row
    curves: bool = True  # test accuracy and memorization after every epoch (changes nothing in training)
    tiny: bool = False  # 256 training examples, for tests


def predictions(model, dataset: DigitsDataset, batch: int = 512) -> np.ndarray:
    """The model's classes for a dataset, in eval mode (BatchNorm on its running statistics); the model's
    train/eval flag is restored, nothing else is touched (no gradients, no random numbers)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = [model(pixel_values=dataset.x[i:i + batch])["logits"].argmax(-1)
                   for i in range(0, len(dataset), batch)]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def fit_figures(model, data: NoisyDigits) -> dict:
    """Test accuracy (clean labels), the fit of the noisy training labels, and `memorized`: the share of the
    corrupted training examples predicted as their corrupted label (nan without noise)."""
    test = predictions(model, data.test)
    train = predictions(model, data.train)
    noisy = data.train.y.numpy()
    return {"test_accuracy": float((test == data.test.y.numpy()).mean()),
            "train_fit": float((train == noisy).mean()),
            "memorized": float((train[data.changed] == noisy[data.changed]).mean()) if data.changed.any() else math.nan}


def sharpness_batches(data: NoisyDigits, samples: int, batch: int, rank: int = 0, world: int = 1) -> list:
    """A fixed sample of the (noisy) training set, the same indices for every method and seed (a seed-0
    permutation), in batches; on several processes this rank's share."""
    n = min(samples, len(data.train))
    chosen = np.sort(np.random.default_rng(0).permutation(len(data.train))[:n])[rank::world]
    return [{"pixel_values": data.train.x[idx], "labels": data.train.y[idx]}
            for idx in (chosen[i:i + batch] for i in range(0, len(chosen), batch))]


def train_digits(run: DigitsRun, output_dir: Path, distributed: bool = False) -> dict | None:
    """Train one method on the noisy digits in this process (or in each of torchrun's); rank 0 returns the
    result: accuracies, lambda_max of the final model, time per step, and the curves per epoch."""
    import torch
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

    import sam_hf
    from sam_hf.sharpness import measure_sharpness
    from sam_hf.timing import step_timer

    # One thread per process, so a process stands for one device (and a busy machine is not oversubscribed).
    torch.set_num_threads(1)
    label, optim, optim_args = method_optim(run.method, run.noise, run.extra_optim_args)
    data = digits_splits(run.noise, run.seed, run.tiny)
    if sam_hf.registry.is_method(optim):  # a method with a per-example memory (SAF) reads the example's index
        data.train.id_column = sam_hf.registry.get(optim).method.example_id_column(
            sam_hf.SharpnessConfig.from_optim_args(optim, optim_args or None))
    set_seed(run.seed)
    model = small_cnn(run.width, run.label_smoothing)  # the same seed: every method starts from the same weights

    curve = []

    class EpochFigures(TrainerCallback):
        """Test accuracy and memorization after each epoch (eval mode, no gradients: training is unchanged)."""

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            figures = fit_figures(model, data)
            curve.append([round(state.epoch, 3), figures["test_accuracy"], figures["memorized"]])

    timer = step_timer()
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=run.epochs, per_device_train_batch_size=run.batch,
        learning_rate=run.learning_rate, lr_scheduler_type="cosine", weight_decay=run.weight_decay,
        max_grad_norm=0.0,  # SAMPa §5.1 clips nothing
        optim=optim, optim_args=optim_args or None, seed=run.seed, logging_steps=10, eval_strategy="no",
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, use_cpu=True, ddp_backend="gloo" if distributed else None)
    trainer = sam_hf.SharpnessTrainer(model=model, args=args, train_dataset=data.train,
                                      callbacks=[timer] + ([EpochFigures()] if run.curves else []))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model = trainer.model
    final = fit_figures(model, data)
    sharp = {"lambda_max": math.nan, "seconds": 0.0, "hessian_vector_products": 0}
    if run.sharpness_samples:
        rank, world = trainer.args.process_index, trainer.args.world_size
        sharp = measure_sharpness(model, sharpness_batches(data, run.sharpness_samples, run.batch, rank, world))
    if not trainer.is_world_process_zero():
        return None
    steady = sorted(timer.times[min(3, len(timer.times) - 1):])  # skip warm-up steps
    return {
        **asdict(run), "label": label, "optim": optim, "optim_args": optim_args,
        "rho": 0.0 if optim == "sgd" or optim in NO_ASCENT else rho_for(run.noise, run.method),
        "processes": args.world_size,
        "steps": trainer.state.global_step,
        "corrupted": int(data.changed.sum()), "train_examples": len(data.train), **final,
        "lambda_max": sharp["lambda_max"], "sharpness_seconds": sharp["seconds"],
        "hessian_vector_products": sharp["hessian_vector_products"],
        "sec_per_step": statistics.median(steady), "sec_per_step_mean": statistics.fmean(steady),
        "train_seconds": sum(timer.times),
        "curve": curve, "loss_curve": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
    }


# ---------------------------------------------------------------- on several processes


def train_digits_torchrun(run: DigitsRun, output_dir: Path, processes: int = 2, module: str = "sam_hf.label_noise",
                          timeout: float = 600) -> dict:
    """`train_digits` on `processes` processes (torchrun, gloo): rank 0's result. `module` is the entry point
    torchrun runs (its main must hand `--digits_run` to `digits_worker`): a study that adds methods to
    METHODS names itself, so that they exist in the workers too. RuntimeError naming the run, with the workers'
    error and the tail of their output, when the launch fails. Interrupted (Ctrl-C, a timeout, SIGTERM turned
    into KeyboardInterrupt), it stops torchrun, which stops its workers: they run in a session of their own and
    would otherwise outlive this process."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result_file, error_file = output_dir / "result.json", output_dir / "error.txt"
    result_file.unlink(missing_ok=True)
    error_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", module, "--digits_run", json.dumps(asdict(run)), "--output_dir", str(output_dir)]
    what = f"{run.method} on {processes} processes ({output_dir})"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise RuntimeError(f"{what}: torchrun did not finish within {timeout:.0f} s") from None
    except BaseException:
        _stop(proc)
        raise
    if proc.returncode != 0 or not result_file.is_file():
        error = error_file.read_text() if error_file.is_file() else ""
        tail = "\n".join(output.strip().splitlines()[-8:])
        raise RuntimeError(f"{what}: torchrun exited with code {proc.returncode}"
                           + (f": {error}" if error else "") + f"\n{tail}")
    return json.loads(result_file.read_text())


def _stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to torchrun (it ends its workers), then SIGKILL after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def digits_worker(argv: list[str]) -> int:
    """One process of `train_digits_torchrun`: trains, then rank 0 writes result.json (any failing rank writes
    error.txt) into --output_dir."""
    p = argparse.ArgumentParser(prog="digits worker (under torchrun)")
    p.add_argument("--digits_run", required=True, help="the DigitsRun as JSON")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    try:
        result = train_digits(DigitsRun(**json.loads(args.digits_run)), out / "trainer", distributed=True)
    except Exception as err:
        (out / "error.txt").write_text(f"{type(err).__name__}: {err}")
        raise
    if result is not None:
        (out / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(digits_worker(sys.argv[1:]))
