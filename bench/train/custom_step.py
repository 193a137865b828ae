"""A training step on a CosyVoice-3-style speech LM: lorakit's loop (``lk.fit``) vs PEFT with a plain PyTorch
loop, on the same model, data, batches and optimizer, side by side.

The model is ``examples/cosyvoice_lm.py`` (an inner Qwen2 causal LM through ``inputs_embeds``, a speech
embedding and decoder head) at a bench size; LoRA r=24 on the seven projections, the speech embedding and
the head trained whole (lorakit's ``modules_to_save``, PEFT's the same). Both arms call the example's own
``loss(model, batch)``; the time between consecutive calls is one optimizer step (collation, forward,
backward, clipping, AdamW, schedule and, for lorakit, its logging). Rounds alternate which arm goes first,
in fresh processes: each arm in its own (separate), and both arms back to back in one (paired); warm-up
steps are discarded and each run reports its median step.

    python -m bench.train.custom_step            # bench/results/custom_step.{json,md}
    python -m bench.train.custom_step --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..harness import (
    RESULTS,
    ROOT,
    LoadMonitor,
    auto_threads,
    cpu_summary,
    machine_line,
    now_iso,
    ratio,
    write_json,
)

BENCH_CONFIG = {  # Qwen2 shapes at a tenth of CosyVoice 3's width, 4 layers; a 1,024-token speech vocabulary
    "llm": {"vocab_size": 4096, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4,
            "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "tie_word_embeddings": True},
    "speech_vocab_size": 1024, "extra_tokens": 200}
QUICK_CONFIG = {"llm": {**BENCH_CONFIG["llm"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4}, "speech_vocab_size": 64, "extra_tokens": 8}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAVED = ["speech_embedding", "llm_decoder"]
PAD = -100  # the example's padding id in text_ids / speech_ids


def _example():
    sys.path.insert(0, str(ROOT / "examples"))
    import cosyvoice_lm

    return cosyvoice_lm


def make_rows(n: int, config: dict, text: tuple[int, int], speech: tuple[int, int], seed: int = 0) -> list[dict]:
    """Pre-tokenized rows: text ids of the inner LM, speech ids, lengths drawn uniformly in the ranges."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi, vocab):
        return torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
    return [{"text_ids": ids(*text, config["llm"]["vocab_size"]), "speech_ids": ids(*speech, config["speech_vocab_size"])}
            for _ in range(n)]


def _pad(rows: list[dict], key: str) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(r[key]) for r in rows], batch_first=True, padding_value=PAD)


def run_lorakit(model, rows, loss, args, stamps) -> None:
    import lorakit as lk

    def timed(model, batch):
        stamps.append(time.perf_counter())
        return loss(model, batch)
    with tempfile.TemporaryDirectory() as out:
        lk.fit(model, rows, timed, out=out, progress=False, r=24, alpha=48, target_modules=TARGETS,
               modules_to_save=SAVED, max_steps=args.steps, batch_size=args.batch, lr=1e-4, warmup_steps=2,
               max_seq_len=4096, pad_value=["text_ids=-100", "speech_ids=-100"], eval_every=0, save_every=0,
               log_every=10, seed=0, dtype="float32", threads=args.threads)


def run_peft(model, rows, loss, args, stamps) -> None:
    """What a PEFT user writes: get_peft_model, a seeded shuffled order, pad_sequence, AdamW, clipping, schedule."""
    import peft

    from lorakit.data.batching import BatchSampler  # the same batches, in the same order

    model = peft.get_peft_model(model, peft.LoraConfig(r=24, lora_alpha=48, target_modules=TARGETS,
                                                       modules_to_save=SAVED))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.5 *
                                              (1 + math.cos(math.pi * s / args.steps)))
    sampler = BatchSampler(len(rows), args.batch, seed=0)
    for _ in range(args.steps):
        chosen = [rows[i] for i in next(sampler)]
        batch = {"text_ids": _pad(chosen, "text_ids"), "speech_ids": _pad(chosen, "speech_ids")}
        stamps.append(time.perf_counter())
        out = loss(model, batch)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    stamps.append(time.perf_counter())  # the last step's end


def worker(args) -> dict:
    """One fresh process: the arm ``args.worker`` names, or with "paired" both arms one after the other (in
    ``args.order``) on copies of the same model; the median step of each."""
    import copy

    torch.set_num_threads(args.threads)
    cv = _example()
    config = QUICK_CONFIG if args.quick else BENCH_CONFIG
    rows = make_rows(args.rows, config, (8, 32), (32, 160) if not args.quick else (8, 32))
    model = cv.build(config).train()  # seeded the same in both arms: build() draws after manual_seed(0)
    out = {}
    for arm in (args.order.split(",") if args.worker == "paired" else [args.worker]):
        stamps: list[float] = []
        (run_lorakit if arm == "lorakit" else run_peft)(copy.deepcopy(model), rows, cv.loss, args, stamps)
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:]
        out[arm] = statistics.median(steps)
    return out


def _run_worker(args, worker: str, order: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.train.custom_step", "--worker", worker, "--order", ",".join(order),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--rows",
           str(args.rows), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{worker} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    """Two designs, rounds alternating which arm goes first. separate: each arm in its own fresh process
    (nothing shared). paired: one fresh process per round runs both arms back to back (the same moment's
    load on both; on a shared machine the steadier ratio)."""
    out = {}
    for design in ("separate", "paired"):
        samples: dict[str, list[float]] = {"lorakit": [], "peft": []}
        for i in range(args.rounds):
            order = ["lorakit", "peft"] if i % 2 == 0 else ["peft", "lorakit"]
            if design == "paired":
                result = _run_worker(args, "paired", order)
            else:
                result = {arm: _run_worker(args, arm, [arm])[arm] for arm in order}
            for arm in order:
                samples[arm].append(result[arm])
            print(f"[custom_step] {design} round {i + 1}: " + ", ".join(f"{a} {result[a]:.4f} s/step" for a in order),
                  flush=True)
        out[design] = {"samples": samples, "ratio": ratio(samples["lorakit"], samples["peft"])}
    return out


def render(doc: dict) -> str:
    c, m, r, load = doc["config"], doc["machine"], doc["results"], doc["load"]
    lines = ["# A training step on a CosyVoice-3-style LM: lorakit vs PEFT + a plain loop", "",
             f"Median seconds per optimizer step (after {c['warmup']} warm-up steps) of {c['steps']}-step runs, "
             f"{c['rounds']} rounds alternating which arm goes first; *separate*: each arm in its own fresh process, "
             "*paired*: one fresh process per round runs both arms back to back on copies of the same model. fp32, "
             f"{c['threads']} thread(s), batch {c['batch']} rows of 8-32 text + 32-160 speech tokens; inner Qwen2 "
             f"{c['model']['llm']['hidden_size']} wide × {c['model']['llm']['num_hidden_layers']} layers, speech "
             f"vocabulary {c['model']['speech_vocab_size']} (+{c['model']['extra_tokens']}); LoRA r=24 on the seven "
             "projections, speech embedding and decoder head trained whole; both arms call the example's own "
             "loss on the same batches. Ratio < 1: lorakit is faster; ± is half the IQR of the per-round ratios.", "",
             "| design | lorakit (lk.fit) s/step | PEFT + plain loop s/step | lorakit / PEFT | per-round ratios |",
             "|---|---:|---:|---:|---|"]
    for design, res in r.items():
        s = res["samples"]
        lines.append(f"| {design} | {statistics.median(s['lorakit']):.4f} | {statistics.median(s['peft']):.4f} | "
                     f"{res['ratio']['value']:.3f} ± {res['ratio']['noise']:.1%} | "
                     f"{', '.join(f'{x:.2f}' for x in res['ratio']['per_round'])} |")
    lines += ["", machine_line(m, load, ("peft",), shared="the alternated ratios carry that less than the times"),
              ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--order", default="lorakit,peft", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    why = f"{args.threads} (given)"
    if not args.threads:
        args.threads, why = auto_threads()
    if args.quick:
        args.rounds, args.steps, args.warmup, args.rows = 2, 6, 2, 16
    import peft

    with LoadMonitor() as load:
        results = measure(args)
    doc = {"name": "custom_step", "when": now_iso(),
           "config": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                      "rows": args.rows, "threads": args.threads, "threads_why": why, "quick": args.quick,
                      "model": QUICK_CONFIG if args.quick else BENCH_CONFIG},
           "machine": {**cpu_summary(), "peft": peft.__version__}, "load": load.report(), "results": results}
    out = RESULTS / ("quick" if args.quick else "")
    write_json(out / "custom_step.json", doc)
    (Path(out) / "custom_step.md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
