"""Extra fp32 copies of the trainable parameters each method keeps, beyond the base optimizer's own.

    python -m benchmarks.param_copies             # the README table (one process)
    python -m benchmarks.param_copies --where     # also list what is alive at each method's peak
    python -m benchmarks.param_copies --roles     # role mode: each rank of 2-process SAMPa / Asynchronous SAM
    python -m benchmarks.param_copies --layouts   # per-rank extra copies: 1 process, DDP, FSDP2, FSDP2 role mode,
                                                  # DeepSpeed ZeRO-1/2/3 (deepspeed installed)
    python -m benchmarks.param_copies --layouts --rows SAMPa-0.2 gsam --only zero1   # some rows and layouts

(from the repository root: the FSDP2 layouts borrow tests/helpers/fsdp_trainer.py's CPU set-up)

CPU has no allocator statistics, so allocations are counted directly: a
`TorchDispatchMode`, active for the whole of `trainer.train()`, looks at the
output of every aten op. An output whose storage is new (shared with no input:
not a view, not an in-place or `out=` result) and at least half a parameter in
size is tracked until its storage is freed (`weakref.finalize` on the storage,
whose Python object torch keeps alive exactly as long as the storage itself).
The peak of the live tracked bytes is taken over the measured steps (from step
WARMUP + 1 on, when the optimizer state and each method's carried state exist).

The model is LAYERS bias-free DIM x DIM linear layers (every trainable
parameter the same size) on a batch of BATCH = 4, so activations stay far below
the threshold and every tracked allocation is parameter-sized. The same model and
data with the plain base optimizer (`adamw_torch`, or the method's `base=` with
its own keys) is the baseline: autograd's `.grad` and the optimizer's own state
and temporaries are in both, so

    extra copies = (peak(method) - peak(baseline)) / (bytes of all trainable parameters).

The figure is exact up to per-tensor temporaries (one parameter tensor is
1/LAYERS of a copy): a method that holds a whole extra copy shows up as +1,
one that works parameter by parameter as a fraction of 1/LAYERS.

Role mode (`--roles`, `run_roles`): the same model under torchrun with 2
processes (gloo), every rank metered on its own; each rank's extra copies are
counted against the same 1-process baseline, and the target is SAM's extra
copies in 1 process (same base optimizer, clipping and accumulation) plus one.
The meter sees every tensor the exchange allocates (send, receive and staging
buffers); point-to-point gloo transfers of contiguous CPU tensors read and
write those tensors in place, so nothing is hidden inside the collectives.
(The all-gather the exchange used before also allocated a flat output inside
gloo, which this meter cannot see: its 'before' figures are lower bounds.)

Layouts (`--layouts`, `measure_layouts`): each method's extra copies on the
busiest rank, in units of one FULL copy of the trainable parameters, in one
process, data parallel on 2 processes (DDP), FSDP2 data parallel on 2 processes
(accelerate's FSDP2 plugin, turned on for CPU processes as
tests/helpers/fsdp_trainer.py does) and FSDP2 role mode on 4 processes (2 roles
x 2 ranks, `parallel=on`). SAMPa and Asynchronous SAM run with `parallel=off`
in the data-parallel layouts. With FSDP2 the parameters are DTensors: the meter
counts a DTensor output by its local shard's storage, and its threshold is half
the smallest LOCAL trainable tensor, read when training begins (after
accelerate has sharded the model), so shard-sized allocations are counted.
Each layout's baseline is the base optimizer under the same per-rank layout
(role mode: FSDP2 on 2 processes, whose shards equal each role's 2-rank shards),
so FSDP's own all-gather and reduce-scatter buffers are in both and cancel.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import weakref
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DIM = 64  # each parameter: DIM x DIM fp32 = 16 KiB
LAYERS = 16  # per-tensor temporaries show up in steps of 1/16 of a copy
BATCH = 4  # mSAM needs micro_batches=4 <= batch; activations: BATCH x DIM fp32 = 1 KiB, far below the threshold (8 KiB)
STEPS = 5
WARMUP = 2  # steps 1-2 build the optimizer state (SAMPa's first step only computes g_0); 3-5 are measured


def _registered():
    import sam_hf  # noqa: F401  (registers the methods)
    from sam_hf import registry

    return registry.specs()


# (label, optim, optim_args): every registered method's 1-process examples (registry.py) that this model can run
# (SAM-ON needs normalization layers, which it has none of); its target is what the method declares for that
# configuration (`copies(config)`: its `extra_copies`, plus a rule's state, SAMPa's held micro-batch gradients,
# Asynchronous SAM's queue).
ROWS = [(e.label, s.name, e.optim_args) for s in _registered() for e in s.examples if e.processes == 1 and e.meter]
TARGETS = {s.name: s.method.extra_copies for s in _registered()}  # each method's plain configuration


def target(optim: str, optim_args: str | None) -> float:
    """The extra copies `optim` with `optim_args` declares (its registry's method `copies(config)`)."""
    from sam_hf import SharpnessConfig, registry

    return registry.get(optim).method.copies(SharpnessConfig.from_optim_args(optim, optim_args))
ROLE_METHODS = tuple(s.name for s in _registered() if s.method.two_roles)
# Role mode: every rank within SAM's extra copies (1 process, same base, clipping, accumulation) + 1.
ROLE_ROWS = [row for row in ROWS if row[1] in ROLE_METHODS]
# Layouts (--layouts): the bench's rows; SAMPa and Asynchronous SAM also run role mode under FSDP2 (parallel=on).
def _scheduled(optim: str, optim_args: str) -> bool:
    from sam_hf import SharpnessConfig

    return SharpnessConfig.from_optim_args(optim, optim_args).scheduled


LAYOUT_ROWS = [(e.label, s.name, e.optim_args) for s in _registered() for e in s.examples
               if e.processes == 1 and e.bench and e.meter and not _scheduled(s.name, e.optim_args)]
# accelerate's FSDP2 plugin as tests/helpers/fsdp_trainer.py configures it: every Linear its own FSDP unit
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["Linear"], "state_dict_type": "SHARDED_STATE_DICT"}
ROLE_VARIANTS = [(0.0, 1), (1.0, 1), (0.0, 2), (1.0, 2)]  # (max_grad_norm, gradient_accumulation_steps)


# ---- the model: equal-sized trainable parameters that dominate memory -------------------------------
class EqualLinears(nn.Module):
    """LAYERS bias-free Linear(DIM, DIM) layers, tanh between them; forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self, dim: int = DIM, layers: int = LAYERS, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        with torch.no_grad():
            for layer in self.layers:  # orthogonal: the signal (and every gradient) survives all layers
                q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
                layer.weight.copy_(q)

    def forward(self, x, labels=None):
        h = x
        for layer in self.layers:
            h = torch.tanh(layer(h))
        out = {"logits": h}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(h, labels)
        return out


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, dim: int, seed: int = 0, id_column: str | None = None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(0, dim, (n,), generator=g)
        self.id_column = id_column  # a method that keeps a record per example (SAF) reads its id from the data

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        row = {"x": self.x[i], "labels": self.y[i]}
        if self.id_column:
            row[self.id_column] = i
        return row


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(t, DTensor)


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes of this rank's part of `t` (a DTensor's local shard, else the tensor)."""
    if _is_dtensor(t):
        t = t._local_tensor
    return t.numel() * t.element_size()


# ---- the meter ----------------------------------------------------------------------------------
def _tensors(obj, out: list) -> list:
    """The tensors in an op's (nested tuple / list / dict) arguments or outputs."""
    if isinstance(obj, torch.Tensor):
        if _is_dtensor(obj):  # FSDP2: the storage is the local shard's (the DTensor wrapper has none of its own)
            obj = obj._local_tensor
        if obj.layout == torch.strided and obj.device.type != "meta":  # tensors with a storage
            out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, out)
    return out


@dataclass
class Allocation:
    op: str
    shape: tuple
    nbytes: int
    step: int
    where: str = ""


class AllocationMeter(TorchDispatchMode):
    """Tracks every new storage of at least `threshold` bytes an aten op creates, until it is freed."""

    _SKIP_FILES = tuple(os.sep + os.path.join("torch", *parts) for parts in
                        (("utils", ""), ("_ops.py",), ("_dynamo", ""), ("_compile.py",))) + (__file__,)

    def __init__(self, threshold: int, where: bool = False, resizable: bool = False):
        super().__init__()
        self.threshold = threshold
        self.where = where
        # resizable: storages may shrink and grow in place (FSDP2 frees and re-allocates its unsharded parameters
        # with `untyped_storage().resize_`, which no aten op reports): the live bytes are then re-read from every
        # tracked storage's current size after each op, and a storage resized to 0 counts 0 until it grows again
        self.resizable = resizable
        # id(storage) -> (token, allocation, weak reference to the storage); torch keeps a storage's Python object
        # alive as long as the storage, so the id names one storage for as long as the entry exists
        self.live: dict[int, tuple[object, Allocation, weakref.ref]] = {}
        self.live_bytes = 0
        self.measuring = False
        self.step = 0
        self.peak = 0
        self.peak_live: list[Allocation] = []
        self.tracked = 0
        self.armed = False  # from the first step on: what train() allocates before (e.g. moving the model) is not counted

    def _freed(self, key: int, token: object) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] is token:
            del self.live[key]
            self.live_bytes -= entry[1].nbytes

    def _current(self) -> int:
        """The live bytes as the tracked storages stand now (a resized storage counts its current size)."""
        total = 0
        for _, _, ref in self.live.values():
            storage = ref()
            total += storage.nbytes() if storage is not None else 0
        return total

    def _alive(self) -> list[Allocation]:
        if not self.resizable:
            return [a for _, a, _ in self.live.values()]
        alive = []
        for _, a, ref in self.live.values():
            storage = ref()
            if storage is not None and storage.nbytes():
                alive.append(Allocation(a.op, a.shape, storage.nbytes(), a.step, a.where))
        return alive

    def _location(self) -> str:
        frames, f = [], sys._getframe(2)
        while f is not None and len(frames) < 4:
            name = f.f_code.co_filename
            if not any(s in name for s in self._SKIP_FILES):
                short = name.split("site-packages" + os.sep)[-1]
                if "sam_hf" in name:
                    short = "sam_hf" + name.split("sam_hf", 1)[1]
                frames.append(f"{short}:{f.f_lineno} {f.f_code.co_name}")
            f = f.f_back
        return " <- ".join(frames)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.armed:
            return out
        outputs = _tensors(out, [])
        grew = False
        if outputs:
            inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs), [])}
            for t in outputs:
                storage = t.untyped_storage()
                key, nbytes = id(storage), storage.nbytes()
                if nbytes < self.threshold or key in inputs or key in self.live:
                    continue  # small, a view / in-place / out= result, or a storage already counted
                token = object()
                alloc = Allocation(str(func), tuple(t.shape), nbytes, self.step, self._location() if self.where else "")
                self.live[key] = (token, alloc, weakref.ref(storage))
                self.live_bytes += nbytes
                self.tracked += 1
                weakref.finalize(storage, self._freed, key, token)
                grew = True
        if self.measuring and (grew or self.resizable):
            current = self._current() if self.resizable else self.live_bytes
            if current > self.peak:
                self.peak = current
                if self.where:
                    self.peak_live = self._alive()
        return out


def _callback(meter: AllocationMeter, warmup: int):
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # after accelerate prepared the model: under FSDP2 each rank holds shards, so the threshold is half
            # the smallest LOCAL trainable tensor (else every shard-sized allocation would be ignored)
            sizes = [_local_bytes(p) for p in (model.parameters() if model is not None else ()) if p.requires_grad]
            if sizes and min(sizes) > 0:
                meter.threshold = min(sizes) // 2

        def on_step_begin(self, args, state, control, **kwargs):
            meter.armed = True
            meter.step = state.global_step + 1
            meter.measuring = state.global_step >= warmup

        def on_step_end(self, args, state, control, **kwargs):
            meter.measuring = False

    return Window()


@dataclass
class Run:
    optim: str
    optim_args: str | None
    peak_bytes: int
    param_bytes: int
    peak_live: list[Allocation] = field(default_factory=list)

    @property
    def copies(self) -> float:
        """Peak live tracked bytes in units of the whole trainable parameter set (.grad and optimizer state included)."""
        return self.peak_bytes / self.param_bytes


@contextlib.contextmanager
def _cheap_gc():
    """Trainer.train() starts with a full gc.collect(); freezing what exists makes it cheap (see tests/conftest.py)."""
    if gc.get_freeze_count():  # frozen already (tests/conftest.py): leave it to its owner
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def zero_config(stage: int) -> dict:
    """A ds_config for DeepSpeed ZeRO `stage`, the rest from TrainingArguments ("auto"). Buckets of 4 parameters
    (DeepSpeed's default, 5e8 elements, would allocate a 2 GB bucket per rank for this 1 MB model), and under
    ZeRO-3 no persistent parameters (by default parameters under 1e5 elements, all of these, stay gathered)."""
    bucket = 4 * DIM * DIM
    zero = {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=bucket)
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero}


def run(optim: str, optim_args: str | None = None, *, max_grad_norm: float = 0.0, steps: int = STEPS,
        warmup: int = WARMUP, dim: int = DIM, layers: int = LAYERS, where: bool = False, ga: int = 1,
        fsdp: bool = False, zero: int = 0) -> Run:
    """Train EqualLinears for `steps` steps under the meter; the peak of live tracked bytes after `warmup` steps.
    Under torchrun every rank trains (gloo) and measures its own peak; `fsdp`: accelerate's FSDP2 plugin (call
    `force_fsdp_on_cpu()` first in that process); `zero`: DeepSpeed ZeRO of that stage (`--deepspeed`)."""
    import sam_hf
    from transformers import PrinterCallback, TrainingArguments

    model = EqualLinears(dim, layers)
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    meter = AllocationMeter(threshold=min(p.numel() * p.element_size() for p in params) // 2, where=where,
                            resizable=fsdp)
    extra = dict(fsdp=True, fsdp_config=dict(FSDP_CONFIG)) if fsdp else {}
    if zero:
        extra = dict(deepspeed=zero_config(zero))
    with tempfile.TemporaryDirectory() as out, _cheap_gc():
        args = TrainingArguments(
            output_dir=out, optim=optim, optim_args=optim_args or None, per_device_train_batch_size=BATCH,
            learning_rate=1e-3, lr_scheduler_type="constant", max_steps=steps, max_grad_norm=max_grad_norm,
            logging_strategy="no", report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
            dataloader_num_workers=0, gradient_accumulation_steps=ga,
            ddp_backend="gloo" if "RANK" in os.environ else None, **extra)
        from sam_hf.bench import example_id_column

        rows = _Rows(BATCH * steps * ga, dim, id_column=example_id_column(optim, optim_args))
        trainer = sam_hf.SharpnessTrainer(model=model, args=args, train_dataset=rows,
                                          callbacks=[_callback(meter, warmup)])
        trainer.remove_callback(PrinterCallback)  # no log lines in the table's output
        with meter:
            trainer.train()
    if meter.peak == 0:
        raise RuntimeError(f"{optim} {optim_args}: nothing was measured (steps={steps}, warmup={warmup})")
    return Run(optim, optim_args, meter.peak, param_bytes, meter.peak_live)


def baseline_of(optim: str, optim_args: str | None) -> tuple[str, str | None]:
    """The plain base optimizer a method runs on (itself for a plain optimizer)."""
    from sam_hf import registry
    from sam_hf.config import SharpnessConfig

    if not registry.is_method(optim):
        return optim, optim_args
    cfg = SharpnessConfig.from_optim_args(optim, optim_args)
    return cfg.base, cfg.base_optim_args_string()


_BASELINES: dict[tuple, Run] = {}


def baseline_run(optim: str, optim_args: str | None, **kw) -> Run:
    key = (*baseline_of(optim, optim_args), tuple(sorted(kw.items())))
    if key not in _BASELINES:
        _BASELINES[key] = run(key[0], key[1], **kw)
    return _BASELINES[key]


def measure(optim: str, optim_args: str | None = None, **kw) -> float:
    """Extra parameter-sized fp32 copies `optim` keeps beyond its plain base optimizer (0 for the base itself).

    Keywords go to `run` (max_grad_norm, steps, warmup, dim, layers).
    """
    kw.pop("where", None)
    base = baseline_run(optim, optim_args, **kw)
    return (run(optim, optim_args, **kw).peak_bytes - base.peak_bytes) / base.param_bytes


# ---- role mode: 2 processes, every rank metered ------------------------------------------------------
def _fsdp_on_cpu() -> None:
    """accelerate turns FSDP on for accelerators only: tests/helpers/fsdp_trainer.py's `force_fsdp_on_cpu` sets the
    FSDP2 plugin on the accelerator state after Trainer built it (what accelerate does on GPUs)."""
    from tests.helpers.fsdp_trainer import FSDP_CONFIG as script_config, force_fsdp_on_cpu

    assert script_config == FSDP_CONFIG, (script_config, FSDP_CONFIG)
    force_fsdp_on_cpu()


def _role_worker(spec: str, out: str) -> None:
    """Under torchrun: run every case of `spec` (JSON [[optim, optim_args, max_grad_norm, ga, steps(, fsdp(, zero))],
    ...]) and write this rank's peaks (and, with PARAM_COPIES_WHERE=1, what is alive at each) to OUT/rank{r}.json."""
    import json

    torch.set_num_threads(1)
    cases = [tuple(c) + (False, 0)[len(c) - 5:] for c in json.loads(spec)]
    where = os.environ.get("PARAM_COPIES_WHERE") == "1"
    if any(c[5] for c in cases):
        _fsdp_on_cpu()  # only acts on runs whose TrainingArguments ask for FSDP
    if any(c[6] for c in cases):  # DeepSpeed on CPU processes: gloo only, its shared-memory op not built
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    runs = [run(o, a, max_grad_norm=c, ga=ga, steps=steps, where=where, fsdp=fsdp, zero=zero)
            for o, a, c, ga, steps, fsdp, zero in cases]
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"peaks": [r.peak_bytes for r in runs],
                   "where": [_describe(r) if where else "" for r in runs]}, f)


def run_ranks(cases: list[tuple], procs: int = 2, steps: int = STEPS, timeout: float = 900,
              where: bool = False) -> list[list[tuple[int, str]]]:
    """(peak tracked bytes, what is alive at the peak) of every rank, a list per case, for each
    (optim, optim_args, max_grad_norm, ga[, fsdp[, zero]]) case, trained on `procs` processes in one torchrun
    launch."""
    import json
    import subprocess

    from tests.helpers.processes import ROOT, torchrun

    spec = json.dumps([[c[0], c[1], c[2], c[3], steps, bool(c[4]) if len(c) > 4 else False,
                        int(c[5]) if len(c) > 5 else 0] for c in cases])
    with tempfile.TemporaryDirectory() as out:
        cmd = torchrun(procs, "-m", "benchmarks.param_copies", "--role_worker", spec, "--out", out)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PARAM_COPIES_WHERE": "1" if where else "0",
               "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{procs}-process memory run failed:\n{proc.stderr[-4000:]}")
        per_rank = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(procs)]
    return [list(ranks) for ranks in zip(*[zip(r["peaks"], r["where"]) for r in per_rank])]


def run_roles(cases: list[tuple], procs: int = 2, steps: int = STEPS, timeout: float = 900) -> list[list[int]]:
    """Peak tracked bytes of every rank (a list per case) for each (optim, optim_args, max_grad_norm, ga) case,
    trained role-parallel on `procs` processes in one torchrun launch."""
    return [[peak for peak, _ in ranks] for ranks in run_ranks(cases, procs, steps, timeout)]


def sam_twin(optim: str, optim_args: str | None) -> str:
    """optim_args for SAM on the same base optimizer (and its keys) as `optim`: the reference of issue 10."""
    from sam_hf.config import SharpnessConfig

    cfg = SharpnessConfig.from_optim_args(optim, optim_args)
    return ",".join(["rho=0.05", f"base={cfg.base}"] + [f"{k}={v}" for k, v in cfg.base_optim_args.items()])


def measure_roles(cases: list[tuple], steps: int = STEPS) -> list[dict]:
    """Per case: each rank's extra copies in role mode and the target, SAM's extra copies in 1 process (same
    base optimizer, clipping and accumulation) + 1."""
    peaks = run_roles(cases, steps=steps)
    out = []
    for (optim, optim_args, clip, ga), ranks in zip(cases, peaks):
        base = baseline_run(optim, optim_args, max_grad_norm=clip, ga=ga, steps=steps)
        sam = measure("sam", sam_twin(optim, optim_args), max_grad_norm=clip, ga=ga, steps=steps)
        out.append({"optim": optim, "optim_args": optim_args, "max_grad_norm": clip, "ga": ga,
                    "ranks": [(p - base.peak_bytes) / base.param_bytes for p in ranks], "sam": sam, "target": sam + 1})
    return out


# ---- layouts: 1 process, DDP, FSDP2, FSDP2 role mode; the busiest rank ---------------------------------
def with_parallel(optim_args: str | None, value: str) -> str:
    """optim_args with parallel=VALUE (replacing any parallel= already there)."""
    keys = [kv for kv in (optim_args or "").split(",") if kv and not kv.startswith("parallel=")]
    return ",".join(keys + [f"parallel={value}"])


ZERO_LAYOUTS = ("zero1", "zero2", "zero3")


def measure_layouts(rows=LAYOUT_ROWS, steps: int = STEPS,
                    layouts=("one", "ddp", "fsdp", "fsdp_roles", *ZERO_LAYOUTS), where: bool = False) -> dict:
    """Extra copies on the busiest rank for each row (label, optim, optim_args) and layout, in units of one FULL
    copy of the trainable parameters: {"rows": {label: {layout: copies}}, "baselines": {...}, "where": {...}}.

    one: 1 process against the base optimizer in 1 process. ddp: 2 processes, unsharded (SAMPa and Asynchronous
    SAM with parallel=off) against the base optimizer on the same 2 processes. fsdp: accelerate's FSDP2 plugin on 2
    processes (parallel=off) against the base optimizer under the same FSDP2 layout. fsdp_roles: 4 processes, 2 roles
    x 2 ranks (parallel=on, SAMPa and Asynchronous SAM only), each role sharded over its 2 ranks, against the base
    optimizer under FSDP2 on 2 processes (the same per-rank shards). zero1/zero2/zero3: DeepSpeed ZeRO of that stage
    on 2 processes (parallel=off) against the base optimizer under the same stage (one more launch; skipped where
    deepspeed is not installed). Per layout: (max over ranks of the method's peak - max over ranks of the
    baseline's peak) / bytes of all trainable parameters."""
    result = {"rows": {label: {} for label, _, _ in rows}, "baselines": {}, "where": {}}
    bases = sorted({baseline_of(o, a) for _, o, a in rows}, key=str)
    if "one" in layouts:
        for label, optim, optim_args in rows:
            base = baseline_run(optim, optim_args, steps=steps)
            r = run(optim, optim_args, steps=steps, where=where)
            result["rows"][label]["one"] = (r.peak_bytes - base.peak_bytes) / base.param_bytes
            result["baselines"][("one", *baseline_of(optim, optim_args))] = base.copies
            if where:
                result["where"][(label, "one")] = f"peak {r.copies:.2f} copies\n{_describe(r)}"
    full = LAYERS * DIM * DIM * 4
    two = [(b, ba, 0.0, 1, fsdp) for fsdp in (False, True) for b, ba in bases
           if ("fsdp" if fsdp else "ddp") in layouts or (fsdp and "fsdp_roles" in layouts)]
    two += [(o, with_parallel(a, "off") if o in ROLE_METHODS else a, 0.0, 1, fsdp)
            for fsdp in (False, True) if ("fsdp" if fsdp else "ddp") in layouts for _, o, a in rows
            if _runs_in("fsdp" if fsdp else "ddp", o, a)]
    # unsharded runs first: an FSDP run leaves ACCELERATE_USE_FSDP=true and FSDP in accelerate's shared state
    two.sort(key=lambda case: case[4])
    peaks = dict(zip(two, run_ranks(two, procs=2, steps=steps, where=where))) if two else {}
    four = [(o, with_parallel(a, "on"), 0.0, 1, True) for _, o, a in rows if o in ROLE_METHODS] \
        if "fsdp_roles" in layouts else []
    peaks.update(zip(four, run_ranks(four, procs=4, steps=steps, where=where)) if four else {})

    zero = [int(k[-1]) for k in ZERO_LAYOUTS if k in layouts]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        zero = []
    zero_rows = [(label, o, a) for label, o, a in rows if _runs_in("zero", o, a)] if zero else []
    zero_cases = [(b, ba, 0.0, 1, False, z) for z in zero for b, ba in bases]
    zero_cases += [(o, with_parallel(a, "off") if o in ROLE_METHODS else a, 0.0, 1, False, z)
                   for z in zero for _, o, a in zero_rows]
    # stage by stage, baseline first: a ZeRO-3 run leaves DeepSpeed's ZeRO-3 linear (zero.Init's patch of
    # torch.nn.functional.linear) in place for the runs after it in the same process
    zero_cases.sort(key=lambda case: case[5])
    peaks.update(zip(zero_cases, run_ranks(zero_cases, procs=2, steps=steps, where=where)) if zero_cases else {})

    def busiest(case):
        ranks = peaks[case]
        rank = max(range(len(ranks)), key=lambda i: ranks[i][0])
        return ranks[rank][0], rank, ranks[rank][1]

    for fsdp in (False, True):
        for b, ba in bases:
            if (b, ba, 0.0, 1, fsdp) in peaks:
                result["baselines"][("fsdp" if fsdp else "ddp", b, ba)] = busiest((b, ba, 0.0, 1, fsdp))[0] / full
    for z in zero:
        for b, ba in bases:
            result["baselines"][(f"zero{z}", b, ba)] = busiest((b, ba, 0.0, 1, False, z))[0] / full
    for label, optim, optim_args in rows:
        b, ba = baseline_of(optim, optim_args)
        for z in zero if (label, optim, optim_args) in zero_rows else ():
            peak, rank, alive = busiest((optim, with_parallel(optim_args, "off") if optim in ROLE_METHODS
                                         else optim_args, 0.0, 1, False, z))
            base = busiest((b, ba, 0.0, 1, False, z))
            result["rows"][label][f"zero{z}"] = (peak - base[0]) / full
            if where:
                result["where"][(label, f"zero{z}")] = (f"busiest rank {rank}: peak {peak / full:.2f} copies "
                                                        f"(baseline {b} {ba or ''}: {base[0] / full:.2f})\n{alive}")
                result["where"][("baseline " + b + " " + (ba or ""), f"zero{z}")] = \
                    f"busiest rank {base[1]}: peak {base[0] / full:.2f} copies\n{base[2]}"
        for layout, case in (("ddp", (optim, with_parallel(optim_args, "off") if optim in ROLE_METHODS else optim_args,
                                      0.0, 1, False)),
                             ("fsdp", (optim, with_parallel(optim_args, "off") if optim in ROLE_METHODS else optim_args,
                                       0.0, 1, True)),
                             ("fsdp_roles", (optim, with_parallel(optim_args, "on"), 0.0, 1, True))):
            if case not in peaks:
                continue
            base = busiest((b, ba, 0.0, 1, layout != "ddp"))
            peak, rank, alive = busiest(case)
            result["rows"][label][layout] = (peak - base[0]) / full
            if where:
                result["where"][(label, layout)] = (f"busiest rank {rank}: peak {peak / full:.2f} copies "
                                                   f"(baseline {b} {ba or ''}, rank {base[1]}: {base[0] / full:.2f})"
                                                   f"\n{alive}")
                result["where"][("baseline " + b + " " + (ba or ""), layout)] = \
                    f"busiest rank {base[1]}: peak {base[0] / full:.2f} copies\n{base[2]}"
    return result


def _runs_in(layout: str, optim: str, optim_args: str | None) -> bool:
    """Whether the method runs in `layout` ("ddp", "fsdp", "zero") on 2 processes: ESAM's data selection does not
    run data parallel (it would depend on the split), ESAM does not run under ZeRO (it draws whole tensors)."""
    from sam_hf import registry
    from sam_hf.config import SharpnessConfig, SharpnessConfigError
    from sam_hf.distributed.layouts import FSDP2, DataParallel, DeepSpeed
    from sam_hf.distributed.plan import ParallelPlan

    cls = {"ddp": DataParallel, "fsdp": FSDP2, "zero": DeepSpeed}[layout]
    cfg = SharpnessConfig.from_optim_args(optim, with_parallel(optim_args, "off") if optim in ROLE_METHODS
                                          else optim_args)
    try:
        registry.get(optim).method.check(cfg, cls(ParallelPlan(mode="data", world_size=2)), BATCH)
    except SharpnessConfigError:
        return False
    return True


LAYOUT_NAMES = {"one": "1 process", "ddp": "DDP, 2 processes", "fsdp": "FSDP2, 2 processes",
                "fsdp_roles": "FSDP2 role mode, 4 processes (2 roles x 2 ranks)",
                "zero1": "ZeRO-1, 2 processes", "zero2": "ZeRO-2, 2 processes", "zero3": "ZeRO-3, 2 processes"}


def _select_rows(names=None) -> list[tuple]:
    """LAYOUT_ROWS whose label or method name is one of `names` (all of them for none)."""
    if not names:
        return LAYOUT_ROWS
    rows = [r for r in LAYOUT_ROWS if r[0] in names or r[1] in names]
    unknown = set(names) - {r[0] for r in rows} - {r[1] for r in rows}
    if unknown:
        raise SystemExit(f"--rows {sorted(unknown)}: no such row; labels: {[r[0] for r in LAYOUT_ROWS]}, "
                         f"methods: {sorted({r[1] for r in LAYOUT_ROWS})}")
    return rows


def _layouts_table(where: bool = False, rows=None, layouts=None) -> None:
    rows = rows or LAYOUT_ROWS
    layouts = list(layouts or LAYOUT_NAMES)
    res = measure_layouts(rows=rows, layouts=layouts, where=where)
    print(f"Model: {LAYERS} x Linear({DIM}, {DIM}, bias=False), per-device batch {BATCH}, gloo on CPU processes; "
          f"peak over steps {WARMUP + 1}-{STEPS}. Extra fp32 copies beyond the base optimizer (AdamW) on the "
          "busiest rank (the max over ranks of the method's peak minus the max over ranks of the baseline's), in "
          f"units of ONE FULL copy of the trainable parameters ({LAYERS * DIM * DIM * 4} bytes): a rank holding "
          "one shard of a copy on 2 ranks shows 0.50.\n")
    print("Baselines (the base optimizer under the same per-rank layout):\n"
          "- 1 process: the base optimizer in 1 process.\n"
          "- DDP, 2 processes: the base optimizer on the same 2 processes (DDP); SAMPa and Asynchronous SAM run "
          "with parallel=off (data parallel, every rank both passes).\n"
          "- FSDP2, 2 processes: the base optimizer under the same FSDP2 layout (accelerate's FSDP2 plugin, each "
          "Linear its own unit, parameters sharded over the 2 ranks); SAMPa and Asynchronous SAM with parallel=off. "
          "FSDP's all-gather and reduce-scatter buffers are in the baseline too.\n"
          "- FSDP2 role mode, 4 processes: parallel=on, 2 roles x 2 ranks, each role sharded over its own 2 ranks; "
          "baseline: the base optimizer under FSDP2 on 2 processes, whose per-rank shards equal each role's "
          "(a plain optimizer has no roles; 4-process FSDP2 would shard over 4).\n"
          "- ZeRO-1/2/3, 2 processes: DeepSpeed (`--deepspeed`, `--use_cpu`, gloo) with the base optimizer under the "
          "same stage; SAMPa and Asynchronous SAM data parallel (the only mode under ZeRO). The methods work on "
          "each rank's fp32 partitions.\n")
    print("| method | optim_args | " + " | ".join(LAYOUT_NAMES[k] for k in layouts) + " |")
    print("|---|---|" + "---:|" * len(layouts))
    for label, optim, optim_args in rows:
        cells = res["rows"][label]
        print(f"| {label} | `{optim_args}` | " + " | ".join(f"{cells[k]:.2f}" if k in cells else "n/a"
                                                            for k in layouts) + " |")
    bases = "; ".join(f"{LAYOUT_NAMES[k]}: `{b}{' ' + ba if ba else ''}` {v:.2f}"
                      for (k, b, ba), v in res["baselines"].items())
    print(f"\nBaselines, absolute peak on the busiest rank in full copies: {bases}.")
    print("n/a: role mode (parallel=on) applies to SAMPa and Asynchronous SAM only; ESAM's data selection (gamma) "
          "runs in one process only; the ZeRO columns need deepspeed and a method that runs under ZeRO (not ESAM).")
    if where:
        print("\nAlive at the peak (count x creating op [local shape] where):\n")
        print("\n\n".join(f"{label}, {LAYOUT_NAMES[layout]}: {text}" for (label, layout), text in res["where"].items()))


# ---- the table ------------------------------------------------------------------------------------
def _describe(r: Run, limit: int = 12) -> str:
    from collections import Counter

    groups = Counter((a.op, a.shape, a.where) for a in r.peak_live)
    lines = [f"  {n:3d} x {op} {list(shape)}  {where}" for (op, shape, where), n in groups.most_common(limit)]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_grad_norm", type=float, nargs="*", default=[0.0, 1.0],
                   help="Trainer's clipping (one column each; 0 = off)")
    p.add_argument("--where", action="store_true", help="list the allocations alive at each peak")
    p.add_argument("--roles", action="store_true",
                   help="role mode: 2-process SAMPa and Asynchronous SAM, each rank counted (torchrun, gloo)")
    p.add_argument("--layouts", action="store_true",
                   help="per-rank extra copies in 1 process, DDP (2), FSDP2 (2), FSDP2 role mode (4 processes) and "
                        "DeepSpeed ZeRO-1/2/3 (2)")
    p.add_argument("--rows", nargs="+", default=None, metavar="LABEL_OR_METHOD",
                   help="with --layouts: only these rows (a label such as 'SAMPa-0.2', or a method name: all its rows)")
    p.add_argument("--only", nargs="+", default=None, choices=list(LAYOUT_NAMES), metavar="LAYOUT",
                   help=f"with --layouts: only these layouts ({', '.join(LAYOUT_NAMES)})")
    p.add_argument("--role_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    if opts.role_worker:
        _role_worker(opts.role_worker, opts.out)
        return
    if opts.roles:
        _roles_table()
        return
    if opts.layouts:
        _layouts_table(where=opts.where, rows=_select_rows(opts.rows), layouts=opts.only)
        return
    clips = opts.max_grad_norm
    head = "| method | optim_args | target | " + " | ".join(
        f"extra copies, max_grad_norm={c:g}" for c in clips) + " |"
    print(f"Model: {LAYERS} x Linear({DIM}, {DIM}, bias=False), batch {BATCH}; peak over steps "
          f"{WARMUP + 1}-{STEPS}; one copy = {LAYERS * DIM * DIM * 4} bytes.\n")
    print(head)
    print("|" + "---|" * (3 + len(clips)))
    details = []
    for label, optim, optim_args in ROWS:
        cells = []
        for c in clips:
            base = baseline_run(optim, optim_args, max_grad_norm=c, where=opts.where)
            r = run(optim, optim_args, max_grad_norm=c, where=opts.where)
            cells.append(f"{(r.peak_bytes - base.peak_bytes) / base.param_bytes:.2f}")
            if opts.where:
                details.append(f"{label}, max_grad_norm={c:g}: peak {r.copies:.2f} copies "
                               f"(baseline {base.optim} {base.optim_args or ''}: {base.copies:.2f})\n{_describe(r)}")
        print(f"| {label} | `{optim_args}` | ≤ {target(optim, optim_args):g} | " + " | ".join(cells) + " |")
    bases = ", ".join(f"`{o}{' ' + a if a else ''}` {r.copies:.2f}" for (o, a, kw), r in _BASELINES.items()
                      if dict(kw).get("max_grad_norm") == clips[0])
    print(f"\nBaselines, absolute peak in copies (.grad + the optimizer's state + its per-tensor temporaries): {bases}.")
    if opts.where:
        for (optim, optim_args, kw), base in _BASELINES.items():
            details.insert(0, f"baseline {optim} {optim_args or ''} {dict(kw)}: peak {base.copies:.2f} copies\n"
                              f"{_describe(base)}")
        print("\nAlive at the peak (count x creating op [shape] where):\n")
        print("\n\n".join(details))



def _roles_table() -> None:
    cases = [(optim, optim_args, clip, ga) for _, optim, optim_args in ROLE_ROWS for clip, ga in ROLE_VARIANTS]
    labels = {(o, a): label for label, o, a in ROLE_ROWS}
    print(f"Model: {LAYERS} x Linear({DIM}, {DIM}, bias=False), per-device batch {BATCH}, 2 processes (role mode, "
          f"gloo); peak over steps {WARMUP + 1}-{STEPS} on each rank; extra copies beyond the 1-process base "
          "optimizer; target: SAM's extra copies (1 process, same base, clipping and accumulation) + 1.\n")
    print("| method | max_grad_norm | accumulation | rank 0 (role 0) | rank 1 (role 1) | target (SAM + 1) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in measure_roles(cases):
        print(f"| {labels[(r['optim'], r['optim_args'])]} | {r['max_grad_norm']:g} | {r['ga']} | "
              + " | ".join(f"{x:.2f}" for x in r["ranks"]) + f" | {r['target']:.2f} |")


if __name__ == "__main__":
    main()
