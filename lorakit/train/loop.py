"""The training loop: one flat function, resumable, LoRA or full fine-tuning.

    recipe ──► data (checked before the model loads) ──► model + LoRA ──► steps ──► adapter/
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.core import IGNORE_INDEX, BatchSampler, collate, load_jsonl, tokenize_examples
from ..errors import TrainingError
from ..fileio import atomic_write_json, atomic_write_text, replace_dir
from .checkpoint import list_checkpoints, read_checkpoint, save_checkpoint
from .evaluate import eval_loss, exact_match_score, loss_sum
from .recipe import TrainConfig, save_recipe

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at max_steps."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def prepare_out(out: Path, resume: bool) -> None:
    """Create the output directory and prove it is writable before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"--out {out}: not writable ({exc.strerror or exc}); choose another directory") from None
    if not resume and list_checkpoints(out / "checkpoints"):
        raise TrainingError(f"--out {out} already holds checkpoints of a run; pass --resume to continue it, "
                            "or choose a new --out")


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (then a bf16 frozen base pays: ~4x the fp32
    GEMM rate on an AVX512-BF16 CPU, measured in bench/; without bf16 units bf16 is emulated and slower)."""
    if device.startswith("cuda"):  # emulated bf16 (e.g. a T4) does not count: it is slower than fp16/fp32 there
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own capability probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(cfg: TrainConfig, device: str) -> tuple[str, str]:
    """(dtype name, why) for the frozen base: ``cfg.dtype`` unless it is "auto"."""
    if cfg.dtype != "auto":
        return cfg.dtype, "as configured"
    if cfg.full:
        return "float32", "auto: --full trains every weight, kept in float32"
    if native_bf16(device):
        return "bfloat16", f"auto: {device} computes bf16 natively; LoRA weights stay float32"
    return "float32", f"auto: {device} has no native bf16 units"


def build_model(cfg: TrainConfig, dtype: str = "float32"):
    """Load the model (base weights in ``dtype``) and tokenizer, then inject LoRA (or unfreeze
    everything for --full)."""
    from ..lora.config import LoraConfig, target_modules_from_flags
    from ..lora.inject import inject
    from ..models.load import load_model

    model, tokenizer = load_model(cfg.model, dtype=_DTYPES[dtype])
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.full:
        model.requires_grad_(True)
        return model, tokenizer
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=target_modules_from_flags(cfg.target_modules),
                      use_rslora=cfg.rslora, base_model_name_or_path=cfg.model, task_type="CAUSAL_LM")
    inject(model, lcfg)
    return model, tokenizer


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing in every decoder block of a transformers model, non-reentrant: the
    reentrant variant needs block inputs that require grad (PEFT's pitfall with frozen bases)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint (and a line cut by a kill) from the log."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the last line of a process killed mid-write
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def check_space(out: Path, model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Refuse to start when the disk cannot hold the checkpoints and the result (known up front)."""
    import shutil

    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    # a checkpoint holds the parameters and two AdamW moments; keep+1 exist while the newest is written
    need = trainable * 3 * (cfg.keep_checkpoints + 1) + trainable
    free = shutil.disk_usage(out).free
    if free < need:
        raise TrainingError(f"--out {out}: {free / 2**20:.0f} MiB free, but checkpoints and the result need about "
                            f"{need / 2**20:.0f} MiB; free space, lower --keep-checkpoints, or choose another --out")


def _clean_partial_checkpoints(ckpt_dir: Path) -> None:
    """Remove what a killed checkpoint write or prune left: temp dot-dirs and incomplete step dirs."""
    import shutil

    if not ckpt_dir.is_dir():
        return
    complete = set(list_checkpoints(ckpt_dir))
    for path in [*ckpt_dir.glob(".step-*"), *ckpt_dir.glob("step-*")]:
        if path not in complete:
            shutil.rmtree(path, ignore_errors=True)


def score(model, tokenizer, path: Path | None, cfg: TrainConfig, progress: bool = True) -> dict[str, Any] | None:
    """Greedy exact match on the test file (None when there is none)."""
    if path is None:
        return None
    records = load_jsonl(path)
    if cfg.score_limit:
        records = records[:cfg.score_limit]
    return exact_match_score(model, tokenizer, records, cfg.max_new_tokens, progress=progress)


def save_result(model, tokenizer, out: Path, cfg: TrainConfig, info) -> Path:
    """The run's product: a PEFT adapter directory, or a full model directory for --full.

    Collective under FSDP (the full tensors are gathered on every rank); rank 0 writes.
    """
    from .distributed import full_model_state, full_trainable_state, is_sharded, unwrap

    plain = unwrap(model)
    if cfg.full:
        state = full_model_state(model) if is_sharded(model) else None
        if info.main:
            tmp = out / ".model.tmp"
            plain.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            replace_dir(tmp, out / "model")
        return out / "model"
    from ..lora.io import save_adapter

    state = full_trainable_state(model) if is_sharded(model) else None
    if info.main:
        save_adapter(plain, out / "adapter", state_dict=state)
    return out / "adapter"


def _gather_state(model, opt, sched, sampler, st: dict, info) -> tuple:
    """Everything a checkpoint holds, as full (unsharded) tensors; collective, call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from .distributed import all_gather_rng, full_trainable_state

    params = full_trainable_state(model)
    opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
    rng = all_gather_rng(info)
    state = {"scheduler": sched.state_dict(), "sampler": sampler.state_dict(), "train_state": st,
             "world_size": info.world}
    return params, opt_state, rng, state


def _restore(path: Path, model, opt, sched, sampler, info) -> tuple[int, dict]:
    """Load a checkpoint into (possibly wrapped) model, optimizer, scheduler, sampler and RNG."""
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
    sampler.load_state_dict(state["sampler"])
    set_rng(info, rng)
    return state["step"], state["train_state"]


def _micro_batches(train_ds, sampler, cfg: TrainConfig, pad_id: int, info) -> list[dict]:
    """This rank's share of one global batch: (grad_accum) micro-batches, rows rank::world of each."""
    out = []
    for _ in range(cfg.grad_accum):
        rows = next(sampler)[info.rank::info.world]
        out.append(collate([train_ds[i] for i in rows], pad_id))
    return out


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run a training recipe end to end and return the summary (also written to out/summary.json).

    Under torchrun each process trains on its rows of every global batch; rank 0 alone logs,
    checkpoints and writes the results.

    Args:
        cfg: the resolved recipe.
        progress: show tqdm bars (rank 0 only).
    """
    from .distributed import setup, teardown

    info = setup(cfg.dist_timeout)
    try:
        return _train(cfg, progress and info.main, info)
    finally:
        teardown(info)


def _train(cfg: TrainConfig, progress: bool, info) -> dict[str, Any]:
    from .distributed import all_sum, barrier, unwrap, wrap

    out = Path(cfg.out)
    if info.main:
        prepare_out(out, cfg.resume)
    barrier(info)
    paths = resolve_data(cfg)
    train_examples = load_jsonl(paths.train)  # fail on bad data before spending time on the model
    eval_examples = load_jsonl(paths.eval) if paths.eval else None
    if info.world > cfg.batch_size:
        raise TrainingError(f"batch_size {cfg.batch_size} is smaller than the {info.world} processes; "
                            "each process needs at least one row of every micro-batch")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dtype, dtype_why = resolve_dtype(cfg, info.device)
    if info.main:
        print(f"lorakit: base weights in {dtype} ({dtype_why})", flush=True)
    model, tokenizer = build_model(cfg, dtype)
    model.to(info.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_ds = tokenize_examples(train_examples, tokenizer, cfg.max_seq_len)
    eval_ds = tokenize_examples(eval_examples, tokenizer, cfg.max_seq_len) if eval_examples else None
    data_stats = {"train": vars(train_ds.stats), "eval": vars(eval_ds.stats) if eval_ds else None}
    if info.main:
        for split, ds in (("train", train_ds), ("eval", eval_ds)):
            if ds is not None and (ds.stats.n_truncated or ds.stats.n_dropped):
                print(f"lorakit: {split} data: {ds.stats.n_truncated} of {ds.stats.n_examples} examples cut to "
                      f"max_seq_len={cfg.max_seq_len}, {ds.stats.n_dropped} dropped (nothing left to train on)",
                      flush=True)
    if info.main:
        check_space(out, model, cfg)
        _clean_partial_checkpoints(out / "checkpoints")
        save_recipe(cfg, out / "config.yaml")
    model = wrap(model, info, cfg.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = BatchSampler(len(train_ds), cfg.batch_size, seed=cfg.seed)
    st = {"best_eval": None, "bad_evals": 0, "tokens": 0, "elapsed": 0.0, "before": None, "last_eval": None}
    metrics = out / "metrics.jsonl"
    ckpts = list_checkpoints(out / "checkpoints")
    if cfg.resume and ckpts:
        step, st = _restore(ckpts[-1], model, opt, sched, sampler, info)
        if info.main:
            _truncate_metrics(metrics, step)
    else:
        step = 0
        if info.main:
            metrics.unlink(missing_ok=True)
        if info.main or cfg.fsdp:
            st["before"] = score(unwrap(model), tokenizer, paths.test, cfg, progress)

    def checkpoint() -> None:
        gathered = _gather_state(model, opt, sched, sampler, st, info)
        if info.main:
            save_checkpoint(out / "checkpoints", step, *gathered[:3], gathered[3], cfg.keep_checkpoints)
        barrier(info)

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not progress, dynamic_ncols=True)
    t_last, tok_last, stopped_early = time.perf_counter(), st["tokens"], False
    while step < cfg.max_steps and not stopped_early:
        t0 = time.perf_counter()
        batches = _micro_batches(train_ds, sampler, cfg, pad_id, info)  # each (rows, T)
        # every rank divides by the *global* token count; DDP/FSDP average over ranks, hence × world
        n_tok = all_sum(info, sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches))
        local = 0.0
        for batch in batches:
            loss, _ = loss_sum(model, batch)
            (loss * info.world / n_tok).backward()
            local += float(loss.detach())
        train_loss = all_sum(info, local) / n_tok
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            last = list_checkpoints(out / "checkpoints")
            raise TrainingError(f"non-finite {'loss' if not math.isfinite(train_loss) else 'gradient norm'} at step "
                                f"{step + 1}; stopped without saving. Last good checkpoint: "
                                f"{last[-1] if last else 'none'}. Lower --lr or check the data.")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        st["tokens"] += int(all_sum(info, sum(int(b["attention_mask"].sum()) for b in batches)))
        st["elapsed"] += time.perf_counter() - t0
        bar.update(1)
        if info.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
            now = time.perf_counter()
            tps = (st["tokens"] - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, st["tokens"]
            lr = sched.get_last_lr()[0]
            _append_jsonl(metrics, {"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                                    "tokens_per_s": tps})
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        if eval_ds is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            ev = eval_loss(model, eval_ds, cfg.batch_size, pad_id, cfg.eval_batches, info)
            st["last_eval"] = ev
            if info.main:
                _append_jsonl(metrics, {"step": step, "eval_loss": ev})
                bar.write(f"step {step}: eval loss {ev:.4f}")
            if st["best_eval"] is None or ev < st["best_eval"]:
                st["best_eval"], st["bad_evals"] = ev, 0
            else:
                st["bad_evals"] += 1
                stopped_early = bool(cfg.patience) and st["bad_evals"] >= cfg.patience
        pause = bool(cfg.stop_after) and step >= cfg.stop_after and step < cfg.max_steps
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps or stopped_early or pause:
            checkpoint()
        if pause:
            bar.close()
            return {"paused_at": step, "checkpoint": str(list_checkpoints(out / "checkpoints")[-1])} \
                if info.main else {}
    bar.close()
    st["data"] = data_stats
    return finish(model, tokenizer, out, cfg, paths, st, step, stopped_early, info, progress)


def finish(model, tokenizer, out: Path, cfg: TrainConfig, paths: DataPaths, st: dict, step: int,
           stopped_early: bool, info, progress: bool) -> dict[str, Any]:
    """Save the product, plot the curves, score the test split and write summary.json (rank 0)."""
    from ..lora.adapters import trainable_report
    from ..plots import plot_loss
    from .distributed import barrier, is_sharded, unwrap

    product = save_result(model, tokenizer, out, cfg, info)
    model.eval()
    # FSDP needs every rank in each forward; with whole weights on each rank, rank 0 scores alone
    after = score(unwrap(model), tokenizer, paths.test, cfg, progress) if info.main or is_sharded(model) else None
    barrier(info)
    if not info.main:
        return {}
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    rep = trainable_report(unwrap(model))
    summary = {
        "mode": "full" if cfg.full else "lora", "model": cfg.model, "steps": step, "stopped_early": stopped_early,
        "processes": info.world, "sharded": is_sharded(model),
        "dtype": str(next(unwrap(model).parameters()).dtype).removeprefix("torch."),  # the base's, as loaded
        "trainable_params": rep.trainable, "total_params": rep.total, "trainable_percent": rep.percent,
        "train_wall_s": st["elapsed"], "tokens": st["tokens"],
        "tokens_per_s": st["tokens"] / st["elapsed"] if st["elapsed"] else None,
        "peak_memory_mb": _peak_memory_mb(), "final_train_loss": _last_value(out / "metrics.jsonl", "loss"),
        "final_eval_loss": st["last_eval"], "best_eval_loss": st["best_eval"],
        "before": st["before"], "after": after, "output": str(product), "threads": torch.get_num_threads(),
        "data": st["data"],
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _last_value(path: Path, key: str) -> float | None:
    values = [json.loads(line).get(key) for line in path.read_text().splitlines() if line] if path.exists() else []
    values = [v for v in values if v is not None]
    return values[-1] if values else None
