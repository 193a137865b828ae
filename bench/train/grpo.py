"""GRPO on LoRA: lorakit's grpo objective vs TRL's GRPOTrainer + PEFT (use_vllm off), side by side.

Same model (the embedded SmolLM2-135M-Instruct, bf16 weights with fp32 adapters in both), prompts (the demo's
date prompts), reward (``examples/rewards.py:iso_date``) and hyperparameters (``HP``: G = 8, 2 prompts and 16
completions per step, 12 tokens at most, temperature 0.7, β = 0, dapo loss, LoRA r=16 on all linear layers, AdamW
at 5e-4 after 2 warm-up steps, as the demo).
Each round runs each arm once in a fresh process (A B, then B A ...). Per arm: seconds per optimizer step split
into generation (rollouts + rewards) and training (log-probs, loss, backward, optimizer), peak RSS, and the mean
reward of the last steps.

    python -m bench.train.grpo                    # bench/results/grpo.{json,md}
    python -m bench.train.grpo --quick            # a smoke run (3 steps, 1 round), bench/results/quick/
    python -m bench.train.grpo --name grpo-dev    # a trial run beside the results: bench/results/grpo-dev.*
"""

from __future__ import annotations

import argparse
import json
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

PROMPTS = ROOT / "examples" / "grpo" / "dates-train.jsonl"
REWARD = f"{ROOT / 'examples' / 'rewards.py'}:iso_date"
HP = {"num_generations": 8, "batch_size": 16, "grad_accum": 1, "max_completion_length": 12, "temperature": 0.7,
      "lr": 5e-4, "warmup_steps": 2, "r": 16, "alpha": 32, "beta": 0.0, "loss_type": "dapo", "dtype": "bfloat16"}


def model_dir() -> Path:
    """The embedded model as a transformers directory (lorakit converts the GGUF once and caches it)."""
    from lorakit.models.load import load_model, lorakit_home

    load_model("smollm2-135m-instruct")
    return lorakit_home() / "models" / "smollm2-135m-instruct"


def run_lorakit(args) -> dict:
    from lorakit.train.loop import train
    from lorakit.train.recipe import TrainConfig

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model="smollm2-135m-instruct", objective="grpo", data=str(PROMPTS), reward=REWARD,
                          out=out, max_steps=args.steps, num_generations=HP["num_generations"],
                          batch_size=HP["batch_size"], grad_accum=HP["grad_accum"],
                          max_completion_length=HP["max_completion_length"], temperature=HP["temperature"],
                          lr=HP["lr"], warmup_steps=HP["warmup_steps"], min_lr_ratio=0.0, r=HP["r"],
                          alpha=HP["alpha"], beta=HP["beta"], grpo_loss_type=HP["loss_type"], dtype=HP["dtype"],
                          threads=args.threads, log_every=1, eval_every=0, save_every=0, data_cache="off",
                          seed=0, cpu_allocator="glibc")
        t0 = time.perf_counter()
        train(cfg, progress=False)
        wall = time.perf_counter() - t0
        logs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    gen = [x["time/generation_s"] for x in logs]
    trn = [x["time/training_s"] for x in logs]
    return {"gen_s": gen, "train_s": trn, "rewards": [x["reward"] for x in logs], "wall_s": wall}


def run_trl(args) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    warnings.simplefilter("ignore")
    rows = [json.loads(x) for x in PROMPTS.read_text().splitlines()]
    from lorakit.models.custom import resolve_builder

    reward = resolve_builder(REWARD)
    stamps: dict[str, list[float]] = {"gen": [], "step_end": []}

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):
            stamps["step_end"].append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, use_vllm=False, use_cpu=True, bf16=HP["dtype"] == "bfloat16",
                         model_init_kwargs={"dtype": HP["dtype"]}, report_to="none",
                         per_device_train_batch_size=HP["batch_size"],
                         gradient_accumulation_steps=HP["grad_accum"], num_generations=HP["num_generations"],
                         max_completion_length=HP["max_completion_length"], temperature=HP["temperature"],
                         learning_rate=HP["lr"], warmup_steps=HP["warmup_steps"], lr_scheduler_type="cosine",
                         beta=HP["beta"], loss_type=HP["loss_type"], max_steps=args.steps, logging_steps=1,
                         save_strategy="no", seed=0, dataloader_num_workers=0)
        torch.set_num_threads(args.threads)
        trainer = GRPOTrainer(model=str(model_dir()), reward_funcs=reward, args=cfg,
                              train_dataset=Dataset.from_list(rows),
                              peft_config=LoraConfig(r=HP["r"], lora_alpha=HP["alpha"], target_modules="all-linear"),
                              callbacks=[Clock()])
        original = trainer._generate_and_score_completions

        def timed(inputs):
            t = time.perf_counter()
            result = original(inputs)
            stamps["gen"].append(time.perf_counter() - t)
            return result
        trainer._generate_and_score_completions = timed
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        logs = [x for x in trainer.state.log_history if "reward" in x]
    ends = [t0, *stamps["step_end"]]
    steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {"gen_s": stamps["gen"], "train_s": [s - g for s, g in zip(steps, stamps["gen"], strict=False)],
            "rewards": [x["reward"] for x in logs], "wall_s": wall}


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    result = (run_lorakit if args.worker == "lorakit" else run_trl)(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"arm": args.worker, **result}


def summarise(r: dict, warmup: int, last: int) -> dict:
    gen, trn = r["gen_s"][warmup:], r["train_s"][warmup:]
    return {"gen_s": statistics.median(gen), "train_s": statistics.median(trn),
            "step_s": statistics.median(gen) + statistics.median(trn), "peak_rss_mb": r["peak_rss_mb"],
            "reward_last": statistics.fmean(r["rewards"][-last:]), "reward_first": r["rewards"][0]}


def measure(args) -> dict:
    def arm(name):
        return lambda i: run_worker(["-m", "bench.train.grpo", "--worker", name, "--steps", str(args.steps),
                                     "--threads", str(args.threads)], timeout=7200)

    raw = alternate_processes({"lorakit": arm("lorakit"), "trl": arm("trl")}, args.rounds,
                              log=lambda s: print(f"[grpo] {s[:300]}", flush=True))
    per = {k: [summarise(r, args.warmup, args.last) for r in v] for k, v in raw.items()}
    out = {"raw": raw, "rounds": per}
    for key in ("step_s", "gen_s", "train_s", "peak_rss_mb"):
        out[f"ratio_{key}"] = ratio([p[key] for p in per["lorakit"]], [p[key] for p in per["trl"]])
    return out


def render(doc: dict) -> str:
    c, m, r, load = doc["config"], doc["machine"], doc["results"], doc["load"]
    med = {k: {f: statistics.median(p[f] for p in v) for f in v[0]} for k, v in r["rounds"].items()}
    lo, tr = med["lorakit"], med["trl"]
    lines = ["# GRPO on LoRA: lorakit vs TRL GRPOTrainer + PEFT", "",
             f"SmolLM2-135M-Instruct ({HP['dtype']} base, fp32 adapters), the demo's date prompts and reward, {c['steps']} optimizer steps per "
             f"run, {c['rounds']} round(s) of fresh processes alternating which arm goes first; medians over steps "
             f"after {c['warmup']} warm-up step(s), then over rounds. Hyperparameters: {json.dumps(HP)}. "
             "Generation: lorakit's generation core (continuous batching, prefix sharing, the adapter in place) vs "
             "TRL's transformers generate() (use_vllm off); both score with the same reward function.", "",
             "| | lorakit | TRL + PEFT | lorakit / TRL |", "|---|---:|---:|---:|"]
    for key, label, fmt in (("step_s", "s / step", "{:.2f}"), ("gen_s", "generation s / step", "{:.2f}"),
                            ("train_s", "training s / step", "{:.2f}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}")):
        rr = r[f"ratio_{key}"]
        lines.append(f"| {label} | {fmt.format(lo[key])} | {fmt.format(tr[key])} | {rr['value']:.3f} ± "
                     f"{rr['noise']:.1%} |")
    lines += [f"| reward, step 1 | {lo['reward_first']:.3f} | {tr['reward_first']:.3f} | |",
              f"| reward, mean of the last {c['last']} steps | {lo['reward_last']:.3f} | {tr['reward_last']:.3f} | |",
              "", f"Steps per hour: lorakit {3600 / lo['step_s']:.0f}, TRL {3600 / tr['step_s']:.0f} "
              f"({tr['step_s'] / lo['step_s']:.2f}x).", "",
              machine_line(m, load, ("trl", "peft"), f"{c['threads']} thread(s) ({c['threads_why']})",
                           "ratios carry that less than the times"), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--last", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--name", default="grpo", help="results file name: bench/results/NAME.{json,md}")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        emit(worker(args))
        return
    if args.quick:
        args.rounds, args.steps, args.warmup, args.last = 1, 3, 1, 1
    run_peer_bench(args, measure, render, {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                                           "last": args.last, "hp": HP}, prepare=model_dir)


if __name__ == "__main__":
    main()
