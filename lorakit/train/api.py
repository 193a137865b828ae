"""Training from Python: a model in memory, rows in memory (or a file), the same run as ``lorakit train``.

    import lorakit as lk
    summary = lk.fit(model, rows, loss_fn, out="runs/tts", r=8, target_modules=["wqkv", "wo"], max_steps=500)

The rows are written into the run directory (``out/data/train.jsonl``), so the run reads, checkpoints,
resumes (``resume=True``) and reports exactly as a CLI run on that file does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..fileio import atomic_write_text, replace_dir
from .recipe import TrainConfig

Rows = Any  # a list of row dicts, a datasets.Dataset, or a data file / directory path


def fit(model: torch.nn.Module, rows: Rows, loss_fn=None, *, eval_rows: Rows | None = None, tokenizer: Any = None,
        lora=None, out: str | os.PathLike = "runs/custom", progress: bool = True, **recipe: Any) -> dict[str, Any]:
    """Train ``model`` (LoRA injected here, or already) on ``rows`` and return the run's summary.

    Args:
        model: any ``nn.Module``. With lorakit adapters in it already, they are trained as they are;
            else ``lora`` (a ``LoraConfig``) is injected, or one made from the recipe fields (``r``,
            ``alpha``, ``target_modules``, ``modules_to_save`` ...), with the base frozen.
        rows: a list of row dicts, pre-tokenized (``input_ids`` / your model's columns, lists, arrays or
            tensors) or in a text format (with ``tokenizer``); a ``datasets.Dataset``; or a data file /
            directory path.
        loss_fn: ``fn(model, batch) -> Tensor | dict`` (the contract of ``--loss``); None: causal-LM
            cross-entropy over the shifted labels.
        eval_rows: validation rows in the same form (evaluated every ``eval_every`` steps and at the end).
        tokenizer: needed only for text rows and the held-out exact-match score.
        lora: a ``lorakit.LoraConfig`` to inject; None: from the recipe fields.
        out: the run directory (adapter/, checkpoints/, metrics.jsonl, loss.png, summary.json).
        progress: show progress bars.
        **recipe: any ``TrainConfig`` field (``max_steps``, ``batch_size``, ``lr``, ``resume`` ...) except
            model, data and eval_data.

    Returns:
        The summary ``lorakit train`` writes to ``out/summary.json``.
    """
    from ..lora.adapters import list_adapters
    from ..lora.inject import inject
    from .loop import train
    from .objectives.custom import OwnLoss
    from .setup import adapt

    taken = sorted({"model", "data", "eval_data", "loss"} & set(recipe))
    if taken:
        raise ConfigError(f"fit(): {', '.join(taken)} come from the arguments (model, rows, eval_rows, loss_fn); drop "
                          "them from the recipe fields")
    out = Path(out)
    name = getattr(model, "name_or_path", None) or f"{type(model).__module__}.{type(model).__qualname__}"
    cfg = TrainConfig(model=str(name), out=str(out), data=str(_rows_file(rows, out, "train")),
                      eval_data=str(_rows_file(eval_rows, out, "eval")) if eval_rows is not None else None, **recipe)
    if cfg.full and not hasattr(model, "save_pretrained"):
        raise ConfigError("full=True saves a transformers model directory (save_pretrained); this model has none. "
                          "Train LoRA adapters instead (the default)")
    # LoRA's initialisation draws from torch's generator as it stands: a builder that seeds itself (or a
    # torch.manual_seed before it) gives the adapter `lorakit train --model MODULE:FUNCTION` starts from
    if cfg.full:
        model.requires_grad_(True)
    elif list_adapters(model):
        if lora is not None:
            raise ConfigError(f"the model has adapters already ({', '.join(list_adapters(model))}); pass lora=None to "
                              "train them, or a model without adapters")
    elif lora is not None:
        inject(model, lora)
    else:
        adapt(model, cfg, str(name), None)
    return train(cfg, progress, model=model, tokenizer=tokenizer, objective=OwnLoss(cfg, fn=loss_fn))


def _rows_file(rows: Rows, out: Path, split: str) -> Path:
    """A path as given; a list of rows written to ``out/data/<split>.jsonl`` (arrays and tensors as lists), a
    ``datasets.Dataset`` saved to ``out/data/<split>/``."""
    if isinstance(rows, (str, os.PathLike)):
        return Path(rows)
    if hasattr(rows, "save_to_disk"):
        path, tmp = out / "data" / split, out / "data" / f".{split}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        rows.save_to_disk(str(tmp))
        replace_dir(tmp, path)
        return path
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"fit(): {split} rows must be a non-empty list of dicts, a datasets.Dataset or a data "
                          f"file path, got "
                          f"{type(rows).__name__}")
    path = out / "data" / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({k: _plain(v) for k, v in r.items()}) + "\n" for r in rows))
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value
