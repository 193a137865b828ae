"""CPU allocator inflation during training: peak RSS and step time of `lorakit train` on padded
variable-length chat batches, with and without lorakit's fix (lorakit/train/memory.py).

Two variants, each run as a whole training run in its own fresh process (RSS depends on the
allocation history, so cases must not share one), interleaved over rounds (A B, B A, ...):

- ``glibc default``: malloc as it comes (its mmap threshold rises after large frees): lorakit's default;
- ``lorakit (fixed mmap threshold)``: ``--low-cpu-memory``: the loop's set-up fixes glibc's mmap
  threshold at 128 KiB (mallopt), so every block above it keeps its own mapping.

Model: the embedded SmolLM2-135M-Instruct (fp32, its tokenizer and chat template) cut to its first
``--layers`` decoder layers (every tensor keeps SmolLM2's shapes; fewer layers only make a step
cheaper), LoRA r=8 on all linear layers, right-padded batches of a generated chat set whose lengths
are long-tailed (about 20-1,000 tokens, median ~200). Recorded per process: peak RSS (VmHWM), the
mean step time (train_wall_s / steps from summary.json) and the final loss (equal across variants:
the fix changes no numbers).

Usage: ``PYTHONPATH=. python -m bench.train.allocator [--rounds 3 --steps 8 --layers 8]`` writes
bench/results/allocator.json and allocator.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..harness import (
    RESULTS,
    Context,
    LoadMonitor,
    alternate_processes,
    emit,
    load_line,
    machine_info,
    now_iso,
    run_worker,
    write_json,
)

VARIANTS = {"glibc default": {"fix": False},
            "lorakit (fixed mmap threshold)": {"fix": True},
            "jemalloc (LD_PRELOAD)": {"fix": False, "preload": "libjemalloc.so.2"},
            "tcmalloc (LD_PRELOAD)": {"fix": False, "preload": "libtcmalloc_minimal.so.4"}}
_WORDS = ("the of and to in is that for it as with was on be by this are or from at an which have not has but "
          "were they their can all more one also its would other been there when who will into").split()


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` two-turn chats with long-tailed lengths (lognormal, ~20-1,000 SmolLM2 tokens, median ~200)."""
    rng = random.Random(seed)
    words = _WORDS + [f"w{i}" for i in range(300)]
    rows = []
    for _ in range(n):
        length = int(min(1500, max(20, rng.lognormvariate(5.0, 0.8))))
        prompt = max(5, int(length * rng.uniform(0.2, 0.6)))
        text = [" ".join(rng.choice(words) for _ in range(k // 3)) for k in (prompt, length - prompt)]
        rows.append({"messages": [{"role": "user", "content": text[0]}, {"role": "assistant", "content": text[1]}]})
    return rows


def write_model(folder: Path, layers: int) -> dict:
    """The embedded SmolLM2 cut to its first ``layers`` decoder layers, saved with its tokenizer."""
    from lorakit.models.load import load_model

    model, tok = load_model("smollm2-135m-instruct", dtype="float32")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters()), "layers": layers,
            "hidden": model.config.hidden_size, "vocab": model.config.vocab_size}


def data_stats(path: Path, model_dir: Path, batch: int, max_len: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [min(max_len, len(tok.apply_chat_template(json.loads(line)["messages"], return_dict=True)["input_ids"]))
               for line in path.read_text().splitlines()]
    padded = sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return {"examples": len(lengths), "median_tokens": statistics.median(lengths), "max_tokens": max(lengths),
            "min_tokens": min(lengths), "padding_share_in_file_order": 1 - sum(lengths) / padded}


def worker(variant: str, spec_path: str) -> None:
    """One training run in this process; emits peak RSS, step time and loss."""
    spec = json.loads(Path(spec_path).read_text())
    from lorakit.train import loop
    from lorakit.train.recipe import TrainConfig

    summary = loop.train(TrainConfig(**spec["config"], low_cpu_memory=VARIANTS[variant]["fix"]), progress=False)
    status = Path("/proc/self/status").read_text()
    kb = {k: int(re.search(rf"^{k}:\s+(\d+) kB", status, re.M).group(1)) for k in ("VmHWM", "VmRSS")}
    emit({"variant": variant, "peak_rss_mb": kb["VmHWM"] / 1024, "final_rss_mb": kb["VmRSS"] / 1024,
          "step_s": summary["train_wall_s"] / summary["steps"], "steps": summary["steps"],
          "final_loss": summary["final_train_loss"]})


def _library(name: str) -> str | None:
    """The path of a shared library the dynamic loader knows (``ldconfig -p``), or None."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.rsplit("=> ", 1)[1].strip() for line in out.splitlines() if line.strip().startswith(name + " ")),
                None)


def available_variants() -> list[str]:
    """The variants this machine can run (a preloaded allocator must be installed: Debian's libjemalloc2,
    libtcmalloc-minimal4)."""
    return [v for v, spec in VARIANTS.items() if "preload" not in spec or _library(spec["preload"])]


def _run_one(variant: str, spec_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")}
    if "preload" in VARIANTS[variant]:  # the variants set the threshold themselves, or not at all
        env["LD_PRELOAD"] = _library(VARIANTS[variant]["preload"])
    return run_worker(["-m", "bench.train.allocator", "--worker", variant, str(spec_path)], env=env)


def run(rounds: int, steps: int, layers: int, batch: int, max_len: int, threads: int, n_rows: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="lorakit-alloc-"))
    model = write_model(work / "model", layers)
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n_rows)))
    stats = data_stats(data, work / "model", batch, max_len)
    names = available_variants()

    def arm(name: str):
        def one(i: int) -> dict:
            cfg = {"model": str(work / "model"), "data": str(data), "out": str(work / f"run-{i}-{names.index(name)}"),
                   "max_steps": steps, "batch_size": batch, "max_seq_len": max_len, "dtype": "float32",
                   "threads": threads, "eval_every": 0, "save_every": 0, "log_every": 1, "warmup_steps": 2,
                   "lr": 2e-3, "r": 8, "alpha": 16, "seed": 0}
            spec = work / "spec.json"
            spec.write_text(json.dumps({"config": cfg}))
            return _run_one(name, spec)
        return one

    started, t0 = now_iso(), time.perf_counter()
    with LoadMonitor(every_s=10) as load:
        samples = alternate_processes({name: arm(name) for name in names}, rounds,
                                      log=lambda m: print(m, file=sys.stderr, flush=True))
    return {"model": model, "data": stats, "samples": samples, "started": started,
            "seconds": time.perf_counter() - t0, "load": load.report(),
            "config": {"rounds": rounds, "steps": steps, "layers": layers, "batch": batch, "max_seq_len": max_len,
                       "threads": threads, "rows": n_rows, "lora": "r=8, alpha=16, all linear", "dtype": "float32"}}


def summarize(res: dict) -> dict:
    """Medians per variant, and each variant's peak RSS and step time over glibc's default (overall and per round)."""
    med = {v: {k: statistics.median(r[k] for r in rows) for k in ("peak_rss_mb", "step_s")}
           for v, rows in res["samples"].items()}
    base, default = med["glibc default"], res["samples"]["glibc default"]
    ratios = {}
    for v, rows in res["samples"].items():
        if v != "glibc default":
            ratios[v] = {"peak": med[v]["peak_rss_mb"] / base["peak_rss_mb"], "step": med[v]["step_s"] / base["step_s"],
                         "peak_per_round": [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(rows, default, strict=True)],
                         "step_per_round": [a["step_s"] / b["step_s"] for a, b in zip(rows, default, strict=True)]}
    return {"medians": med, "over_default": ratios}


def write(res: dict, out: Path) -> None:
    machine = machine_info(Context(threads=res["config"]["threads"], threads_why="--threads"))
    res = {"name": "allocator", **res, "summary": summarize(res), "machine": machine}
    write_json(out / "allocator.json", res)
    s, c, d = res["summary"], res["config"], res["data"]
    rows = []
    for v, m in s["medians"].items():
        peaks = ", ".join(f"{r['peak_rss_mb']:,.0f}" for r in res["samples"][v])
        times = ", ".join(f"{r['step_s']:.2f}" for r in res["samples"][v])
        rows.append(f"| {v} | {m['peak_rss_mb']:,.0f} MiB | {m['step_s']:.2f} s | {peaks} | {times} |")
    ld = res["load"]
    lines = [
        "# CPU allocator inflation in training (lorakit/train/memory.py)", "",
        "Generated by `python -m bench.train.allocator`; do not edit by hand. Each cell: one whole `lorakit train` run in "
        "a fresh process; variants interleaved over rounds (A B, B A, ...); medians over rounds.", "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['memory_gb']} GiB; torch "
        f"{machine['torch']}, {c['threads']} thread(s); lorakit at {machine['git_commit']}. " + load_line(ld) + ".", "",
        f"Run: SmolLM2-135M-Instruct cut to its first {c['layers']} decoder layers ({res['model']['params'] / 1e6:.0f}M "
        f"params, SmolLM2's tensor shapes), {c['dtype']}, LoRA {c['lora']}, {c['steps']} steps of batch {c['batch']} "
        f"right-padded to each batch's longest example (max_seq_len {c['max_seq_len']}); data: {d['examples']} generated "
        f"chats, median {d['median_tokens']:.0f} / max {d['max_tokens']} tokens; {c['rounds']} rounds.", "",
        "| variant | peak RSS (median) | step (median) | peak RSS per round (MiB) | step per round (s) |",
        "|---|---|---|---|---|", *rows, "",
        *(f"- {v} / glibc default: peak RSS **{r['peak']:.3f}×**, step time **{r['step']:.3f}×** (per round: "
          + ", ".join(f"{x:.3f}" for x in r["step_per_round"]) + ")." for v, r in s["over_default"].items()),
        "- Final training losses across variants (the allocator changes no numbers): "
        + ", ".join(f"{v}: {rows[0]['final_loss']:.6f}" for v, rows in res["samples"].items()) + ".", ""]
    (out / "allocator.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser(prog="python -m bench.train.allocator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layers", type=int, default=8, help="SmolLM2 decoder layers kept (of 30)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    res = run(a.rounds, a.steps, a.layers, a.batch, a.max_seq_len, a.threads, a.rows)
    write(res, a.out)
    print(f"wrote {a.out / 'allocator.md'}")


if __name__ == "__main__":
    main()
