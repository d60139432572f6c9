"""Several processes: the plan, collectives with deadlines, the role exchange, FSDP2, and the layouts.

`layouts/` holds one strategy per layout (one process, data parallel, two roles, FSDP2, FSDP2 with two roles):
how gradients are averaged, how norms are reduced, where method state lives and how it is checkpointed, how
the data is read per rank, and what each refuses. Nothing here imports a method: methods ask their layout.
"""
