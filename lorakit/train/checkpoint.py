"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``step-NNNNNNN`` written under a temporary name and renamed into
place when complete, so the newest *complete* checkpoint is always the highest-numbered
directory, even if a write was cut short. This module only reads and writes files; gathering
state from a (possibly sharded) model is the trainer's job.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from ..fileio import _fsync_dir, atomic_write_json, save_safetensors

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def _split_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict (keyed by parameter name) → tensors and a JSON-able rest."""
    tensors, scalars = {}, {}
    for pname, st in opt_state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt/{pname}/{key}"] = value
            else:
                scalars.setdefault(str(pname), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def save_checkpoint(ckpt_dir: Path, step: int, params: dict[str, torch.Tensor], opt_state: dict[str, Any],
                    rng: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the ``keep`` newest.

    Args:
        ckpt_dir: the checkpoints/ directory.
        step: optimizer steps done.
        params: full trainable parameters by name (the LoRA factors, or every weight in full mode).
        opt_state: full optimizer state dict keyed by parameter name.
        rng: RNG state tensors by name (e.g. "torch/0").
        state: JSON-able training state (step, scheduler, sampler position, counters).
        keep: how many checkpoints to keep.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=f".step-{step:07d}."))
    try:
        opt_tensors, opt_json = _split_optimizer(opt_state)
        tensors = {**{f"model/{n}": t for n, t in params.items()}, **opt_tensors,
                   **{f"rng/{n}": t for n, t in rng.items()}}
        save_safetensors(tensors, tmp / STATE_TENSORS)
        atomic_write_json(tmp / STATE_JSON, {**state, "step": step, "optimizer": opt_json})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        doomed = old.with_name(f".{old.name}.old")  # renamed first: a kill mid-delete leaves only a dot-dir
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary, unfinished directories start with '.')."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if p.is_dir() and (p / STATE_JSON).is_file()
             and (p / STATE_TENSORS).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor],
                                         dict[str, Any]]:
    """(params, optimizer state dict, rng tensors, JSON state) of a checkpoint directory."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as exc:  # any parse failure means a damaged checkpoint
        raise TrainingError(f"checkpoint {path}: unreadable ({type(exc).__name__}: {exc})") from None
    params = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng/")}
    opt = state.pop("optimizer")
    opt_state: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            pname, name = key[4:].rsplit("/", 1)
            opt_state["state"].setdefault(pname, {})[name] = value
    for pname, values in opt["scalars"].items():
        opt_state["state"].setdefault(pname, {}).update(values)
    return params, opt_state, rng, state
