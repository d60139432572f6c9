#!/usr/bin/env python
"""SAMPa paper (Xie, Pethick, Cevher, NeurIPS 2024), Table 6: BERT-base on GLUE.

AdamW base, peak lr 2e-5 with a linear schedule, batch 32, gradient clipping
at 1, 3 epochs (5 for MRPC and WNLI), rho 0.05 except CoLA 0.01 and RTE and
STS-B 0.005; methods AdamW, SAM, SAMPa-0 and SAMPa-0.1.

    python glue_scripts/grid_sampa_table6.py --dry_run
    python glue_scripts/grid_sampa_table6.py --tasks rte,mrpc --methods adamw,sam --seeds 1,2,3
    python glue_scripts/summarize.py out/sampa_table6
"""

import sys

from paper_grid import GLUE_TASKS, Grid, main

RHO = {"cola": 0.01, "rte": 0.005, "stsb": 0.005}  # every other task: 0.05
EPOCHS = {"mrpc": 5, "wnli": 5}  # every other task: 3

GRID = Grid(
    name="sampa_table6",
    title="SAMPa paper, Table 6: BERT-base fine-tuned on GLUE (AdamW, SAM, SAMPa-0, SAMPa-0.1)",
    model="bert-base-uncased",
    common={
        "learning_rate": 2e-5,
        "lr_scheduler_type": "linear",
        "per_device_train_batch_size": 32,
        "max_grad_norm": 1.0,
        "max_seq_length": 128,
    },
    tasks={task: {"num_train_epochs": EPOCHS.get(task, 3), "rho": RHO.get(task, 0.05)} for task in GLUE_TASKS},
    methods={
        "adamw": ["--optim", "adamw_torch"],
        "sam": ["--optim", "sam", "--optim_args", "rho={rho}"],
        "sampa-0": ["--optim", "sampa", "--optim_args", "rho={rho},lam=0"],
        "sampa-0.1": ["--optim", "sampa", "--optim_args", "rho={rho},lam=0.1"],
    },
    notes="""
Not among the settings followed here, so left at the defaults of run_glue.py / transformers:
max_seq_length 128, weight decay 0, no warm-up, evaluation batch 8.
Batch 32 is per process: run each job as one process, or SAMPa on two processes
(--methods sampa-0,sampa-0.1 --launcher "torchrun --nproc_per_node 2"), where each role takes its own batch of 32.
""",
)

if __name__ == "__main__":
    sys.exit(main(GRID))
