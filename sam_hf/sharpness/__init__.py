"""Sharpness, measured: the Hessian's top eigenvalues and trace, offline, in the training loop, or for a saved model.

    hessian.py   the operator v -> H v of the mean loss over a sample, Lanczos and Hutchinson on it:
                 measure_sharpness(model, batches)
    callback.py  SharpnessCallback, which logs it during training through Trainer.log (any optimizer)
    cli.py       sam-hf sharpness MODEL_DIR --train_file F, for a saved text classifier
    batches.py   a batch's loss and size;  state.py  what measuring must leave as it was;
    group.py     the processes sharing a sample

Imports go one way: nothing here imports the rest of sam_hf (the CLI reads its data with sam_hf.recipes).
"""

from .callback import SharpnessCallback, remember_trainer, trainer_of
from .hessian import HessianOperator, measure_sharpness

__all__ = ["HessianOperator", "SharpnessCallback", "measure_sharpness", "remember_trainer", "trainer_of"]
