"""Will this run fit? The planner's peak for a run's longest micro-batch against the device's free memory,
checked by the trainer before the first step (``lorakit train`` passes ``check_fit`` to ``train``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import read_arch
from .count import count_model, meta_model
from .memory import PlanInputs, plan_memory


@dataclass(frozen=True)
class Fit:
    """The verdict: planned peak and free bytes, whether it fits, and a line for the user."""

    peak: float
    free: float
    fits: bool
    message: str


def free_bytes(device: str) -> float:
    """Memory the run can have: free + already allocated on a CUDA device (the loaded model is part of
    the planned peak); on CPU, MemAvailable plus this process's resident memory."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free + torch.cuda.memory_allocated(torch.device(device)))
    page = 4096
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * page
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return float(int(meminfo["MemAvailable"].split()[0]) * 1024 + resident)


def check_fit(cfg, dtype: str, device: str, seq_len: int, label_fraction: float, nproc: int = 1) -> Fit:
    """Plan the peak of one training step on the run's longest micro-batch and compare it with free memory.

    Args:
        cfg: the TrainConfig (model, LoRA settings, batch_size, packing, gradient_checkpointing, fsdp, full).
        dtype: the base weights' dtype name.
        device: "cpu" or "cuda[:N]".
        seq_len: the longest micro-batch's width (max_seq_len when packing).
        label_fraction: share of tokens that carry a label.
        nproc: processes; batch_size is the global batch, each takes its rows.
    """
    from ..lora.config import LoraConfig, target_modules_from_flags

    model = meta_model(cfg.model)
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=target_modules_from_flags(cfg.target_modules), use_rslora=cfg.rslora)
    inputs = PlanInputs(batch_size=cfg.batch_size, seq_len=seq_len, dtype=dtype, optimizer="adamw",
                        grad_checkpointing=cfg.gradient_checkpointing is True,
                        label_fraction=min(1.0, max(label_fraction, 1e-6)), padded=not cfg.packing,
                        device="cuda" if device.startswith("cuda") else "cpu", nproc=nproc, fsdp=cfg.fsdp)
    arch = read_arch(model)
    plan = plan_memory(arch, count_model(model, lcfg), inputs, cfg.dropout)
    mode = "full" if cfg.full else ("qlora" if getattr(cfg, "quantize", None) else "lora")
    peak, free = plan.total(mode), free_bytes(device)
    rollouts = ""
    if getattr(cfg, "objective", "sft") == "grpo":  # generation and training take turns: the larger peak counts
        held = sum(plan.rows[r][mode].bytes for r in ("weights", "gradients", "optimizer"))
        cache = rollout_bytes(arch, cfg.rollout_rows, seq_len, inputs.e)
        peak = max(peak, held + cache)
        rollouts = f"; rollouts: {cfg.rollout_rows} rows of KV cache and logits {cache / 2**30:.2f} GiB"
    fits = peak <= free
    message = (f"planned peak {peak / 2**30:.2f} GiB for the longest batch ({-(-cfg.batch_size // nproc)} x "
               f"{seq_len} tokens{rollouts}) vs {free / 2**30:.2f} GiB free on {device}: "
               + ("fits" if fits else "may not fit"))
    return Fit(peak, free, fits, message)


def rollout_bytes(arch, rows: int, seq_len: int, e: int) -> float:
    """Generation's transient memory for ``rows`` rows of ``seq_len`` tokens: the KV cache (keys and values of
    every layer, in the model dtype) and one decoding step's fp32 logits and sampling probabilities."""
    return rows * seq_len * arch.layers * 2 * arch.kv_heads * arch.head_dim * e + rows * arch.vocab * 4 * 2
