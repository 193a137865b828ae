"""The interface every training objective implements.

The loop (``train/loop.py``) knows nothing of what it minimises. Per optimizer step it asks the
objective for this rank's micro-batches (``next_step``), back-propagates each micro-batch's
``StepLoss.loss`` (a *sum* over some units: target tokens, pairs, sequences), adds up the units
over micro-batches and ranks in its one collective, and scales the gradients by
``world / units`` — the gradient of the mean over the global batch, however it is split.

A new objective subclasses ``Objective`` and overrides what differs; the defaults are the
causal-LM pieces (``sft.CausalLM`` is the base class with nothing overridden).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...models.attention import packed_attention_for
from ..batches import make_batches
from ..evaluate import eval_loss, loss_sum
from ..inputs import read_splits, tokenize_splits
from ..result import exact_match_on


@dataclass
class StepLoss:
    """One micro-batch's contribution to an optimizer step.

    ``metrics`` maps a name (TRL's, e.g. ``rewards/accuracies``) to ``(sum, count)`` over the
    micro-batch; the loop logs ``sum / count`` over the global batch. Every rank must report the
    same names (they travel in one collective).
    """

    loss: torch.Tensor  # scalar; backward() runs on it: summed over `units`
    units: float  # what `loss` sums over (target tokens, pairs, sequences, micro-batches)
    tokens: int  # real (unpadded) tokens processed, for tokens/s
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


class Objective:
    """Causal-LM cross-entropy over the labelled tokens, on text data: the defaults of every hook.

    Args:
        cfg: the run's ``TrainConfig``.
    """

    name = "sft"
    plotted: tuple[str, ...] = ()  # logged figures loss.png draws beside the loss (a loss function's sub-losses)

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    # -- data: read and checked before the model loads, tokenized once the tokenizer is known --------
    def read(self, cfg, paths) -> dict[str, Any]:
        """The "train" and "eval" records, validated (errors name file:line)."""
        return read_splits(cfg, paths.train, paths.eval)

    def tokenize(self, records: dict[str, Any], tokenizer: Any, cfg, info, progress: bool):
        """(datasets per split, what the token cache did per split)."""
        return tokenize_splits(records, tokenizer, cfg, info, progress)

    def pad_id(self, tokenizer: Any, cfg) -> int:
        """The id right-padding fills input rows with."""
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def make_batches(self, train_ds, cfg, pad_id: int, info):
        """The batch source (``train/batches.py``): padded, length-grouped or packed."""
        return make_batches(train_ds, cfg, pad_id, info)

    # -- the steps ------------------------------------------------------------------------------------
    def attention(self, model: torch.nn.Module, cfg) -> str | None:
        """Switch the model (built, not yet wrapped) to the attention its batches need; the name, or None
        when unchanged. Packed rows (``--packing``) attend per example (``models.attention``)."""
        return packed_attention_for(model) if cfg.packing else None

    def prepare(self, model: torch.nn.Module, tokenizer: Any, cfg, info, progress: bool) -> None:
        """After the model is built and wrapped, before the first step (e.g. reference log-probs)."""

    def next_step(self, source, model: torch.nn.Module, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step ``step + 1``."""
        return source.next_step()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss:
        """Next-token cross-entropy summed over the batch's labelled tokens (``evaluate.loss_sum``)."""
        loss, n = loss_sum(model, batch)
        return StepLoss(loss, n, int(batch["attention_mask"].sum()))

    def step_done(self) -> dict[str, float]:
        """Called after every optimizer step: figures of the step just finished, logged with it as they are
        (this process's own, not summed over processes: e.g. how its time split)."""
        return {}

    def samples(self) -> list[dict[str, Any]]:
        """A few examples of the step just finished for samples.jsonl and the trackers (GRPO's completions with
        their rewards), each handed over once; [] for none."""
        return []

    # -- evaluation, before/after score, resume -------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, eval_ds, cfg, pad_id: int, info) -> dict[str, float]:
        """Validation figures; ``eval_loss`` (lower is better) drives best-checkpoint and patience."""
        return {"eval_loss": eval_loss(model, eval_ds, cfg.batch_size, pad_id, cfg.eval_batches, info)}

    def score(self, model: torch.nn.Module, tokenizer: Any, test_path: Path | None, cfg,
              progress: bool) -> dict[str, Any] | None:
        """The held-out figures printed before/after (greedy exact match on the test file)."""
        return exact_match_on(model, tokenizer, test_path, cfg, progress)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold for an exact resume (JSON-able)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def mean_metrics(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``{name: sum / count}``; NaN where nothing was counted."""
    return {k: (s / c if c else math.nan) for k, (s, c) in sums.items()}
