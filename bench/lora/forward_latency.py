"""Figure 4: inference forward latency with one adapter, unmerged and merged, over the plain base model.

Five models side by side: the plain base, lorakit unmerged, lorakit merged (lk.merge: the wrapper
stays, the delta is in the weight), PEFT unmerged, PEFT merged (merge_adapter). lorakit and PEFT hold
the very same adapter (saved by lorakit, loaded by both), with B ≠ 0 so merging changes the weights.
Calls are model(input_ids) under torch.no_grad(), full logits, batch 1 and 8.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import lorakit as lk
from lorakit.lora.adapters import lora_layers

from ..harness import Context, alternate, fmt_median, fmt_s, ratio, summary, target
from ..workload import base, lora_fields, text_batch

NAME, FIGURE, TITLE = "forward_latency", 4, "Forward latency: unmerged and merged over base"
WHAT = ("Seconds per inference forward (no_grad, full logits) with one LoRA adapter, divided by the plain "
        "base model's time in the same rounds. Merged should cost nothing: target merged / base = 1 ± 3%.")


def make_adapter(ctx: Context, folder: Path, name: str = "bench") -> Path:
    """A random adapter (B ≠ 0, scaled small so logits stay sane), saved in PEFT format."""
    model = base(ctx)
    torch.manual_seed(ctx.seed + 1)
    lk.inject(model, lk.LoraConfig(**lora_fields(ctx, 0.0), init_lora_weights=False), name)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if hasattr(layer, "lora_B"):
                layer.lora_B[name].weight.mul_(0.01)
    return lk.save_adapter(model, folder / name, name)


def models(ctx: Context, path: Path) -> dict[str, torch.nn.Module]:
    from peft import PeftModel

    out = {"base": base(ctx), "lorakit unmerged": lk.load_adapter(base(ctx), path),
           "lorakit merged": lk.load_adapter(base(ctx), path),
           "peft unmerged": PeftModel.from_pretrained(base(ctx), str(path)).eval(),
           "peft merged": PeftModel.from_pretrained(base(ctx), str(path)).eval()}
    lk.merge(out["lorakit merged"])
    out["peft merged"].merge_adapter()
    return out


@torch.no_grad()
def _agreement(mods: dict, ids: torch.Tensor) -> dict:
    logits = {k: m(ids).logits.float() for k, m in mods.items()}
    ref = logits["lorakit unmerged"]
    return {"adapter effect (max |Δ logits| vs base)": float((ref - logits["base"]).abs().max()),
            **{f"{k} vs lorakit unmerged": float((v - ref).abs().max()) for k, v in logits.items()
               if k not in ("base", "lorakit unmerged")}}


def run(ctx: Context, done: dict, log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mods = models(ctx, make_adapter(ctx, Path(tmp)))
    n_layers = sum(1 for _ in lora_layers(mods["lorakit merged"]))
    rows, targets, data = [], [], {"lora_layers": n_layers}
    for b in ctx.infer_batches:
        ids = text_batch(ctx, b, ctx.infer_seq)["input_ids"].to(ctx.device)
        agree = _agreement(mods, ids[:1])
        cases = {k: (lambda m=m, ids=ids: _forward(m, ids)) for k, m in mods.items()}
        log(f"  batch {b}×{ctx.infer_seq}")
        samples = alternate(cases, ctx, log=log)
        data[f"batch {b}"] = {"samples": {k: summary(v) for k, v in samples.items()}, "max_abs_logit_diff": agree}
        cells = [f"{b}×{ctx.infer_seq}", fmt_median(summary(samples["base"]))]
        for k in ("lorakit unmerged", "lorakit merged", "peft unmerged", "peft merged"):
            r = ratio(samples[k], samples["base"])
            cells.append(f"{'**' if k == 'lorakit merged' else ''}{r['value']:.3f}"
                         f"{'**' if k == 'lorakit merged' else ''} ±{r['noise']:.1%}")
        rows.append(cells)
        merged = ratio(samples["lorakit merged"], samples["base"])
        extra = summary(samples["lorakit merged"])["median"] - summary(samples["base"])["median"]
        if extra > 0:
            why = (f"the merged model costs {fmt_s(extra)} more per forward than the base, {fmt_s(extra / n_layers)} "
                   f"for each of its {n_layers} LoRA layers")
        else:
            why = f"the merged model ran {fmt_s(-extra)} faster than the base model: noise, as both do the same work"
        targets.append(target(f"merged / base forward, batch {b}", merged["value"], 0.03, why, op="within",
                              noise=merged["noise"]))
    table = {"caption": f"One adapter, r = {ctx.r}, all linear layers ({n_layers} LoRA layers); ratios to the base "
                        "model's time in the same rounds",
             "columns": ["batch × seq", "base", "lorakit unmerged", "lorakit merged", "PEFT unmerged", "PEFT merged"],
             "rows": rows}
    first = data[f"batch {ctx.infer_batches[0]}"]["max_abs_logit_diff"]
    notes = ["Outputs checked before timing (max |Δ logits|, batch row 0): "
             + ", ".join(f"{k} {v:.1e}" for k, v in first.items()) + "."]
    return {"what": WHAT, "tables": [table], "notes": notes, "targets": targets, "data": data}


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(ids)
