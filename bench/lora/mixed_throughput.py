"""Figure 6: mixed-adapter batch throughput vs PEFT, measured by bench/lora/mixed_batch.py (issue 6).

This figure calls ``bench.lora.mixed_batch.run(reps, threads)`` as it is: a batch of 8 rows spread over
1, 4 and 8 adapters (r = 16), prefill (8 × 64 tokens) and one decode step, lorakit's mixed_batch vs
PEFT's ``adapter_names``, alternated A B A B after one warm-up, medians of ``reps`` (= --repeats).
Its size and model are fixed there (SmolLM2-135M on CPU), so other models and CUDA skip it.
mixed_batch.py writes nothing when called this way; its own results/mixed_batch.* stay its own.
"""

from __future__ import annotations

from ..harness import DEFAULT_MODEL, Context, target

NAME, FIGURE, TITLE = "mixed_throughput", 6, "Mixed-adapter batch throughput"
WHAT = ("Tokens per second of one batch whose rows use different adapters: lorakit's mixed_batch (stacked "
        "factors, gather + bmm) vs PEFT's adapter_names (a loop over the adapters present). Speedup > 1: "
        "lorakit is faster. Target from issue 6: ≥ 1.5× PEFT with 8 adapters.")


def skip_reason(ctx: Context) -> str | None:
    if ctx.device != "cpu" or ctx.model != DEFAULT_MODEL:
        return f"bench/lora/mixed_batch.py measures {DEFAULT_MODEL} on CPU only (this run: {ctx.model} on {ctx.device})"
    return None


def run(ctx: Context, done: dict, log) -> dict:
    reason = skip_reason(ctx)
    if reason:
        return {"what": WHAT, "skipped": reason, "tables": [], "notes": [], "targets": [], "data": {}}
    from . import mixed_batch

    log(f"  bench.lora.mixed_batch.run(reps={ctx.repeats}, threads={ctx.threads}) (its own progress lines follow)")
    res = mixed_batch.run(ctx.repeats, ctx.threads)
    return summarize(res)


def summarize(res: dict) -> dict:
    """Figure 6 from the dict bench.lora.mixed_batch.run returns."""
    rows, targets = [], []
    for r in res["mixed"]:
        p, d = r["prefill_tokens_per_s"], r["decode_tokens_per_s"]
        rows.append([str(r["adapters"]), f"{p['lorakit']:.0f}", f"{p['peft']:.0f}", f"**{r['prefill_speedup']:.2f}×**",
                     f"{d['lorakit']:.1f}", f"{d['peft']:.1f}", f"**{r['decode_speedup']:.2f}×**",
                     f"{r['max_abs_logit_diff_vs_peft']:.1e}"])
    eight = max(res["mixed"], key=lambda r: r["adapters"])
    lat = res.get("latency")
    for phase in ("prefill", "decode"):
        value = eight[f"{phase}_speedup"]
        why = f"with {eight['adapters']} adapters lorakit reaches {value:.2f}× PEFT's {phase} tokens/s"
        if phase == "prefill" and lat:  # the base model alone, same 8 × 64 forward: no adapter path can beat it
            base_tps = res["rows"] * res["seq"] / (lat["base_ms"] / 1000)
            ceiling = base_tps / eight["prefill_tokens_per_s"]["peft"]
            why += (f"; the base model alone runs {base_tps:.0f} tok/s, so even a free adapter path would reach "
                    f"only {ceiling:.2f}× PEFT here: prefill time is almost all base-model work")
        targets.append(target(f"mixed batch {phase}, lorakit / PEFT throughput, {eight['adapters']} adapters",
                              value, 1.5, why, op=">="))
    table = {"caption": f"{res['model']}, batch {res['rows']} × {res['seq']} tokens, r = {res['rank']}, "
                        f"{res['threads']} threads, medians of {res['reps']} alternated calls",
             "columns": ["adapters in batch", "prefill tok/s lorakit", "prefill tok/s PEFT", "speedup",
                         "decode tok/s lorakit", "decode tok/s PEFT", "speedup", "max |Δ logits| vs PEFT"],
             "rows": rows}
    notes = ["Measured by bench/lora/mixed_batch.py (another script of this folder), called unchanged."]
    if lat:
        notes.append(f"Its own latency check ({res['rows']}×{res['seq']}, base {lat['base_ms']:.0f} ms): unmerged / "
                     f"base = {lat['unmerged_over_base']:.3f}, merged / base = {lat['merged_over_base']:.3f}.")
    return {"what": WHAT, "tables": [table], "notes": notes, "targets": targets, "data": res}
