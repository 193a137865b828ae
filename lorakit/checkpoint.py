"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``step-NNNNNNN`` written under a temporary name and renamed into
place when complete, so the newest *complete* checkpoint is always the highest-numbered
directory, even if a write was cut short.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import TrainingError
from .fileio import _fsync_dir, atomic_write_json, save_safetensors

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: Any, extra: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the ``keep`` newest.

    Args:
        ckpt_dir: the checkpoints/ directory.
        step: optimizer steps done.
        model: its trainable parameters are saved (the LoRA factors, or every weight in full mode).
        opt: optimizer (state tensors to safetensors, hyper-parameters to JSON).
        sched: LR scheduler (state_dict to JSON).
        extra: JSON-able training state (sampler position, best eval, counters).
        keep: how many checkpoints to keep.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=f".step-{step:07d}."))
    try:
        tensors = {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
        opt_tensors, opt_json = _optimizer_tensors(opt)
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_safetensors(tensors, tmp / STATE_TENSORS)
        state = {"step": step, "optimizer": opt_json, "scheduler": sched.state_dict(),
                 "python_rng": _jsonable(random.getstate()), **extra}
        atomic_write_json(tmp / STATE_JSON, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(obj: Any) -> Any:
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _tupled(obj: Any) -> Any:
    return tuple(_tupled(x) for x in obj) if isinstance(obj, list) else obj


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary, unfinished directories start with '.')."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if p.is_dir() and (p / STATE_JSON).is_file()
             and (p / STATE_TENSORS).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``path``; return the JSON state."""
    try:
        state = json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"checkpoint {path}: unreadable {STATE_JSON} ({exc})") from None
    tensors, _ = _read_state(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    if set(saved) != set(params):
        missing = sorted(set(params) ^ set(saved))[:3]
        raise TrainingError(f"checkpoint {path} does not match this run's trainable parameters (e.g. {missing}); "
                            "resume with the same recipe that wrote it")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    opt_state = {"param_groups": state["optimizer"]["param_groups"], "state": {}}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state["state"].setdefault(int(idx), {})[name] = value
    for key, value in state["optimizer"]["scalars"].items():
        idx, name = key.split(".", 1)
        opt_state["state"].setdefault(int(idx), {})[name] = value
    opt.load_state_dict(opt_state)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    random.setstate(_tupled(state["python_rng"]))
    return state


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the state tensors (RNG states are uint8, so not through the adapter reader's float check)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path / STATE_TENSORS)), {}
    except Exception as exc:  # any parse failure means a damaged checkpoint
        raise TrainingError(f"checkpoint {path}: unreadable {STATE_TENSORS} ({exc})") from None
