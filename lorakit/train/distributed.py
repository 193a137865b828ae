"""Distributed training on PyTorch's own engine: torchrun + DDP, or FSDP2 (`fully_shard`).

Nothing here is home-made: processes come from torchrun, gradients are reduced by DDP or FSDP,
full state dicts are gathered with torch.distributed.checkpoint's helpers.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import TrainingError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, device; ``main`` is rank 0."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(timeout_s: int = 300) -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA).

    A single process (no WORLD_SIZE, or WORLD_SIZE=1) gets DistInfo() and no process group.
    Collectives time out after ``timeout_s`` so a dead rank makes the run fail, not hang.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device="cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, f"cuda:{local_rank}" if cuda else "cpu")


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_sum(info: DistInfo, *values: float) -> list[float]:
    """Sum each number over ranks, all in one collective (identity in a single process)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device != "cpu" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_gather_rows(info: DistInfo | None, t: torch.Tensor) -> torch.Tensor:
    """Every rank's (n, ...) tensor (the same shape on each), concatenated in rank order (collective; the tensor
    itself in a single process)."""
    if info is None or not info.enabled:
        return t
    x = t.to(info.device).contiguous()
    parts = [torch.empty_like(x) for _ in range(info.world)]
    dist.all_gather(parts, x)
    return torch.cat(parts).to(t.device)


def broadcast_object(info: DistInfo, obj):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, info: DistInfo, fsdp: bool) -> nn.Module:
    """DDP (only trainable parameters are bucketed and all-reduced) or FSDP2 per decoder layer."""
    if not info.enabled:
        if fsdp:
            raise TrainingError("--fsdp needs several processes: launch with torchrun or lorakit train --nproc N")
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.local_rank] if info.device != "cpu" else None)
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the longest nn.ModuleList), each its own FSDP unit."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of the trainable parameters; collective under FSDP (call on every rank)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in sd.items() if k in names}
    return {n: p.detach() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run ``lorakit <argv>`` under torchrun with ``nproc`` processes on this machine."""
    if nproc < 1:
        raise TrainingError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lorakit", *argv]
    print("lorakit: launching", " ".join(cmd[2:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, _cores() // nproc))))
    return subprocess.call(cmd, env=env)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)



def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's full state dict on CPU (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_gather_rng(info: DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's torch (and CUDA) RNG state, keyed "torch/<rank>" (collective)."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    states: list = [mine]
    if info.enabled:
        states = [None] * info.world
        dist.all_gather_object(states, mine)
    return {f"{kind}/{rank}": t for rank, st in enumerate(states) for kind, t in st.items()}


def set_rng(info: DistInfo, rng: dict[str, torch.Tensor]) -> None:
    """Restore this rank's RNG from a checkpoint (saved by a run with the same number of processes)."""
    if f"torch/{info.rank}" not in rng:
        raise TrainingError(f"the checkpoint has no RNG state for rank {info.rank}: resume with as many "
                            "processes as the run that wrote it")
    torch.set_rng_state(rng[f"torch/{info.rank}"])
    if torch.cuda.is_available() and f"cuda/{info.rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda/{info.rank}"])
