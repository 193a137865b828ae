"""The methods experiment: LoRA, rsLoRA, DoRA, PiSSA, LoRA+ and NEFTune side by side on SmolLM2.

Same model, data, rank, alpha, learning rate, steps and seeds for every method; PiSSA and LoRA+ run a
second time at a tenth of that learning rate, the direction their authors and PEFT's docs point (a
drop-in swap at LoRA's learning rate is not how they are meant to be used). The data is the
packaged dates task written as short prompt/completion pairs ("17 October 1974 =>" → " 1974-10-17",
no chat template: about 25 tokens an example, so a step is cheap enough for 18 runs on a loaded CPU); each run is one ``lorakit train`` process (so its peak RSS is its own), and the runs are
interleaved (seed 0: every method, seed 1: every method, ...) so the load other programs put on the
machine spreads over the methods instead of landing on one. After training, each saved adapter
(PiSSA's converted to a plain LoRA, as ``lorakit train`` saves it) is loaded onto a fresh base and
scored by greedy exact match on the first ``--score`` test examples.

    python -m bench.train.methods                     # writes bench/results/methods.{json,md,png}
    python -m bench.train.methods --steps 4 --seeds 0 --score 5 --out /tmp/m   # a smoke run

The setting is deliberately short (plain LoRA needs about 80 steps at r=8 to reach 100% on the chat
form of the task), so that differences between methods can show instead of all of them saturating.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..harness import RESULTS, ROOT, Context, LoadMonitor, machine_info

METHODS = {
    "LoRA": [],
    "rsLoRA": ["--rslora"],
    "DoRA": ["--dora"],
    "PiSSA": ["--init-lora-weights", "pissa"],
    "LoRA+ (ratio 16)": ["--loraplus-lr-ratio", "16"],
    "NEFTune (alpha 5)": ["--neftune-alpha", "5"],
    "PiSSA, lr / 10": ["--init-lora-weights", "pissa"],
    "LoRA+ (ratio 16), lr / 10": ["--loraplus-lr-ratio", "16"],
}
LR_SCALE = {"PiSSA, lr / 10": 0.1, "LoRA+ (ratio 16), lr / 10": 0.1}  # the rest train at --lr


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--score", type=int, default=30, help="test examples scored by exact match")
    p.add_argument("--eval-batches", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 on a loaded 2-core machine)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def short_form(split: str) -> list[dict]:
    """The dates task's split as prompt/completion pairs without the chat template."""
    from lorakit.data.readers import load_jsonl
    from lorakit.data.tasks import task_path

    out = []
    for rec in load_jsonl(task_path("dates", split)):
        user, answer = rec["messages"][0]["content"], rec["messages"][-1]["content"]
        out.append({"prompt": user.split(": ", 1)[1] + " =>", "completion": " " + answer})
    return out


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_run(args, method: str, seed: int, work: Path) -> dict:
    """One ``lorakit train`` process; returns its summary.json."""
    out = work / f"{''.join(c for c in method if c.isalnum())}-{seed}"
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", args.model, "--threads", str(args.threads),
           "--data", str(work / "train.jsonl"), "--eval-data", str(work / "valid.jsonl"),
           "--out", str(out), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr * LR_SCALE.get(method, 1.0)), "--warmup-steps", "3", "--max-seq-len", str(args.max_seq_len),
           "--lora-r", str(args.r), "--alpha", str(2 * args.r), "--seed", str(seed), "--eval-every", "0",
           "--eval-batches", str(args.eval_batches), "--save-every", "0", "--log-every", "4",
           *METHODS[method]]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text()) | {"adapter": str(out / "adapter")}


def score_run(base, tokenizer, adapter: str, records: list[dict]) -> float:
    """Exact match of ``adapter`` loaded onto a copy of the original base."""
    from lorakit.lora.apply import load_adapter
    from lorakit.train.evaluate import exact_match_score

    model = load_adapter(copy.deepcopy(base), adapter).eval()
    return exact_match_score(model, tokenizer, records, max_new_tokens=12)["exact_match"]


def _bf16() -> bool:
    """lorakit train's --dtype auto: a bf16 base where the CPU computes bf16 natively (the runs use it too)."""
    from lorakit.models.dtype import native_bf16

    return native_bf16("cpu")


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2, "values": values}


def main(argv=None) -> None:
    from tqdm.auto import tqdm

    from lorakit.models.load import load_model

    args = parse(argv)
    torch.set_num_threads(args.threads)
    records = short_form("test")[:args.score]
    base, tokenizer = load_model(args.model, dtype=torch.bfloat16 if _bf16() else torch.float32)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    started = time.time()
    with LoadMonitor() as monitor, tempfile.TemporaryDirectory(prefix="lorakit-methods-") as tmp:
        write_jsonl(short_form("train"), Path(tmp) / "train.jsonl")
        write_jsonl(short_form("valid"), Path(tmp) / "valid.jsonl")
        jobs = [(seed, m) for seed in args.seeds for m in METHODS]  # interleaved: every method once per seed
        for seed, method in tqdm(jobs, desc="methods"):
            summary = train_run(args, method, seed, Path(tmp))
            runs[method].append({"seed": seed, "eval_loss": summary["final_eval_loss"],
                                 "exact_match": score_run(base, tokenizer, summary["adapter"], records),
                                 "step_s": summary["train_wall_s"] / summary["steps"],
                                 "peak_rss_mb": summary["peak_memory_mb"],
                                 "trainable": summary["trainable_params"]})
    table = {m: {k: stats([r[k] for r in rs]) for k in ("eval_loss", "exact_match", "step_s", "peak_rss_mb")}
             | {"trainable": rs[0]["trainable"], "runs": rs} for m, rs in runs.items()}
    loads = monitor.samples
    doc = {"settings": vars(args) | {"out": str(args.out)}, "methods": table,
           "machine": machine_info(Context(threads=torch.get_num_threads(), threads_why="lorakit train's default")),
           "base_dtype": "bfloat16" if _bf16() else "float32", "load_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
           "wall_s": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "methods.json").write_text(json.dumps(doc, indent=1))
    plot(table, args.out / "methods.png")
    (args.out / "methods.md").write_text(render(doc))
    print(render(doc))


def verdict(row: dict, ref: dict) -> str:
    """What a method bought over plain LoRA, judged against the spread across seeds."""
    d_em = row["exact_match"]["mean"] - ref["exact_match"]["mean"]
    d_loss = row["eval_loss"]["mean"] - ref["eval_loss"]["mean"]
    noise_em = max(row["exact_match"]["spread"], ref["exact_match"]["spread"])
    noise_loss = max(row["eval_loss"]["spread"], ref["eval_loss"]["spread"])
    parts = []
    if abs(d_em) > noise_em:
        parts.append(f"{d_em * 100:+.0f} points exact match")
    if abs(d_loss) > noise_loss:
        parts.append(f"{d_loss:+.3f} eval loss")
    cost = row["step_s"]["mean"] / ref["step_s"]["mean"]
    bought = ", ".join(parts) if parts else "nothing beyond the seed spread"
    return f"{bought}; step time {cost:.2f}x LoRA's"


def render(doc: dict) -> str:
    s, t = doc["settings"], doc["methods"]
    ref = t["LoRA"]
    lines = [
        "# Methods on SmolLM2-135M: what each LoRA variant buys",
        "",
        f"Task: the packaged dates task (normalise dates to ISO 8601). Every method: r={s['r']}, "
        f"alpha={2 * s['r']}, all-linear, lr={s['lr']} (the rows marked lr / 10: {s['lr'] / 10:g}), {s['steps']} steps of batch {s['batch_size']}, max_seq_len "
        f"{s['max_seq_len']}, base in {doc['base_dtype']} (LoRA weights fp32), {s['threads']} thread(s), seeds "
        f"{s['seeds']}. Eval loss on {s['eval_batches']} validation batches; "
        f"exact match (greedy) on the first {s['score']} test examples, adapter loaded onto the original base. "
        "Mean ± half the range over the seeds.",
        "",
        "| method | trainable | eval loss | exact match | step time (s) | peak RSS (MB) | bought vs LoRA |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for m, row in t.items():
        f = {k: row[k] for k in ("eval_loss", "exact_match", "step_s", "peak_rss_mb")}
        lines.append(f"| {m} | {row['trainable']:,} | {f['eval_loss']['mean']:.3f} ± {f['eval_loss']['spread']:.3f} "
                     f"| {f['exact_match']['mean'] * 100:.0f}% ± {f['exact_match']['spread'] * 100:.0f} "
                     f"| {f['step_s']['mean']:.2f} ± {f['step_s']['spread']:.2f} "
                     f"| {f['peak_rss_mb']['mean']:.0f} | {'—' if m == 'LoRA' else verdict(row, ref)} |")
    mach, load = doc["machine"], doc["load_1min"]
    busy = load["median"] > mach["logical_cpus"]
    lines += ["", f"Machine: {mach['cpu']} ({mach['logical_cpus']} logical CPUs); 1-min load average during the "
              f"experiment {load['min']:.1f} to {load['max']:.1f}, median {load['median']:.1f}"
              + (" (other jobs shared the machine, so step times carry that load)" if busy else "")
              + f"; whole experiment {doc['wall_s'] / 60:.1f} min. How to read it: docs/variants.md.",
              "", "![eval loss and exact match per method](methods.png)", ""]
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label, scale in ((axes[0], "eval_loss", "eval loss (lower is better)", 1),
                                  (axes[1], "exact_match", "exact match % (higher is better)", 100)):
        means = [table[n][key]["mean"] * scale for n in names]
        errs = [table[n][key]["spread"] * scale for n in names]
        ax.bar(range(len(names)), means, yerr=errs, capsize=4, color="#4c72b0")
        for i, n in enumerate(names):
            ax.scatter([i] * len(table[n]["runs"]), [r[key] * scale for r in table[n]["runs"]], color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
