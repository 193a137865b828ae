"""Your own loss, or your own model: the batch's columns go to the model and the loss by name.

``--loss MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``) names ``fn(model, batch) -> Tensor | dict``:
a scalar, or ``{"loss": scalar, name: scalar, ...}`` whose other entries are logged beside the loss
(metrics.jsonl, trackers, loss.png) and in evaluation as ``eval_<name>``. The value is read as the
mean over the micro-batch's rows: lorakit weights each micro-batch by its rows (units = rows), so
the optimizer step minimises the row-weighted mean over the global batch however it is split into
micro-batches and processes (exactly the same figure when the function's own mean is over rows).

Without one: causal-LM cross-entropy over the shifted ``labels`` (``input_ids`` where there are no
labels, padding left out), mean over the global batch's target tokens, as ``sft`` computes it; the
model gets every other column its ``forward`` accepts and returns logits (a tensor, a tuple or an
object with ``.logits``) shaped like the labels plus the vocabulary.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...data.pretokenized import parse_pad_values
from ...data.tokenize import IGNORE_INDEX
from ...errors import ConfigError, TrainingError
from ..evaluate import loss_sum
from .base import StepLoss
from .sft import CausalLM

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any]
TEXT_COLUMNS = {"input_ids", "labels", "attention_mask"}


def resolve_loss(spec: str) -> LossFn:
    """The function ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION`` names, imported.

    Args:
        spec: the ``--loss`` value.
    """
    from ...errors import ModelLoadError
    from ...models.custom import is_custom_spec, resolve_builder

    if not is_custom_spec(spec):
        raise ConfigError(f"--loss {spec!r}: expected MODULE:FUNCTION (an importable module, e.g. mypkg.tts:loss) "
                          "or path/to/file.py:FUNCTION; FUNCTION(model, batch) returns a loss tensor or a dict "
                          "holding 'loss'")
    try:
        return resolve_builder(spec)
    except ModelLoadError as exc:
        raise ConfigError(f"--loss {spec}: {exc}") from None


class OwnLoss(CausalLM):
    """A user's loss function (``fn``, or ``cfg.loss``), else causal-LM cross-entropy on any model.

    Args:
        cfg: the run's ``TrainConfig``.
        fn: the loss function itself (the Python API); None reads ``cfg.loss``.
    """

    name = "custom"

    def __init__(self, cfg, fn: LossFn | None = None) -> None:
        super().__init__(cfg)
        self.fn = fn if fn is not None else resolve_loss(cfg.loss) if cfg.loss else None
        if self.fn is None:
            self.name = "sft"  # the default loss on a model of your own

    def pad_id(self, tokenizer: Any, cfg) -> int:
        """``--pad-value input_ids=V``, else the tokenizer's pad (or eos) id, else 0 (no tokenizer)."""
        pads = parse_pad_values(cfg.pad_value)
        if "input_ids" in pads:
            return int(pads["input_ids"])
        if tokenizer is None:
            return 0
        return super().pad_id(tokenizer, cfg)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss:
        if self.fn is None:
            total, n = default_loss_sum(model, batch)
            return StepLoss(total, n, tokens_in(batch))
        value, parts = call_loss(self.fn, model, batch)
        self.plotted = tuple(dict.fromkeys([*self.plotted, *parts]))
        rows = rows_in(batch)
        return StepLoss(value * rows, rows, tokens_in(batch), {k: (v * rows, rows) for k, v in parts.items()})

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, eval_ds, cfg, pad_id: int, info) -> dict[str, float]:
        """``eval_loss`` (and ``eval_<name>`` for each sub-loss): means over the validation set, weighted
        as in training (target tokens for the default loss, rows for a function's)."""
        from ...data.batching import collate
        from ..distributed import DistInfo, all_sum

        info = info or DistInfo()
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        starts = range(0, len(eval_ds), cfg.batch_size)
        for start in list(starts)[:cfg.eval_batches or None]:
            rows = list(range(start, min(start + cfg.batch_size, len(eval_ds))))[info.rank::info.world]
            empty = not rows  # a short last batch: FSDP still needs this rank in the forward, counted as nothing
            part = self.loss(model, collate([eval_ds[i] for i in rows or [start]], pad_id))
            weight = 0.0 if empty else 1.0
            sums["loss"] = sums.get("loss", 0.0) + weight * float(part.loss)
            sums["units"] = sums.get("units", 0.0) + weight * part.units
            for k, (s, c) in part.metrics.items():
                sums[k], sums[k + "/n"] = sums.get(k, 0.0) + weight * s, sums.get(k + "/n", 0.0) + weight * c
        model.train(was_training)
        names = sorted(sums)
        total = dict(zip(names, all_sum(info, *(sums[k] for k in names)), strict=True))
        figures = {"eval_loss": total["loss"] / total["units"] if total.get("units") else math.nan}
        for k in names:
            if k not in ("loss", "units") and not k.endswith("/n"):
                figures[f"eval_{k}"] = total[k] / total[k + "/n"] if total[k + "/n"] else math.nan
        return figures

    def score(self, model: torch.nn.Module, tokenizer: Any, test_path: Path | None, cfg,
              progress: bool) -> dict[str, Any] | None:
        """Greedy exact match needs text: a tokenizer and a model that generates; skipped otherwise."""
        if tokenizer is None or not hasattr(model, "generate"):
            return None
        return super().score(model, tokenizer, test_path, cfg, progress)


def call_loss(fn: LossFn, model: torch.nn.Module, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """(the loss tensor, {sub-loss name: value}) of one call of a user's loss function, checked."""
    out = fn(model, batch)
    where = getattr(fn, "__qualname__", repr(fn))
    if isinstance(out, dict):
        if "loss" not in out:
            raise TrainingError(f"the loss function {where} returned a dict without 'loss' (keys: {sorted(out)}); "
                                "put the value to minimise under 'loss'")
        parts = {k: v for k, v in out.items() if k != "loss"}
        value = out["loss"]
    else:
        value, parts = out, {}
    if not (isinstance(value, torch.Tensor) and value.numel() == 1):
        raise TrainingError(f"the loss function {where} returned {_what(value)} as the loss; expected a scalar "
                            "tensor (the mean over the batch)")
    figures = {}
    for k, v in parts.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = float(v.detach())
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TrainingError(f"the loss function {where} returned {_what(v)} under {k!r}; sub-losses are scalar "
                                "tensors or numbers")
        figures[str(k)] = float(v)
    return value.reshape(()), figures


def _what(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def default_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over the labelled positions of ``batch``, and their count.

    A transformers causal LM on text columns takes ``evaluate.loss_sum`` (its fused head). Any other
    model gets the columns its forward accepts (labels excepted) and must return logits
    (B, ..., T, V) for labels (B, ..., T); position t predicts label t + 1 along the time axis.
    """
    if set(batch) <= TEXT_COLUMNS and "labels" in batch and _is_transformers(model):
        return loss_sum(model, batch)
    labels = batch.get("labels")
    if labels is None:
        if "input_ids" not in batch:
            raise TrainingError(f"the default loss needs 'labels' or 'input_ids' in the rows (found "
                                f"{sorted(batch)}); add them, or pass your own --loss MODULE:FUNCTION")
        labels = batch["input_ids"].masked_fill(_time_mask(batch) == 0, IGNORE_INDEX)
    out = model(**model_kwargs(model, batch))
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.shape[:-1] != labels.shape:
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TrainingError(f"the default loss needs logits shaped like the labels {tuple(labels.shape)} plus the "
                            f"vocabulary; the model returned {found}. Pass your own --loss MODULE:FUNCTION")
    logits, labels = logits[..., :-1, :], labels[..., 1:]  # (B, ..., T-1, V): position t predicts t + 1
    n = int((labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def _time_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The attention mask broadcast over input_ids' streams: (B, T) or (B, 1, T)."""
    mask = batch["attention_mask"]
    return mask if batch["input_ids"].dim() == 2 else mask[:, None, :]


def _is_transformers(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", model)
    return hasattr(getattr(inner, "config", None), "model_type") and hasattr(inner, "get_output_embeddings")


def model_kwargs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's columns the model's forward takes by name (all of them when it takes ``**kwargs``),
    labels left out (the loss is taken here)."""
    inner = getattr(model, "module", model)  # DDP's own forward takes *args
    names, open_ended = _forward_params(type(inner))
    return {k: v for k, v in batch.items() if k != "labels" and (open_ended or k in names)}


@functools.cache
def _forward_params(cls: type) -> tuple[frozenset[str], bool]:
    params = inspect.signature(cls.forward).parameters.values()
    return frozenset(p.name for p in params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def rows_in(batch: dict[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Real steps of time in the batch (for tokens/s): the attention mask's ones, else rows × the widest
    column's steps."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return rows_in(batch) * max((v.shape[-1] for v in batch.values() if v.dim() > 1), default=1)
