"""Independent references for the SAM family of issue 19, written from the papers' equations.

Nothing here imports sam_hf. Each module is one variant, its update in the docstring with the paper's
equation and the authors' code (file, function, lines) it was checked against; `common.py` states the
conventions (trainable parameters, per-example `loss_fn(model, batch)`, exact restore, BatchNorm handling).

    asam.py      ASAM, the authors' rule (T = |x| + eta on names with "weight") and davda54's (T = |x| on all)
    sam_on.py    SAM-ON / ASAM-ON: only normalization parameters perturbed (by module type or by name)
    vasso.py     VaSSO: e = rho d/||d||, d a moving average of gradients
    bisam.py     BiSAM: the ascent on a lower bound of the 0-1 loss (-log and tanh)
    looksam.py   LookSAM: SAM every k steps, the orthogonal part reused in between
    aesam.py     AE-SAM: SAM where ||g||^2 exceeds its running mean by c_t running std
    esam.py      ESAM: stochastic weight perturbation, sharpness-sensitive data selection
    saf_mesa.py  SAF and MESA: trajectory (KL) loss against past outputs / an EMA model
    gsam.py      GSAM: g_p - alpha g_perp, rho following the learning rate
    grouped.py   google-research/sam's inner_group_size: one perturbation per group of replicas
    async_sam.py Asynchronous SAM with staleness tau and first / random ascent samples
    sampa.py     SAMPa-lambda with a pluggable rule (ASAM, SAM-ON, VaSSO, BiSAM) and with m micro-batches

The checks against the authors' code (fp64, a 2-layer MLP with LayerNorm and BatchNorm) are outside the
repository; their results are recorded in the notes of issue 19.
"""
