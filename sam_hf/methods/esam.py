"""ESAM (Du, Yan, Feng, Zhou, Zhen, Goh and Tan, ICLR 2022, "Efficient sharpness-aware minimization for improved
training of neural networks"): stochastic weight perturbation (SWP) and, as an option, sharpness-sensitive data
selection (SDS).

SWP: each step a random mask m keeps each parameter tensor with probability beta; only the kept tensors need a
clean gradient (the others are skipped in the clean backward, which is where the time goes) and only they are
perturbed, the step scaled by 1/beta:

    g_m = m * grad f(x, B);    e = (rho / beta) g_m / ||g_m||;    the base optimizer steps with grad f(x + e, B)

SDS (gamma < 1): the examples whose loss rises most at x + e are kept,

    B+ = the floor(gamma |B|) examples with the largest l_i(x + e) - l_i(x)     (one no-grad forward at x + e)

and the step uses grad f(x + e, B+), the mean over B+ (each micro-batch selects its own rows). l_i is the
per-example cross-entropy of the logits against the labels (the authors' loss), whatever loss the model trains
with. gamma = 1 is SWP alone, as the SAMPa paper runs ESAM (section 5.2: "we solely integrate SWP in this
experiment, as no efficiency advantage is observed compared to SAM when SDS is included").

The authors' code (dydjw9/Efficient_SAM, utils/Esam.py) masks whole parameter tensors (`requires_grad=False` with
probability 1 - beta, lines 60-61, and scale rho/(||g_m|| + 1e-7)/beta, line 26): so does sam_hf (the saving
needs whole tensors). Where it differs from the paper, sam_hf follows the paper: the code draws the first step's
mask as "keep all" and the next one at the end of each step (sam_hf draws one per step, the first included); its
SDS keeps the examples strictly above the k-th largest, k - 1 of them (sam_hf keeps k = floor(gamma |B|)); it
runs the SDS forward even with gamma >= 0.99 (sam_hf only with gamma < 1); and no epsilon is added to ||g_m||
(a zero g_m gives no perturbation). The mask is drawn from its own generator (`mask_seed`, the same on every rank;
checkpointed), so a run is reproducible and resumes exactly.

Several processes: the clean gradient is averaged over the ranks before the perturbation (sam_hf's global rule:
1 and N processes agree); the authors' code perturbs per worker (`require_backward_grad_sync=False`):
`sync_ascent=false` does that. SDS selects per rank in the code; sam_hf refuses SDS on several processes (the
selection would depend on how the batch is split). Under FSDP2 every tensor gets its clean gradient (FSDP's
reduce-scatter needs every sharded gradient) and the mask is applied afterwards: the same result, without the
saving.

Memory: the weight backup (one copy). Cost: the clean backward over the kept tensors (about beta of the weight
gradients), the perturbed pass (over floor(gamma |B|) rows with SDS, plus one no-grad forward).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..batching import batch_size, take_rows
from ..config import SharpnessConfig, SharpnessConfigError, _bad, option
from ..registry import Example, register_method
from ..tensors import backup, restore, zero_grads
from .base import SharpnessMethod, StepResult
from .outputs import labels_of, logits_of
from .rules import AscentOptions, AscentRule


@dataclass
class ESAMConfig(AscentOptions, SharpnessConfig):
    beta: float = option(0.5, "ESAM's SWP: each parameter tensor is perturbed (and needs a clean gradient) with "
                         "probability beta, the perturbation scaled by 1/beta (SAMPa paper, Appendix B.4: 0.5)",
                         example=0.5)
    gamma: float = option(1.0, "ESAM's SDS: the descent uses the floor(gamma |B|) examples whose loss rises most at "
                          "the perturbed point; 1 turns SDS off (as the SAMPa paper's Table 4)", example=0.5)
    mask_seed: int = option(0, "seed of ESAM's mask generator (the same on every rank)", example=0)
    sync_ascent: bool = option(True, "several processes: perturb by the gradient averaged over the ranks (exact on the "
                               "global batch); false perturbs each rank by its own, as the authors' code does",
                               example="false")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.beta <= 1.0:
            raise _bad("beta", self.beta, "beta (the probability a tensor is perturbed) must be in (0, 1] (e.g. beta=0.5)")
        if not 0.0 < self.gamma <= 1.0:
            raise _bad("gamma", self.gamma, "gamma (the share of examples kept) must be in (0, 1] (1: no selection)")


class ESAM(SharpnessMethod):
    rules = ("sam", "asam")  # its random tensor mask and SAM-ON's normalization layers: no paper combines them
    extra_copies = 1  # the weight backup

    @classmethod
    def check(cls, config, layout, samples_per_rank=None) -> None:
        if not config.sync_ascent and layout.reduces_every_pass:
            raise SharpnessConfigError(
                f"optim_args: sync_ascent=false (each rank perturbs by its own gradient) does not run under "
                f"{layout.describe()}: every backward pass averages the gradients over the ranks. Drop sync_ascent")
        if not layout.whole_params:
            raise SharpnessConfigError(
                f"optim=esam keeps a random share beta of the parameter tensors, drawn tensor by tensor, but under "
                f"{layout.describe()} a rank holds slices of the parameters, not whole tensors; run ESAM under DDP "
                "(torchrun) or FSDP2")
        if config.gamma < 1.0 and layout.distributed:
            raise SharpnessConfigError(
                f"optim_args: gamma={config.gamma} (ESAM's data selection) picks the examples of each rank's share of "
                f"the batch, so the result would depend on how the batch is split over the {layout.world_size} "
                "processes; run it in one process, or drop gamma (SWP alone, as the SAMPa paper runs ESAM)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        # e = (rho / beta) g_m / ||g_m||: the ascent rule with radius rho / beta, on the kept tensors only
        self.rule = AscentRule(dataclasses.replace(cfg, rho=cfg.rho / cfg.beta), self.layout, self.rule.names)
        self.generator = torch.Generator().manual_seed(cfg.mask_seed)

    @property
    def needs_outputs(self) -> bool:
        return self.config.gamma < 1.0

    def draw_mask(self) -> list[bool]:
        """Which parameter tensors are kept this step (each with probability beta)."""
        keep = torch.rand(len(self.params), generator=self.generator, dtype=torch.float64) < self.config.beta
        return keep.tolist()

    @contextlib.contextmanager
    def _only_kept(self, mask):
        """The clean backward skips the dropped tensors' weight gradients (the authors' saving), where the layout
        lets a pass leave some gradients out (not under FSDP2, whose reduce-scatter expects every one)."""
        dropped = [p for p, keep in zip(self.params, mask) if not keep]
        toggle = dropped and len(dropped) < len(self.params) and not self.layout.reduces_every_pass
        if toggle:
            for p in dropped:
                p.requires_grad_(False)
        try:
            yield
        finally:
            if toggle:
                for p in dropped:
                    p.requires_grad_(True)

    def step(self, batches, passes):
        params, layout, cfg = self.params, self.layout, self.config
        scale = passes.loss_scale()
        mask = self.draw_mask()
        sds = cfg.gamma < 1.0
        clean_losses: list[torch.Tensor] = []

        def record(outputs, batch):  # l_i(x) of each micro-batch, from the clean pass's own outputs
            clean_losses.append(self._example_losses(outputs, batch))

        with_record = {"loss_term": record} if sds else {}
        zero_grads(params)
        with self._only_kept(mask):
            loss = sum(passes.backward(b, clean=True, **with_record) for b in batches)
        if cfg.sync_ascent:
            layout.all_reduce_grads(params)
        saved = backup(params)
        _, applied, norm = self.perturb_([p.grad if keep else None for p, keep in zip(params, mask)], scale)
        zero_grads(params)
        kept, perturbed_loss = 0, 0.0
        if sds:
            for batch, before in zip(batches, clean_losses):
                n = batch_size(batch)
                sharpness = self._example_losses(passes.forward(batch, clean=False), batch) - before
                k = max(1, int(n * cfg.gamma))
                rows = torch.topk(sharpness, k).indices.sort().values
                kept += k
                perturbed_loss = perturbed_loss + passes.backward(take_rows(batch, rows), k / n, clean=False,
                                                                  part_of=batch, weight=n / k)
        else:  # the perturbed pass (at x itself where nothing was applied: every tensor's gradient is needed)
            perturbed_loss = sum(passes.backward(batch, clean=False) for batch in batches)
        restore(params, saved)
        layout.all_reduce_grads(params)
        metrics = {"sam/perturbed_loss": perturbed_loss, "sam/ascent_grad_norm": norm,
                   "sam/skipped_ascent": float(not applied),
                   "sam/perturbed_share": sum(mask) / max(len(mask), 1)}
        if sds:
            metrics["sam/selected_share"] = kept / sum(batch_size(b) for b in batches)
        return StepResult(loss, metrics=metrics)

    def _example_losses(self, outputs, batch) -> torch.Tensor:
        """l_i: the per-example cross-entropy of the logits against the labels (detached)."""
        logits = logits_of(outputs, self.name).detach()
        labels = labels_of(batch, self.name)
        if logits.dim() != 2 or labels.dim() != 1:
            raise SharpnessConfigError(
                f"optim_args: gamma={self.config.gamma} (ESAM's data selection) ranks examples by their loss, which "
                f"needs one logit row per example (logits {tuple(logits.shape)}, labels {tuple(labels.shape)}); "
                "token-level outputs have no per-example loss here: drop gamma")
        return F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"].cpu())


register_method("esam", ESAM, ESAMConfig, "ESAM: SAM that perturbs a random share beta of the parameter tensors (their "
                "clean gradients only), optionally descending on the examples whose loss rises most",
                paper="Du et al. 2022a",
                examples=(Example("ESAM (beta=0.5)", "rho=0.05,beta=0.5"),
                          Example("ESAM (beta=0.5, gamma=0.5)", "rho=0.05,beta=0.5,gamma=0.5"),
                          Example("ESAM (beta=0.5, DDP)", "rho=0.05,beta=0.5", 2)))
