#!/usr/bin/env python
"""SAMPa paper (Xie, Pethick, Cevher, NeurIPS 2024), Table 6: BERT-base on GLUE, settings of Section 5.3.

From Section 5.3 ("NLP fine-tuning"): BERT-base; AdamW base with a linear learning-rate schedule,
peak 2e-5; gradient clipping at global norm 1; batch 32; 3 epochs, 5 for MRPC and WNLI; rho 0.05
except CoLA 0.01 and RTE and STS-B 0.005, the same rho for SAM, SAMPa-0 and SAMPa-0.1 (SAMPa-0.1
does not double it here, unlike SAMPa-0.2 on CIFAR). Table 6: the nine GLUE tasks and the methods
AdamW, SAM, SAMPa-0 and SAMPa-0.1, averaged over 10 runs each (the default seeds 1-10; fewer with --seeds).

    python glue_scripts/grid_sampa_table6.py --dry_run
    python glue_scripts/grid_sampa_table6.py --tasks rte,mrpc --methods adamw,sam --seeds 1,2,3
    python glue_scripts/summarize.py out/sampa_table6
"""

import sys

from paper_grid import GLUE_TASKS, Grid, main

RHO = {"cola": 0.01, "rte": 0.005, "stsb": 0.005}  # Sec. 5.3; every other task: 0.05
EPOCHS = {"mrpc": 5, "wnli": 5}  # Sec. 5.3; every other task: 3

GRID = Grid(
    name="sampa_table6",
    title="SAMPa paper, Table 6: BERT-base fine-tuned on GLUE (AdamW, SAM, SAMPa-0, SAMPa-0.1), settings of Sec. 5.3",
    model="bert-base-uncased",  # Sec. 5.3: BERT-base (casing not stated)
    common={
        "learning_rate": 2e-5,  # Sec. 5.3: peak learning rate
        "lr_scheduler_type": "linear",  # Sec. 5.3
        "per_device_train_batch_size": 32,  # Sec. 5.3
        "max_grad_norm": 1.0,  # Sec. 5.3: clipping at global norm 1
        "max_seq_length": 128,  # not in the paper
    },
    tasks={task: {"num_train_epochs": EPOCHS.get(task, 3), "rho": RHO.get(task, 0.05)} for task in GLUE_TASKS},
    methods={  # Table 6's rows; Sec. 5.3: AdamW is the base optimizer of the others
        "adamw": ["--optim", "adamw_torch"],
        "sam": ["--optim", "sam", "--optim_args", "rho={rho}"],
        "sampa-0": ["--optim", "sampa", "--optim_args", "rho={rho},lam=0"],
        "sampa-0.1": ["--optim", "sampa", "--optim_args", "rho={rho},lam=0.1"],
    },
    seeds=tuple(range(1, 11)),  # Sec. 5.3: "computed over 10 independent executions"
    notes="""
Settings of the SAMPa paper's Section 5.3. Not in the paper, so left at the defaults of run_glue.py / transformers:
max_seq_length 128, weight decay 0, no warm-up, AdamW betas (0.9, 0.999) and epsilon 1e-8, evaluation batch 8;
GLUE's validation split is reported (Table 6 does not name the split).
Batch 32 is per process: run each job as one process, or SAMPa on two processes
(--methods sampa-0,sampa-0.1 --launcher "torchrun --nproc_per_node 2"), where each role takes its own batch of 32.
""",
)

if __name__ == "__main__":
    sys.exit(main(GRID))
