import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

torch.set_num_threads(1)  # the suite runs beside other work on 2 cores; small models gain nothing from more

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def frozen_gc():
    """Trainer.train() starts with accelerate's full gc.collect(): with transformers imported that scans ~450k
    objects (~0.9 s per call, 20x the training of these tiny models). Freezing what exists when a test module
    starts makes that collection cheap; objects stay reference-counted as usual."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
