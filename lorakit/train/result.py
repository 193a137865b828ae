"""The end of a run: the product (adapter or model directory), the held-out score, the curves
and summary.json."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

from ..data.formats import parse_columns
from ..data.readers import read_records
from ..fileio import atomic_write_json, replace_dir
from .evaluate import exact_match_score
from .recipe import TrainConfig
from .setup import DataPaths


def exact_match_on(model, tokenizer, path: Path | None, cfg: TrainConfig, progress: bool = True
                   ) -> dict[str, Any] | None:
    """Greedy exact match on the test file (None when there is none): the causal-LM objective's score."""
    if path is None:
        return None
    records = list(read_records(path, parse_columns(cfg.columns)))  # as text, prompt/completion or messages
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
    from ..lora.config import moves_base
    from ..lora.io import save_adapter

    state = full_trainable_state(model) if is_sharded(model) else None
    if info.main:  # PiSSA / OLoRA: by default a plain LoRA that applies to the base the user has
        convert = cfg.convert_to_lora and moves_base(cfg.lora_init())
        save_adapter(plain, out / "adapter", state_dict=state, convert_to_lora=convert)
    return out / "adapter"


def finish(model, tokenizer, out: Path, cfg: TrainConfig, paths: DataPaths, st: dict, step: int,
           stopped_early: bool, info, progress: bool, objective) -> dict[str, Any]:
    """Save the product, plot the curves, score the test split with the objective's held-out score
    (``Objective.score``) and write summary.json (rank 0)."""
    from ..lora.adapters import trainable_report
    from ..lora.quantized import describe
    from ..plots import plot_loss
    from .distributed import barrier, is_sharded, unwrap

    product = save_result(model, tokenizer, out, cfg, info)
    model.eval()
    # FSDP needs every rank in each forward; with whole weights on each rank, rank 0 scores alone
    after = objective.score(unwrap(model), tokenizer, paths.test, cfg, progress) \
        if info.main or is_sharded(model) else None
    barrier(info)
    if not info.main:
        return {}
    plot_loss(out / "metrics.jsonl", out / "loss.png", objective.plotted)
    rep = trainable_report(unwrap(model))
    summary = {
        "mode": "full" if cfg.full else "lora", "objective": objective.name, "model": cfg.model, "steps": step, "epochs": round(step / st["steps_per_epoch"], 4), "stopped_early": stopped_early,
        "processes": info.world, "sharded": is_sharded(model),
        "dtype": str(next(unwrap(model).parameters()).dtype).removeprefix("torch."),  # the base's, as loaded
        "quantization": describe(unwrap(model)),  # None, or how bitsandbytes quantized the base's Linears
        "trainable_params": rep.trainable, "total_params": rep.total, "trainable_percent": rep.percent,
        "train_wall_s": st["elapsed"], "tokens": st["tokens"],
        "tokens_per_s": st["tokens"] / st["elapsed"] if st["elapsed"] else None,
        "peak_memory_mb": _peak_memory_mb(), "final_train_loss": _last_value(out / "metrics.jsonl", "loss"),
        "final_eval_loss": st["last_eval"], "best_eval_loss": st["best_eval"],
        "before": st["before"], "after": after, "output": str(product), "threads": torch.get_num_threads(),
        "cpu_allocator": st.get("cpu_allocator"),
        "data": st["data"],
    }
    atomic_write_json(out / "summary.json", summary)
    if not cfg.full:
        from ..lora.card import write_model_card
        from ..lora.io import read_adapter
        from ..lora.quantized import card_section

        sections = {**(card_section(unwrap(model)) or {}), **card_sections(summary, cfg, paths)}
        write_model_card(product, read_adapter(product)[0], sections)
    return summary


def card_sections(summary: dict[str, Any], cfg: TrainConfig, paths: DataPaths) -> dict[str, list[str]]:
    """The model card's "Training data" and "Training results" sections of a finished run."""
    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    def held(block, name):
        return (summary.get(block) or {}).get(name)

    data = [f"- train: `{cfg.data}` ({paths.train})"]
    for split, path in (("eval", paths.eval), ("test", paths.test)):
        if path is not None:
            data.append(f"- {split}: {path}")
    for split, stats in (summary.get("data") or {}).items():
        if stats:
            data.append(f"- {split} examples: {stats['n_examples']:,} ({stats['n_tokens']:,} tokens, "
                        f"{stats['n_truncated']} cut to max_seq_len={cfg.max_seq_len})")
    data.append(f"- recipe: {summary['steps']} steps ({summary['epochs']:g} epochs), batch {cfg.batch_size} × "
                f"grad_accum {cfg.grad_accum}, lr {cfg.lr:g}, seed {cfg.seed}, base in {summary['dtype']}"
                + (f", its Linears quantized to {summary['quantization']['method']}" if summary.get("quantization")
                   else ""))

    results = [f"- eval loss: final {fmt(summary['final_eval_loss'])}, best {fmt(summary['best_eval_loss'])}; "
               f"final train loss {fmt(summary['final_train_loss'])}",
               *(f"- held-out {name.replace('_', ' ')}: before {fmt(held('before', name), '.1%')}, after "
                 f"{fmt(held('after', name), '.1%')}" for name in held_out_figures(summary)),
               f"- trainable parameters: {summary['trainable_params']:,} ({summary['trainable_percent']:.3f}% of "
               f"{summary['total_params']:,})",
               f"- train wall time {summary['train_wall_s']:.1f} s, {fmt(summary['tokens_per_s'], '.0f')} tokens/s, "
               f"peak memory {summary['peak_memory_mb']:.0f} MB, {summary['processes']} process(es)"]
    return {"Training data": data, "Training results": results}


def held_out_figures(s: dict) -> list[str]:
    """The names of the numbers in a summary's before/after blocks (the objective's held-out score:
    exact_match for sft), in their order; counts and examples left out; none when nothing was scored."""
    names: list[str] = []
    for block in (s.get("before"), s.get("after")):
        for k, v in (block or {}).items():
            if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names:
                names.append(k)
    return names


def _last_value(path: Path, key: str) -> float | None:
    values = [json.loads(line).get(key) for line in path.read_text().splitlines() if line] if path.exists() else []
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
