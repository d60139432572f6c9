"""What measuring must leave as it was: RNG states, train/eval flags, BatchNorm statistics, `.grad`."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def kept_rng():
    """Leave the RNG states (torch CPU and CUDA, `random`, numpy) as they were before the body."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    cpu, python, numpy = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        random.setstate(python)
        np.random.set_state(numpy)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run the body in eval mode; afterwards restore every module's train/eval flag, the RNG states, normalisation
    running statistics and each parameter's `.grad` (same tensor, same values), whatever the body did.

    Under Trainer's mixed precision accelerate has replaced `model.forward` by an autocast wrapper (keeping the
    original as `_original_forward`): the body runs the original, so products are in the parameters' precision
    (fp16 second derivatives would overflow), and the wrapper is put back."""
    modes = [(m, m.training) for m in model.modules()]
    stats = [(b, b.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             for b in m.buffers(recurse=False) if b is not None]
    grads = [(p, p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    autocast_forward = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    model.eval()
    if autocast_forward is not None:
        model.forward = model._original_forward
    try:
        with kept_rng():
            yield
    finally:
        if autocast_forward is not None:
            model.forward = autocast_forward
        with torch.no_grad():
            for b, saved in stats:
                b.copy_(saved)
            for p, grad, saved in grads:
                if grad is not None:
                    grad.copy_(saved)
                p.grad = grad
        for m, training in modes:
            m.training = training


def math_attention():
    """The math kernel of scaled_dot_product_attention: the fused ones have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
