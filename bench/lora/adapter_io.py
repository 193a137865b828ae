"""Figure 5: adapter load + activate time, and merge + unmerge time, lorakit vs PEFT.

Both sides start from the base model holding one adapter ("default") and load a second one from
the same PEFT-format directory (r = ctx.r, all linear layers):

- lorakit: ``lk.load_adapter(model, path, "bench")`` (checks, wraps, activates);
- PEFT: ``peft_model.load_adapter(path, "bench")`` then ``peft_model.set_adapter("bench")``.

After each timed call the adapter is deleted again and "default" reactivated, untimed. A third row
times ``lk.read_adapter`` alone (read + validate the files, nothing applied) to show where load time
goes. Merge + unmerge: ``lk.merge`` then ``lk.unmerge`` vs ``merge_adapter`` then ``unmerge_adapter``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lorakit as lk
from lorakit.lora.adapters import lora_layers

from ..harness import Context, alternate, fmt_median, ratio, summary, target
from ..workload import base
from .forward_latency import make_adapter

NAME, FIGURE, TITLE = "adapter_io", 5, "Adapter load + activate, merge + unmerge"
WHAT = ("Seconds to load a PEFT-format adapter from disk into a model and make it active, and to merge "
        "then unmerge one adapter. Ratios < 1: lorakit is faster.")
ROUNDS_FACTOR = 3  # cheap calls: three times the rounds of the other figures


def run(ctx: Context, done: dict, log) -> dict:
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        path = make_adapter(ctx, Path(tmp), "bench")
        ours = lk.load_adapter(base(ctx), path, "default")
        theirs = PeftModel.from_pretrained(base(ctx), str(path), adapter_name="default").eval()
        n_layers = sum(1 for _ in lora_layers(ours))

        def lk_reset():
            lk.delete_adapter(ours, "bench")
            lk.set_active(ours, "default")

        def peft_load():
            theirs.load_adapter(str(path), adapter_name="bench")
            theirs.set_adapter("bench")

        def peft_reset():
            theirs.set_adapter("default")
            theirs.delete_adapter("bench")

        log("  load + activate")
        load = alternate({"lorakit load_adapter": (lambda: lk.load_adapter(ours, path, "bench"), lk_reset),
                          "peft load_adapter + set_adapter": (peft_load, peft_reset),
                          "lorakit read_adapter only": lambda: lk.read_adapter(path)},
                         ctx, ctx.repeats * ROUNDS_FACTOR, log=log)
    log("  merge + unmerge")
    merge = alternate({"lorakit merge + unmerge": lambda: (lk.merge(ours, "default"), lk.unmerge(ours)),
                       "peft merge_adapter + unmerge_adapter": lambda: (theirs.merge_adapter(),
                                                                        theirs.unmerge_adapter())},
                      ctx, ctx.repeats * ROUNDS_FACTOR, log=log)
    load_r = ratio(load["lorakit load_adapter"], load["peft load_adapter + set_adapter"])
    merge_r = ratio(merge["lorakit merge + unmerge"], merge["peft merge_adapter + unmerge_adapter"])
    read_share = ratio(load["lorakit read_adapter only"], load["lorakit load_adapter"])["value"]
    rows = [[k, fmt_median(summary(v)), f"**{load_r['value']:.3f}** ±{load_r['noise']:.1%}"
             if k == "lorakit load_adapter" else ""] for k, v in load.items()]
    rows += [[k, fmt_median(summary(v)), f"{merge_r['value']:.3f} ±{merge_r['noise']:.1%}"
              if k.startswith("lorakit") else ""] for k, v in merge.items()]
    lk_load = summary(load["lorakit load_adapter"])["median"]
    why = (f"reading and checking the files is {read_share:.0%} of lorakit's load; the rest, "
           f"{lk_load * (1 - read_share) / n_layers * 1e6:.0f} µs per LoRA layer, is wrapping and setting factors")
    targets = [target("adapter load + activate, lorakit / PEFT", load_r["value"], 0.5, why, noise=load_r["noise"])]
    table = {"caption": f"Adapter r = {ctx.r} on all linear layers ({n_layers} LoRA layers), the model already "
                        "holding one adapter; ratios lorakit / PEFT",
             "columns": ["operation", "median ±½IQR", "lorakit / PEFT"], "rows": rows}
    notes = [f"{ctx.repeats * ROUNDS_FACTOR} rounds (these calls are short). The OS file cache is warm after the "
             "warm-up round, for both sides.", "Merge + unmerge has no target in the issue; shown for reference."]
    return {"what": WHAT, "tables": [table], "notes": notes, "targets": targets,
            "data": {"load": {k: summary(v) for k, v in load.items()},
                     "merge": {k: summary(v) for k, v in merge.items()}, "lora_layers": n_layers}}
