"""DPO on LoRA: lorakit's dpo objective vs TRL's DPOTrainer + PEFT, one epoch each, side by side.

Same model (the embedded SmolLM2-135M-Instruct; float32, or with ``--dtype bfloat16`` a bf16 base and bf16 compute on
both sides, each tool's default on a CPU with bf16 units), pairs (``bench/data/pairs_*.jsonl``, conversational,
long-tailed lengths: ``python -m bench.data.make_pairs``), and hyperparameters (β 0.1 sigmoid, LoRA r=16 on all
linear layers, AdamW, cosine schedule after 2 warm-up steps, batch of pairs, max_length). Arms, each a fresh
process per round (rotating which goes first): lorakit and TRL with the reference computed every step (adapters
off), and both with the reference log-probs precomputed once (``--precompute-ref`` /
``precompute_ref_log_probs=True``); lorakit's default pair layout (each pair in one row, its prompt computed
once) and, as separate arms, the pairs packed without sharing the prompt and padded as TRL pads them, so each
gain is visible; TRL also without its default gradient checkpointing. Per arm, the whole process: wall time, peak RSS, and the final held-out
preference accuracy (rewards/accuracies on the eval pairs against the base, TRL's definition).

    python -m bench.train.preference            # bench/results/preference.{json,md}
    python -m bench.train.preference --quick    # a smoke run (8 pairs, 1 round)
    python -m bench.train.preference --pairs 256 --eval-pairs 64 --dtype bfloat16 --threads 2 \
        --arms lorakit trl lorakit_tcmalloc trl_tcmalloc --name preference-256-bf16-lean
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from ..harness import (
    ROOT,
    alternate_processes,
    emit,
    machine_line,
    ratio,
    run_peer_bench,
    run_worker,
)

DATA = ROOT / "bench" / "data"
HP = {"beta": 0.1, "loss_type": "sigmoid", "batch_size": 4, "lr": 5e-4, "warmup_steps": 2, "r": 16, "alpha": 32,
      "max_length": 320}
ARMS = ("lorakit", "trl", "lorakit_precompute", "trl_precompute", "lorakit_packed", "lorakit_padded",
        "lorakit_tcmalloc", "trl_no_checkpointing", "trl_tcmalloc")
PRECISION = {"float32": "float32 weights and compute on both sides",
             "bfloat16": "bf16 base weights and compute, LoRA weights float32, on both sides: each tool's default "
                         "on a CPU with bf16 units (lorakit's dtype auto, TRL's bf16=True)"}
LAYOUT = {"lorakit_packed": "packed", "lorakit_padded": "padded"}  # other lorakit arms: auto (shared prompts)


def model_dir() -> Path:
    """The embedded model as a transformers directory (lorakit converts the GGUF once and caches it)."""
    from lorakit.models.load import load_model, lorakit_home

    load_model("smollm2-135m-instruct")
    return lorakit_home() / "models" / "smollm2-135m-instruct"


def pair_files(n_train: int, n_eval: int, folder: Path) -> tuple[Path, Path]:
    """The first n_train / n_eval pairs of the bench's files, written to ``folder``."""
    out = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = (DATA / f"pairs_{split}.jsonl").read_text().splitlines()[:n]
        path = folder / f"{split}.jsonl"
        path.write_text("\n".join(rows) + "\n")
        out.append(path)
    return out[0], out[1]


def run_lorakit(args, precompute: bool, layout: str = "auto", allocator: str = "glibc") -> dict:
    from lorakit.train.loop import train
    from lorakit.train.recipe import TrainConfig

    with tempfile.TemporaryDirectory() as out:
        train_path, eval_path = pair_files(args.pairs, args.eval_pairs, Path(out))
        cfg = TrainConfig(model="smollm2-135m-instruct", objective="dpo", data=str(train_path),
                          eval_data=str(eval_path), out=str(Path(out) / "run"), epochs=1,
                          batch_size=HP["batch_size"], lr=HP["lr"], warmup_steps=HP["warmup_steps"], min_lr_ratio=0.0,
                          r=HP["r"], alpha=HP["alpha"], beta=HP["beta"], loss_type=HP["loss_type"],
                          max_seq_len=HP["max_length"], dtype=args.dtype, threads=args.threads, log_every=1,
                          eval_every=0, save_every=0, data_cache=str(Path(out) / "cache"), seed=0,
                          cpu_allocator=allocator, precompute_ref=precompute, pair_layout=layout)
        t0 = time.perf_counter()
        train(cfg, progress=False)
        wall = time.perf_counter() - t0
        logs = [json.loads(x) for x in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "loss" in x]
    final = [x for x in logs if "eval_loss" in x][-1]
    return {"train_wall_s": wall, "steps": len(steps), "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "eval_accuracy": final["eval_rewards/accuracies"], "eval_loss": final["eval_loss"]}


def run_trl(args, precompute: bool, checkpointing: bool = True) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as out:
        train_path, eval_path = pair_files(args.pairs, args.eval_pairs, Path(out))
        load = [json.loads(x) for x in train_path.read_text().splitlines()], \
            [json.loads(x) for x in eval_path.read_text().splitlines()]
        bf16 = args.dtype == "bfloat16"  # TRL's own default (bf16=True): autocast over a bf16 base
        cfg = DPOConfig(output_dir=out, use_cpu=True, bf16=bf16, report_to="none", num_train_epochs=1,
                        per_device_train_batch_size=HP["batch_size"], per_device_eval_batch_size=HP["batch_size"],
                        learning_rate=HP["lr"], warmup_steps=HP["warmup_steps"], lr_scheduler_type="cosine",
                        beta=HP["beta"], loss_type=[HP["loss_type"]], max_length=HP["max_length"], logging_steps=1,
                        save_strategy="no", eval_strategy="no", seed=0, dataloader_num_workers=0,
                        precompute_ref_log_probs=precompute,
                        gradient_checkpointing=checkpointing)  # TRL's default: True
        torch.set_num_threads(args.threads)
        path = model_dir()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(load[0]),
                             eval_dataset=Dataset.from_list(load[1]), processing_class=AutoTokenizer.from_pretrained(path),
                             peft_config=LoraConfig(r=HP["r"], lora_alpha=HP["alpha"], target_modules="all-linear"))
        trainer.train()
        final = trainer.evaluate()
        wall = time.perf_counter() - t0
        steps = [x for x in trainer.state.log_history if "loss" in x]
    return {"train_wall_s": wall, "steps": len(steps), "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "eval_accuracy": final["eval_rewards/accuracies"], "eval_loss": final["eval_loss"]}


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    precompute = args.worker.endswith("_precompute")
    if args.worker.startswith("lorakit"):
        result = run_lorakit(args, precompute, LAYOUT.get(args.worker, "auto"),
                             "tcmalloc" if args.worker.endswith("_tcmalloc") else "glibc")
    else:
        result = run_trl(args, precompute, checkpointing=not args.worker.endswith("_no_checkpointing"))
    from lorakit.train.memory import allocator_in_use

    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"arm": args.worker, **result, "allocator": allocator_in_use()}


def measure(args) -> dict:
    from lorakit.train.memory import preload_env

    def arm(name):
        def run(i):
            t0 = time.perf_counter()
            env = preload_env("tcmalloc", dict(os.environ)) if name.endswith("_tcmalloc") else None
            r = run_worker(["-m", "bench.train.preference", "--worker", name, "--pairs", str(args.pairs),
                            "--eval-pairs", str(args.eval_pairs), "--threads", str(args.threads),
                            "--dtype", args.dtype], env=env,
                           timeout=7200)
            return {**r, "process_wall_s": time.perf_counter() - t0}
        return run

    raw = alternate_processes({name: arm(name) for name in args.arms}, args.rounds,
                              log=lambda s: print(f"[preference] {s[:300]}", flush=True))
    out = {"raw": raw}
    base = baseline(raw)
    for name in args.arms:
        if name != base and base is not None:
            for key in ("process_wall_s", "peak_rss_mb"):
                out[f"ratio_{name}_{key}"] = ratio([r[key] for r in raw[name]], [r[key] for r in raw[base]])
    return out


def baseline(raw: dict) -> str | None:
    """The arm the ratios divide by: TRL's defaults ("trl"), else the first TRL arm run."""
    return "trl" if "trl" in raw else next((k for k in raw if k.startswith("trl")), None)


def render(doc: dict) -> str:
    c, m, r, load = doc["config"], doc["machine"], doc["results"], doc["load"]
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0] if isinstance(v[0][f], (int, float))}
           for k, v in r["raw"].items()}
    trl = med.get(baseline(r["raw"]))
    lines = ["# DPO on LoRA: lorakit vs TRL DPOTrainer + PEFT", "",
             f"SmolLM2-135M-Instruct ({PRECISION[c.get('dtype', 'float32')]}), one epoch of {c['pairs']} conversational pairs "
             f"(bench/data/pairs_train.jsonl: prompts ~90, answers ~120 tokens at the median, long-tailed) then the "
             f"held-out accuracy on {c['eval_pairs']} pairs; {c['rounds']} round(s) of fresh processes alternating "
             f"which arm goes first; medians over rounds. Hyperparameters (both sides): {json.dumps(HP)}; cosine "
             "schedule, AdamW, clipping 1.0, seed 0. Time and memory are the whole process (imports, model load, "
             "tokenization, reference pass, the epoch, the final evaluation).", "",
             f"Ratios against `{baseline(r['raw'])}`.", "",
             "| arm | process wall (s) | throughput vs TRL | peak RSS (MB) | RSS vs TRL | loss first → last | "
             "held-out accuracy |", "|---|---:|---:|---:|---:|---|---:|"]
    for name, x in med.items():
        speed = f"{trl['process_wall_s'] / x['process_wall_s']:.2f}x" if trl else ""
        rss = f"{x['peak_rss_mb'] / trl['peak_rss_mb']:.2f}" if trl else ""
        lines.append(f"| {name} | {x['process_wall_s']:.1f} | {speed} | {x['peak_rss_mb']:.0f} | {rss} | "
                     f"{x['loss_first']:.3f} → {x['loss_last']:.3f} | {x['eval_accuracy']:.1%} |")
    lines += ["", "lorakit's arms: `lorakit` and `lorakit_precompute` run the default pair layout (auto: each pair in one "
              "row with its prompt computed once, `--pair-layout shared`); `lorakit_packed` packs the pairs without "
              "sharing the prompt; `lorakit_padded` pads 2·batch rows as TRL does. TRL runs its defaults (padded "
              "rows, logits over every position, gradient checkpointing; `trl_no_checkpointing` turns that off). "
              "Every arm runs glibc's malloc but `lorakit_tcmalloc` (the default arm "
              "with tcmalloc preloaded, as `lorakit train` runs where tcmalloc is installed) and `trl_tcmalloc` "
              "(TRL's defaults with the same preload).", "",
              machine_line(m, load, ("trl", "peft"), f"{c['threads']} thread(s) for every arm ({c['threads_why']})"),
              ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--eval-pairs", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the base model's weights on both sides (bfloat16: lorakit's dtype on a CPU with bf16 units, "
                        "TRL's bf16=True autocast over a bf16-loaded base; LoRA weights float32 on both)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--name", default="preference", help="results file name (bench/results/NAME.{json,md})")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        emit(worker(args))
        return
    if args.quick:
        args.rounds, args.pairs, args.eval_pairs = 1, 8, 4
    run_peer_bench(args, measure, render, {"rounds": args.rounds, "pairs": args.pairs, "eval_pairs": args.eval_pairs,
                                           "arms": args.arms, "hp": HP, "dtype": args.dtype}, prepare=model_dir)


if __name__ == "__main__":
    main()
