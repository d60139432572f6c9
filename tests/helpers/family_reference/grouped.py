"""One perturbation per group of devices: google-research/sam's `inner_group_size`, simulated in one process.

R replicas, replica r holding batch B_r (equal sizes). google-research/sam (sam_jax/training_utils/
flax_training.py, `train_step.get_sam_gradient`, lines 527-551, and line 564):

    g_r  = grad f(x, B_r)                                   (each replica, its own batch)
    sync_perturbations=False:     a_r = g_r                 (one perturbation per replica: m = R)
    sync_perturbations=True, inner_group_size=None: a_r = mean over all replicas of g_r   (m = 1, plain SAM)
    sync_perturbations=True, inner_group_size=s:    a_r = mean of g_q over r's group G(r) (m = R / s)
    e_r  = rho a_r / ||a_r||           (`dual_vector`: no epsilon)
    h_r  = grad f(x + e_r, B_r);       step with mean_r h_r  (`jax.lax.pmean(grad, 'batch')`)

Groups are R/s disjoint sets of s replicas (s a power of two dividing R). `local_replica_groups` orders them
by TPU topology; for s <= 4 they are consecutive replica ids [o s, ..., o s + s - 1], which is what this
reference uses. The flag defaults are sync_perturbations=False (per-replica perturbation) and
inner_group_size=None. With equal per-replica batches this is mSAM with m = R/s over the concatenated batch.
The code adds the weight-decay penalty 0.5 l2 ||x||^2 to the loss in both passes (the perturbation direction
then includes l2 x); torch optimizers apply weight decay in the step instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from .common import base_step, direction, gradient, gradient_at, scaled, trainable


def grouped_sam_step(model, loss_fn, replica_batches: Sequence, optimizer, rho: float,
                     inner_group_size: int | None = None, sync_perturbations: bool = True,
                     freeze_bn: bool = True) -> None:
    params = trainable(model)
    R = len(replica_batches)
    g = [gradient(model, loss_fn, b, params) for b in replica_batches]
    if not sync_perturbations:
        groups = [[r] for r in range(R)]
    else:
        s = R if inner_group_size is None else inner_group_size
        if R % s:
            raise ValueError(f"inner_group_size={s} must divide the number of replicas {R}")
        groups = [list(range(o * s, (o + 1) * s)) for o in range(R // s)]
    h = [None] * R
    for members in groups:
        a = [sum(g[r][i] for r in members) / len(members) for i in range(len(params))]
        e = direction(a, rho)
        for r in members:
            h[r] = gradient_at(model, loss_fn, replica_batches[r], params, e, freeze_bn)
    base_step(optimizer, params, scaled([sum(h[r][i] for r in range(R)) for i in range(len(params))], 1.0 / R))
