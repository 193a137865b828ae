"""Supervised fine-tuning: causal-LM cross-entropy on the completion tokens (the default objective).

Everything is ``Objective``'s default; this name is what recipes and ``--objective sft`` mean.
"""

from __future__ import annotations

from .base import Objective


class CausalLM(Objective):
    """Next-token cross-entropy over the labelled tokens (-100 elsewhere), mean over the global batch's
    target tokens."""

    name = "sft"
