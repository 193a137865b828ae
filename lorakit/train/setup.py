"""A run's set-up, before the first step: output directory, data paths, base dtype, the model
(the *model builder*), the optimizer and its schedule. The loop (``loop.py``) calls these once."""

from __future__ import annotations

import fcntl
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TrainingError
from ..models.dtype import resolve_dtype as resolve_base_dtype
from .checkpoint import list_checkpoints
from .recipe import TrainConfig
from .variants import add_neftune, loraplus_groups


@dataclass
class DataPaths:
    train: Path
    eval: Path | None
    test: Path | None


def resolve_data(cfg: TrainConfig) -> DataPaths:
    """Paths of the train / validation / test files; a packaged task name fills in all three."""
    from ..data.tasks import task_names, task_path

    if not Path(cfg.data).exists() and cfg.data in task_names():
        return DataPaths(task_path(cfg.data, "train"),
                         Path(cfg.eval_data) if cfg.eval_data else task_path(cfg.data, "valid"),
                         Path(cfg.test_data) if cfg.test_data else task_path(cfg.data, "test"))
    return DataPaths(Path(cfg.data), Path(cfg.eval_data) if cfg.eval_data else None,
                     Path(cfg.test_data) if cfg.test_data else None)


def prepare_out(out: Path, resume: bool) -> int:
    """Create the output directory, prove it is writable, and lock it for this run before any work is done.

    Returns the lock's file descriptor: the run holds an exclusive ``flock`` on ``out/.lock`` for its
    life (close the descriptor to release it). The OS drops it when the process dies, kill -9
    included, so a later ``--resume`` is never locked out by a dead run.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"--out {out}: not writable ({exc.strerror or exc}); choose another directory") from None
    lock = lock_out_dir(out)
    if not resume and list_checkpoints(out / "checkpoints"):
        os.close(lock)
        raise TrainingError(f"--out {out} already holds checkpoints of a run; pass --resume to continue it, "
                            "or choose a new --out")
    return lock


def lock_out_dir(out: Path) -> int:
    """Take the exclusive lock on ``out`` or fail naming the process that holds it."""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise TrainingError(f"--out {out} is in use by another training run (pid {holder}); wait for it to "
                            "finish, stop it, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def resolve_dtype(cfg: TrainConfig, device: str) -> tuple[str, str]:
    """(dtype name, why) for the frozen base: ``cfg.dtype``, or for "auto" the rule every verb shares
    (:func:`lorakit.models.dtype.resolve_dtype`), except that --full keeps float32."""
    if cfg.dtype == "auto" and cfg.full:
        return "float32", "auto: --full trains every weight, kept in float32"
    name, why = resolve_base_dtype(cfg.dtype, device)
    return name, why + ("; LoRA weights stay float32" if name == "bfloat16" and cfg.dtype == "auto" else "")


def build_model(cfg: TrainConfig, dtype: str = "float32"):
    """Load the model (base weights in ``dtype``) and tokenizer, quantize its Linears (--quantize),
    then inject LoRA (or unfreeze everything for --full). A model of your own (``MODULE:FUNCTION``) is
    built by its function and gets ``--weights`` before anything else (``build_custom``)."""
    from ..models.custom import is_custom_spec
    from ..models.load import base_model_id, load_model

    custom = is_custom_spec(cfg.model)
    if custom:
        model, tokenizer = build_custom(cfg, dtype)
    elif cfg.weights or cfg.allow_missing_keys:
        raise TrainingError(f"--weights loads a state dict into a model built by --model MODULE:FUNCTION; {cfg.model} "
                            "brings its own weights (drop --weights)")
    else:
        model, tokenizer = load_model(cfg.model, dtype=dtype)
    if cfg.quantize:  # deterministic: a resumed run gets the same bits
        from ..lora.quantize import quantize

        quantize(model, cfg.quantize, cfg.double_quant)
    if cfg.gradient_checkpointing is True:  # "auto" is decided before the first step (check_fit)
        enable_checkpointing(model)
    if cfg.neftune_alpha:  # NEFTune noises the input embeddings for LoRA and full fine-tuning alike
        add_neftune(model, cfg.neftune_alpha)
    if cfg.full:
        model.requires_grad_(True)
        return model, tokenizer
    adapt(model, cfg, model.name_or_path if custom else base_model_id(cfg.model), None if custom else "CAUSAL_LM")
    set_lora_compute(model, cfg, dtype)
    return model, tokenizer


def set_lora_compute(model: torch.nn.Module, cfg: TrainConfig, dtype: str | torch.dtype) -> None:
    """LoRA's matmuls in bf16 on a bf16 base unless the recipe says float32 (``lora_compute``);
    a bf16 compute on another base is refused."""
    from ..lora.layer import set_compute_dtype
    from ..models.dtype import parse_dtype

    dtype = parse_dtype(dtype)
    if cfg.lora_compute == "bfloat16" and dtype != "bfloat16":
        raise TrainingError(f"lora_compute bfloat16 runs LoRA in a bf16 base's dtype, but the base is {dtype}: "
                            "use --dtype bfloat16, or --lora-compute auto")
    half = dtype == "bfloat16" and cfg.lora_compute != "float32"
    set_compute_dtype(model, torch.bfloat16 if half else None)


def build_custom(cfg: TrainConfig, dtype: str):
    """A model of your own: ``FUNCTION()`` of ``--model MODULE:FUNCTION``, then ``--weights`` (keys checked),
    its floating-point weights cast to ``dtype``."""
    from ..models.custom import load_custom

    unsupported = {"--full": cfg.full, "--gradient-checkpointing": cfg.gradient_checkpointing is True,
                   "--neftune-alpha": bool(cfg.neftune_alpha)}
    named = [flag for flag, on in unsupported.items() if on]
    if named:
        raise TrainingError(f"{', '.join(named)}: for transformers models only (they use its save_pretrained, "
                            f"checkpointing and input-embedding hooks); {cfg.model} is a model of your own. Drop "
                            f"{'it' if len(named) == 1 else 'them'}")
    model, tokenizer = load_custom(cfg.model, cfg.weights, cfg.allow_missing_keys)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    return model, tokenizer


def adapt(model: torch.nn.Module, cfg: TrainConfig, base: str | None, task_type: str | None):
    """Inject LoRA as the recipe says (rank, alpha, targets, modules_to_save, variants): the base frozen.

    Args:
        model: the model, pretrained weights loaded.
        cfg: the recipe.
        base: what the adapter records as its base model (``base_model_name_or_path``).
        task_type: PEFT's task type ("CAUSAL_LM" for transformers LMs; None for a model of your own).
    """
    from ..lora.config import LoraConfig, target_modules_from_flags, token_indices_from_flags
    from ..lora.inject import inject

    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=target_modules_from_flags(cfg.target_modules),
                      modules_to_save=list(cfg.modules_to_save) or None,
                      trainable_token_indices=token_indices_from_flags(cfg.trainable_token_indices),
                      use_rslora=cfg.rslora, use_dora=cfg.dora, init_lora_weights=cfg.lora_init(), bias=cfg.bias,
                      base_model_name_or_path=base, task_type=task_type)
    return inject(model, lcfg)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing in every decoder block of a transformers model, non-reentrant: the
    reentrant variant needs block inputs that require grad (PEFT's pitfall with frozen bases)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_space(out: Path, model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Refuse to start when the disk cannot hold the checkpoints and the result (known up front)."""
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    # a checkpoint holds the parameters and two AdamW moments; keep+1 exist while the newest is written
    need = trainable * 3 * (cfg.keep_checkpoints + 1) + trainable
    free = shutil.disk_usage(out).free
    if free < need:
        raise TrainingError(f"--out {out}: {free / 2**20:.0f} MiB free, but checkpoints and the result need about "
                            f"{need / 2**20:.0f} MiB; free space, lower --keep-checkpoints, or choose another --out")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the LoRA factors, or every weight with --full); with
    --loraplus-lr-ratio, PEFT's LoRA+ parameter groups (lorakit.train.variants.loraplus_groups)."""
    if cfg.loraplus_lr_ratio and not cfg.full:
        groups = loraplus_groups(model, cfg.lr, cfg.loraplus_lr_ratio, cfg.loraplus_lr_embedding, cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, or epochs × steps per epoch (rounded up)."""
    return max(1, math.ceil(cfg.epochs * steps_per_epoch)) if cfg.epochs else cfg.max_steps


def lr_lambda(cfg: TrainConfig, total: int):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at step ``total``."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def describe_base(model: torch.nn.Module, dtype: str, why: str) -> str:
    """One line for the start of a run: the base's dtype and, when quantized, how."""
    from ..lora.quantized import describe

    q = describe(model)
    if q is None:
        return f"base weights in {dtype} ({why})"
    dq = " with double-quantized scales" if q["double_quant"] else ""
    return (f"base quantized to {q['method']}{dq} by bitsandbytes: {q['layers']} Linear layers (all but the output "
            f"head), computing in {q['compute_dtype']}; embeddings, norms and head in {dtype} ({why})")
