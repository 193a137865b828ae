"""Training: the recipe (``TrainConfig``), the flat resumable loop, checkpoints, evaluation
(loss, exact match, generation), torchrun set-up (DDP / FSDP2) and the run's plots.

Imports: the foundation, ``lora``, ``models``, ``data``.
"""
