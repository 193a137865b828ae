"""Training objectives: what the loop minimises and on what data. One small interface
(``base.Objective``), one file per objective; the losses themselves are pure functions over
log-probs in ``train/losses/``.

    "sft"   causal-LM cross-entropy over the completion tokens (the default); with --loss, or a model of
            your own (--model MODULE:FUNCTION), ``custom.OwnLoss``: your loss function, or the same
            cross-entropy over the columns your model takes
    "grpo"  online RL on prompt-only rows: rollouts by the generation core, --reward functions, TRL's GRPO loss
    "dpo"   preference pairs against the base model (adapters off as the reference); "orpo", "simpo":
            reference-free preference losses (``preference.py``)

``make_objective(cfg)`` builds the objective a recipe names.
"""

from __future__ import annotations

import difflib

from ...errors import ConfigError
from .base import Objective, StepLoss
from .custom import OwnLoss
from .grpo import GRPO
from .preference import DPO, ORPO, SimPO
from .sft import CausalLM

OBJECTIVES: dict[str, type[Objective]] = {"sft": CausalLM, "grpo": GRPO, "dpo": DPO, "orpo": ORPO, "simpo": SimPO}


def make_objective(cfg) -> Objective:
    """The objective of ``cfg.objective``, built from the recipe."""
    from ...models.custom import is_custom_spec

    if cfg.objective == "sft" and (cfg.loss or is_custom_spec(cfg.model)):
        return OwnLoss(cfg)
    kind = OBJECTIVES.get(cfg.objective)
    if kind is None:
        close = difflib.get_close_matches(str(cfg.objective), OBJECTIVES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}{hint}")
    return kind(cfg)


__all__ = ["DPO", "GRPO", "OBJECTIVES", "ORPO", "CausalLM", "Objective", "OwnLoss", "SimPO", "StepLoss",
           "make_objective"]
