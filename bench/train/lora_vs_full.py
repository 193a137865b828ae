"""Figure 3: LoRA step time / full fine-tuning step time, next to the compute limit 2/3 + 2r/d.

A full step does three GEMMs per weight (forward, input gradient, weight gradient); with the base
frozen LoRA skips the weight gradient, leaving 2/3, plus the adapters' own work, about 2r/d of the
base (d: hidden size). The ratios come from figure 1's measurements when it ran in the same run
(same rounds, same process); alone, this figure measures them itself.
"""

from __future__ import annotations

from ..harness import Context, ratio, target
from ..workload import SHORT
from . import step as train_step

NAME, FIGURE, TITLE = "lora_vs_full", 3, "LoRA step / full fine-tuning step"
WHAT = ("LoRA training step time divided by the full fine-tuning step time (same model, batch, loss and "
        "AdamW; from the figure 1 rounds). The limit 2/3 + 2r/d is what the FLOP count allows.")


def run(ctx: Context, done: dict, log) -> dict:
    data = done.get("_train_step_data")
    if data is None:
        log("  (figure 1 did not run in this process: measuring the training steps here)")
        data = train_step.measure(ctx, log)
        done["_train_step_data"] = data
    samples, d = data["samples"], data["hidden_size"]
    limit = 2 / 3 + 2 * ctx.r / d
    rows, targets = [], []
    for dtype in ctx.precisions:
        tag = SHORT[dtype]
        for p in ctx.dropouts:
            lk_r = ratio(samples[f"lorakit p={p:g}{tag}"], samples["full" + tag])
            pf_r = ratio(samples[f"peft p={p:g}{tag}"], samples["full" + tag])
            rows.append([dtype, f"{p:g}", f"**{lk_r['value']:.3f}** ±{lk_r['noise']:.1%}",
                         f"{pf_r['value']:.3f} ±{pf_r['noise']:.1%}", f"{limit:.3f}", f"{lk_r['value'] - limit:+.3f}"])
            why = (f"lorakit is {lk_r['value'] - limit:+.3f} above the {limit:.3f} compute limit"
                   + (f" and dropout p={p:g} is part of that (see figure 1)" if p > 0 else "")
                   + ("; in bf16 the base's GEMMs are fast and the step's other work (attention, norms, "
                      "casts, the loss, AdamW) weighs more" if dtype != "float32" else ""))
            targets.append(target(f"LoRA / full step at dropout {p:g}, {dtype} (lorakit)", lk_r["value"], 0.75, why,
                                  noise=lk_r["noise"]))
    table = {"caption": f"r = {ctx.r}, d = {d} (hidden size): limit 2/3 + 2r/d = {limit:.3f}",
             "columns": ["base dtype", "dropout", "lorakit / full", "PEFT / full", "limit 2/3 + 2r/d", "lorakit − limit"],
             "rows": rows}
    notes = ["The limit counts the Linear layers' GEMMs only. Work both steps share (attention scores, norms, "
             "activations, the loss) pushes the measured ratio above it; the full step's AdamW update of every "
             "parameter (memory-bound) pulls it below."]
    return {"what": WHAT, "tables": [table], "notes": notes, "targets": targets,
            "data": {"limit": limit, "hidden_size": d, "r": ctx.r}}
