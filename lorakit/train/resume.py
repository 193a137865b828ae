"""Checkpoints inside a run: what one holds (gathered from every rank), restoring one, and cleaning
up what a killed write left behind. The files themselves are ``checkpoint.py``'s business."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import TrainingError
from .checkpoint import list_checkpoints, read_checkpoint


def clean_partial_checkpoints(ckpt_dir: Path) -> None:
    """Remove what a killed checkpoint write or prune left: temp dot-dirs and incomplete step dirs."""
    if not ckpt_dir.is_dir():
        return
    complete = set(list_checkpoints(ckpt_dir))
    for path in [*ckpt_dir.glob(".step-*"), *ckpt_dir.glob("step-*")]:
        if path not in complete:
            shutil.rmtree(path, ignore_errors=True)


def gather_state(model, opt, sched, batches, st: dict, info) -> tuple:
    """Everything a checkpoint holds, as full (unsharded) tensors; collective, call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from .distributed import all_gather_rng, full_trainable_state

    params = full_trainable_state(model)
    opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
    rng = all_gather_rng(info)
    state = {"scheduler": sched.state_dict(), "sampler": batches.state_dict(), "train_state": st,
             "world_size": info.world}
    return params, opt_state, rng, state


def restore(path: Path, model, opt, sched, batches, info) -> tuple[int, dict]:
    """Load a checkpoint into (possibly wrapped) model, optimizer, scheduler, batch source and RNG."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from .distributed import set_rng

    params, opt_state, rng, state = read_checkpoint(path)
    mine = {n for n, p in model.named_parameters() if p.requires_grad}
    mine = {n.removeprefix("module.") for n in mine}
    if set(params) != mine:
        raise TrainingError(f"checkpoint {path} does not match this run's trainable parameters "
                            f"(e.g. {sorted(set(params) ^ mine)[:2]}); resume with the recipe that wrote it")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, params, options=opts)
    set_optimizer_state_dict(model, opt, optim_state_dict=opt_state, options=opts)
    sched.load_state_dict(state["scheduler"])
    batches.load_state_dict(state["sampler"])
    set_rng(info, rng)
    return state["step"], state["train_state"]
