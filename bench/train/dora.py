"""DoRA's cost: lorakit's DoRA against PEFT's DoRA (and plain LoRA), training steps side by side.

Two scales, each timed A B C rotated rounds with warm-up discarded (bench/common.alternate):

- one layer: a SmolLM2-sized Linear (576 → 1536) with its adapter, forward + backward on (tokens, 576);
- the model: a full AdamW step of SmolLM2-135M (all-linear adapters) on a text batch.

lorakit takes DoRA's row norm as ‖W‖² (cached: W is frozen) + 2s·rowsum(W·Aᵀ ⊙ B) + s²·rowsum(B·AAᵀ ⊙ B),
never forming W + s·BA; PEFT forms B·A through an identity matrix and adds it to W every forward.

    python -m bench.train.dora            # bench/results/dora_step.{json,md}
    python -m bench.train.dora --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from ..harness import RESULTS, Context, LoadMonitor, alternate, auto_threads, machine_info, ratio, summary
from ..workload import base, lora_fields, text_batch, to_device, train_step


def _layer_cases(ctx: Context, tokens: int) -> dict:
    import peft

    import lorakit as lk

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(576, 1536, bias=False))
    x = torch.randn(tokens, 576)
    cfg = dict(r=ctx.r, lora_alpha=ctx.lora_alpha, target_modules=["0"])
    models = {"lorakit LoRA": lk.inject(_copy(linear), lk.LoraConfig(**cfg)),
              "lorakit DoRA": lk.inject(_copy(linear), lk.LoraConfig(**cfg, use_dora=True)),
              "peft DoRA": peft.get_peft_model(_copy(linear), peft.LoraConfig(**cfg, use_dora=True))}

    def case(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        return run

    return {k: case(m.train()) for k, m in models.items()}


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def _model_cases(ctx: Context) -> dict:
    import peft

    import lorakit as lk

    batch = to_device(text_batch(ctx), ctx)
    fields = lora_fields(ctx, 0.0)
    models = {"lorakit LoRA": lk.inject(base(ctx), lk.LoraConfig(**fields)),
              "lorakit DoRA": lk.inject(base(ctx), lk.LoraConfig(**fields, use_dora=True)),
              "peft DoRA": peft.get_peft_model(base(ctx), peft.LoraConfig(**fields, use_dora=True))}
    return {k: train_step(m, batch, ctx) for k, m in models.items()}


def measure(ctx: Context, log) -> dict:
    out = {}
    for scale, cases in (("layer", _layer_cases(ctx, 4 * ctx.seq)), ("model", _model_cases(ctx))):
        log(f"[dora] {scale}: {', '.join(cases)}")
        samples = alternate(cases, ctx, repeats=ctx.repeats * (4 if scale == "layer" else 1), log=log)
        out[scale] = {"summary": {k: summary(v) for k, v in samples.items()},
                      "lorakit_vs_peft": ratio(samples["lorakit DoRA"], samples["peft DoRA"]),
                      "dora_vs_lora": ratio(samples["lorakit DoRA"], samples["lorakit LoRA"])}
        del cases
    return out


def render(doc: dict) -> str:
    c, m = doc["config"], doc["machine"]
    lines = ["# DoRA: lorakit vs PEFT", "",
             f"Seconds per call, median of {c['repeats']} rotated rounds (layer: ×4), fp32, r={c['r']}, "
             f"alpha={c['lora_alpha']}, {c['threads']} thread(s). Layer: Linear 576→1536, forward + backward on "
             f"({4 * c['seq']}, 576). Model: SmolLM2-135M all-linear AdamW step on a ({c['batch']}, {c['seq']}) "
             "text batch. Ratios < 1: lorakit is faster; ± is half the IQR of the per-round ratios.", "",
             "| scale | lorakit LoRA | lorakit DoRA | PEFT DoRA | lorakit DoRA / PEFT DoRA | DoRA / LoRA (lorakit) |",
             "|---|---:|---:|---:|---:|---:|"]
    for scale, r in doc["results"].items():
        s = r["summary"]
        lv, dl = r["lorakit_vs_peft"], r["dora_vs_lora"]
        lines.append(f"| {scale} | {s['lorakit LoRA']['median']:.4f} | {s['lorakit DoRA']['median']:.4f} | "
                     f"{s['peft DoRA']['median']:.4f} | {lv['value']:.2f} ± {lv['noise']:.0%} | "
                     f"{dl['value']:.2f} ± {dl['noise']:.0%} |")
    load = doc["load"]
    lines += ["", f"CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs); torch {m['torch']}, peft {m['peft']}. "
              f"1-min load average during the run {load['min']:.1f}–{load['max']:.1f} (median {load['median']:.1f}) on "
              f"{load['cores']} cores" + (": other jobs shared the machine; absolute times carry that load, the "
              "interleaved ratios less so." if load["median"] > load["cores"] else "."), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    threads, why = auto_threads()
    torch.set_num_threads(threads)
    ctx = (Context.quick_run if args.quick else Context)(repeats=args.repeats, threads=threads, threads_why=why,
                                                         batch=2, seq=64)
    with LoadMonitor() as load:
        results = measure(ctx, print)
    doc = {"config": ctx.config(), "machine": machine_info(ctx), "load": load.report(), "results": results}
    out = RESULTS / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dora_step.json").write_text(json.dumps(doc, indent=1))
    (out / "dora_step.md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
