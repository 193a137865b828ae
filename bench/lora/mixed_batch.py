"""Mixed-adapter batches, side by side with PEFT: SmolLM2-135M on CPU (fp32).

One batch of 8 rows whose rows are spread over 1, 4 or 8 LoRA adapters (r=16, all linear layers):

- lorakit: ``with lk.mixed_batch(model, names): model(ids)`` (stacked factors, gather + bmm);
- PEFT: ``peft_model(ids, adapter_names=names)`` (a Python loop over the adapters present in the batch).

Two shapes: prefill (8 x 64 tokens, entering ``mixed_batch`` included) and one decode step (8 x 1 token
over a 64-token KV cache, cropped back after each step; inside one ``mixed_batch``, entered once per
generation as the serving engine does). Calls alternate lorakit, PEFT, lorakit, PEFT ... and the medians are compared.
The same run measures forward latency of one adapter unmerged and merged against the plain base model
(8 x 64 tokens). Before timing, lorakit's mixed logits are checked against PEFT's.

Target (issue 6): mixed batches >= 1.5x PEFT's throughput with 8 adapters; merged = base within noise.
Results: bench/results/mixed_batch.json and .md. Usage: ``python -m bench.lora.mixed_batch``
(about 3-6 minutes on two cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch

import lorakit as lk
from lorakit.lora.adapters import lora_layers
from lorakit.models.load import load_model

from ..harness import RESULTS, Context, LoadMonitor, alternate, cpu_summary, load_line, write_json

MODEL = "smollm2-135m-instruct"
ROWS, SEQ = 8, 64
RANK = 16


def _adapters(base: torch.nn.Module, folder: Path, n: int) -> list[Path]:
    """n random adapters (B not zero, so they change the output), saved in PEFT format."""
    paths = []
    for i in range(n):
        model = copy.deepcopy(base)
        torch.manual_seed(1000 + i)
        cfg = lk.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)
        lk.inject(model, cfg, f"a{i}")
        with torch.no_grad():  # kaiming B is large for a real model; keep the logits sane
            for _, layer in lora_layers(model):
                layer.lora_B[f"a{i}"].weight.mul_(0.01)
        paths.append(lk.save_adapter(model, folder / f"a{i}", f"a{i}"))
        del model
    return paths


def _alternate(fns: dict[str, callable], reps: int) -> dict[str, float]:
    """Median seconds of each fn: one warm-up round, then ``reps`` rotated rounds (the harness's A B A B)."""
    samples = alternate(fns, Context(warmup=1, repeats=reps))
    return {k: statistics.median(v) for k, v in samples.items()}


def _decode_step(model, ids, past, **kw):
    """One decode step over a SEQ-token cache, then the cache is cropped back to SEQ."""
    def step():
        model(ids[:, -1:], past_key_values=past, use_cache=True, **kw)
        past.crop(-1)  # drop the token just appended
    return step


def _mixed_row(ours, theirs, ids, base_logits, n: int, reps: int) -> dict:
    """Prefill and decode throughput of lorakit vs PEFT with the 8 rows spread over n adapters."""
    names = [f"a{i % n}" for i in range(ROWS)]

    def lorakit_call(forward):
        with lk.mixed_batch(ours, names):
            return forward()

    def peft_call(forward):
        return forward(adapter_names=names)

    logits = lorakit_call(lambda: ours(ids).logits)
    diff = (logits - peft_call(lambda **kw: theirs(ids, **kw).logits)).abs().max()
    past_ours, past_theirs = ours(ids, use_cache=True).past_key_values, theirs(ids, use_cache=True).past_key_values
    prefill = _alternate({"lorakit": lambda: lorakit_call(lambda: ours(ids)),
                          "peft": lambda: peft_call(lambda **kw: theirs(ids, **kw))}, reps)
    with lk.mixed_batch(ours, names):  # entered once per generation, as the engine does
        decode = _alternate({"lorakit": _decode_step(ours, ids, past_ours),
                             "peft": _decode_step(theirs, ids, past_theirs, adapter_names=names)}, reps)
    return {"adapters": n, "max_abs_logit_diff_vs_peft": float(diff),
            "max_abs_logit_change_by_adapters": float((logits - base_logits).abs().max()),
            "prefill_tokens_per_s": {k: ROWS * SEQ / v for k, v in prefill.items()},
            "decode_tokens_per_s": {k: ROWS / v for k, v in decode.items()},
            "prefill_speedup": prefill["peft"] / prefill["lorakit"],
            "decode_speedup": decode["peft"] / decode["lorakit"]}


@torch.no_grad()
def run(reps: int, threads: int) -> dict:
    from peft import PeftModel

    torch.set_num_threads(threads)
    base, _ = load_model(MODEL)
    ids = torch.randint(100, 20000, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        paths = _adapters(base, Path(tmp), 8)
        ours = copy.deepcopy(base)
        for i, p in enumerate(paths):
            lk.load_adapter(ours, p, f"a{i}", activate=False)
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name="a0").eval()
        for i, p in enumerate(paths[1:], start=1):
            theirs.load_adapter(str(p), adapter_name=f"a{i}")
    results = {"model": MODEL, "rows": ROWS, "seq": SEQ, "rank": RANK, "threads": threads, "reps": reps, "mixed": []}
    base_logits = base(ids).logits
    for n in (1, 4, 8):
        results["mixed"].append(_mixed_row(ours, theirs, ids, base_logits, n, reps))
        print(json.dumps(results["mixed"][-1]), flush=True)
    results["latency"] = _latency(base, ours, ids, reps)
    print(json.dumps(results["latency"]))
    return results


def _latency(base, ours, ids, reps: int) -> dict:
    """Forward latency of one adapter unmerged and merged, as ratios to the plain base model."""
    lk.set_active(ours, ["a0"])
    unmerged = _alternate({"base": lambda: base(ids), "unmerged": lambda: ours(ids)}, reps)
    lk.merge(ours, ["a0"])
    merged = _alternate({"base": lambda: base(ids), "merged": lambda: ours(ids)}, reps)
    lk.unmerge(ours)
    return {"unmerged_over_base": unmerged["unmerged"] / unmerged["base"],
            "merged_over_base": merged["merged"] / merged["base"],
            "base_ms": 1000 * statistics.median([unmerged["base"], merged["base"]])}


def write(results: dict) -> None:
    write_json(RESULTS / "mixed_batch.json", results)
    lines = [f"# Mixed-adapter batches vs PEFT ({results['model']}, CPU fp32, {results['threads']} threads)", "",
             f"Batch of {results['rows']} rows, r={results['rank']} on all linear layers; medians of "
             f"{results['reps']} interleaved calls.", "",
             "| adapters in batch | prefill tok/s lorakit | prefill tok/s PEFT | speedup | decode tok/s lorakit "
             "| decode tok/s PEFT | speedup | max abs logit diff vs PEFT |", "|---|---|---|---|---|---|---|---|"]
    for r in results["mixed"]:
        p, d = r["prefill_tokens_per_s"], r["decode_tokens_per_s"]
        lines.append(f"| {r['adapters']} | {p['lorakit']:.0f} | {p['peft']:.0f} | {r['prefill_speedup']:.2f}x | "
                     f"{d['lorakit']:.1f} | {d['peft']:.1f} | {r['decode_speedup']:.2f}x | "
                     f"{r['max_abs_logit_diff_vs_peft']:.1e} |")
    lat, mach = results["latency"], results["machine"]
    lines += ["", f"Forward latency ({results['rows']}x{results['seq']} tokens, base {lat['base_ms']:.0f} ms): "
              f"unmerged/base = {lat['unmerged_over_base']:.3f}, merged/base = {lat['merged_over_base']:.3f}", "",
              f"CPU: {mach['cpu']} ({mach['logical_cpus']} logical CPUs; {', '.join(mach['flags'])}); torch "
              f"{mach['torch']}, peft {results['peft']}. " + load_line(mach["load"]) + ".", ""]
    (RESULTS / "mixed_batch.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import peft

    with LoadMonitor() as load:
        results = run(args.reps, args.threads)
    write({**results, "peft": peft.__version__, "machine": {**cpu_summary(), "load": load.report()}})
    print((RESULTS / "mixed_batch.md").read_text())


if __name__ == "__main__":
    main()
