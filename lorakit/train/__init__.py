"""Training: the recipe (``TrainConfig``), the flat resumable loop, checkpoints, evaluation
(loss, exact match, generation), torchrun set-up (DDP / FSDP2) and the run's plots; the objectives
(``objectives/``), their pure losses (``losses/``) and GRPO's reward functions (``rewards.py``).

Imports: the foundation, ``lora``, ``models``, ``data``, ``generate`` (GRPO's rollouts).
"""
