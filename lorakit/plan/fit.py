"""Will this run fit? The planner's peak for a run's longest micro-batch against the device's free memory,
checked by the trainer before the first step (``lorakit train`` passes ``check_fit`` to ``train``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import read_arch
from .count import count_model, meta_model
from .inputs import OBJECTIVES, PAIR_OBJECTIVES, PlanInputs
from .memory import plan_memory
from .objectives import rollout_rows_in_flight


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
                        device="cuda" if device.startswith("cuda") else "cpu", nproc=nproc, fsdp=cfg.fsdp,
                        **objective_inputs(cfg))
    arch = read_arch(model)
    plan = plan_memory(arch, count_model(model, lcfg), inputs, cfg.dropout)
    mode = "full" if cfg.full else ("qlora" if getattr(cfg, "quantize", None) else "lora")
    peak, free = plan.total(mode), free_bytes(device)
    what = f"{-(-cfg.batch_size // nproc)} x {seq_len} tokens"
    if inputs.objective in PAIR_OBJECTIVES:
        what = f"{inputs.rows} rows (chosen + rejected) x {seq_len} tokens"
    elif inputs.objective == "grpo":  # generation and training take turns: the larger peak counts
        what += (f"; rollouts {plan.rows['rollout phase'][mode].bytes / 2**30:.2f} GiB with "
                 f"{rollout_rows_in_flight(inputs)} rows of KV cache, training "
                 f"{plan.rows['training phase'][mode].bytes / 2**30:.2f} GiB")
    fits = peak <= free
    message = (f"planned peak {peak / 2**30:.2f} GiB for the longest batch ({what}) vs {free / 2**30:.2f} GiB "
               f"free on {device}: " + ("fits" if fits else "may not fit"))
    return Fit(peak, free, fits, message)


def objective_inputs(cfg) -> dict:
    """The PlanInputs fields a recipe's objective sets (``lorakit train --objective`` and its flags)."""
    objective = getattr(cfg, "objective", "sft")
    if objective not in OBJECTIVES:  # a custom objective: plan it as SFT
        return {}
    return {"objective": objective, "precompute_ref": bool(getattr(cfg, "precompute_ref", False)),
            "pair_layout": _pair_layout(cfg),
            "beta": float(getattr(cfg, "beta", 0.0)) if objective == "grpo" else 0.0,
            "completion_len": getattr(cfg, "max_completion_length", 256), "grad_accum": cfg.grad_accum,
            "num_generations": getattr(cfg, "num_generations", 8), "rollout_rows": getattr(cfg, "rollout_rows", 64),
            "num_iterations": getattr(cfg, "num_iterations", 1)}


def _pair_layout(cfg) -> str:
    """The layout a pair objective will run (``--pair-layout``). auto is shared for a transformers model (the
    objective picks shared on SDPA or eager attention, packed on flash-attention); a pair's prompt length is
    not known here, so shared is planned as packed (each prompt twice), the same tokens either way."""
    layout = getattr(cfg, "pair_layout", "padded")
    return "shared" if layout == "auto" else layout
