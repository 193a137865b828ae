"""Figure 7: QLoRA. Resident model memory (fp32, bf16, nf4, nf4 + double quantization), and the
training step time and step peak memory of lorakit vs PEFT on the same bitsandbytes NF4 layers.

Both competitors get a base quantized by ``lk.quantize`` (NF4, double-quantized scales) in the
QLoRA compute dtype (bf16 where the device computes it natively, else fp32). PEFT sees the model
flagged as transformers' 4-bit loader flags it, so it wraps the layers with its own
``lora.bnb.Linear4bit``; lorakit wraps them with ``LoraLinear``. Same loss, batch, seed and AdamW
as figure 1; step memory is measured by figure 2's worker (each case in a fresh process on CPU).
"""

from __future__ import annotations

import torch

from ..harness import Context, alternate, fmt_mb, fmt_median, ratio, summary, target
from ..workload import Case, base, build, loss_of, text_batch, to_device, train_step
from .memory import _run_worker

NAME, FIGURE, TITLE = "qlora", 7, "QLoRA: resident model, step time and step memory vs PEFT"
WHAT = ("Bytes the loaded model holds (every parameter, buffer and bitsandbytes quantization state), and a "
        "training step (zero_grad, forward, loss, backward, AdamW) of LoRA on an NF4 base (double-quantized "
        "scales), lorakit vs PEFT on the same bitsandbytes layers. Ratios < 1: lorakit is faster / needs less.")
METHOD = "nf4"


def compute_dtype(ctx: Context) -> str:
    """QLoRA's compute dtype here: bf16 where the device computes it natively (as the trainer's dtype=auto)."""
    from lorakit.models.dtype import native_bf16

    return "bfloat16" if native_bf16(ctx.device) else "float32"


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters, buffers and bitsandbytes' quant_state tensors."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in (*model.parameters(), *model.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # absmax and code, and the nested state of double quantization
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total


def resident(ctx: Context, log) -> dict[str, dict]:
    """The four loaded models: tensor bytes (and, on CUDA, memory_allocated) each."""
    import lorakit as lk

    out = {}
    for label, dtype, dq in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                             ("nf4", torch.bfloat16, False), ("nf4 + double quant", torch.bfloat16, True)):
        cuda = ctx.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
        model = base(ctx).to(dtype)
        if dq is not None:
            lk.quantize(model, METHOD, double_quant=dq)
        row = {"bytes": model_bytes(model)}
        if cuda:
            torch.cuda.synchronize()
            row["cuda_allocated"] = torch.cuda.memory_allocated() - before
        out[label] = row
        log(f"  {label}: {fmt_mb(row['bytes'])}")
        del model
    return out


def cases(ctx: Context) -> list[Case]:
    dtype = compute_dtype(ctx)
    return [Case(f"{kind} p={p:g} qlora", kind, p, dtype, quantize=METHOD)
            for p in ctx.dropouts for kind in ("lorakit", "peft")]


def run(ctx: Context, done: dict, log) -> dict:
    sizes = resident(ctx, log)
    batch = to_device(text_batch(ctx), ctx)
    qcases = cases(ctx)
    steps = {c.label: train_step(build(c, ctx), batch, ctx, loss_of(c)) for c in qcases}
    log(f"  text batch {tuple(batch['input_ids'].shape)}, {compute_dtype(ctx)} compute, competitors: {', '.join(steps)}")
    samples = alternate(steps, ctx, log=log)
    first_loss = {label: float(step.losses[0]) for label, step in steps.items()}
    del steps
    memory = _run_worker(ctx, qcases, log)
    inc = {label: row["increase"] for label, row in memory.items()}
    fp32 = sizes["fp32"]["bytes"]
    size_rows = [[label, fmt_mb(r["bytes"]), f"{r['bytes'] / fp32:.3f}"]
                 + ([fmt_mb(r["cuda_allocated"])] if "cuda_allocated" in r else []) for label, r in sizes.items()]
    step_rows, targets = [], []
    for p in ctx.dropouts:
        lk_label, pf_label = f"lorakit p={p:g} qlora", f"peft p={p:g} qlora"
        t = ratio(samples[lk_label], samples[pf_label])
        m = inc[lk_label] / inc[pf_label]
        for label in (lk_label, pf_label):
            mine = label == lk_label
            step_rows.append([label, fmt_median(summary(samples[label])), f"**{t['value']:.3f}** ±{t['noise']:.1%}"
                              if mine else "", fmt_mb(inc[label]), f"**{m:.3f}**" if mine else "",
                              f"{first_loss[label]:.4f}"])
        why = (f"lorakit {fmt_median(summary(samples[lk_label]))} vs PEFT {fmt_median(summary(samples[pf_label]))}: "
               "most of a QLoRA step is bitsandbytes' dequantize + matmul of the frozen base, the same layers "
               "in both")
        targets.append(target(f"QLoRA train step, lorakit / PEFT at dropout {p:g}", t["value"],
                              0.9 if p > 0 else 1.0, why, noise=t["noise"]))
        if p > 0:
            targets.append(target(f"QLoRA step peak memory, lorakit / PEFT at dropout {p:g}", m, 0.85,
                                  f"lorakit +{fmt_mb(inc[lk_label])} vs PEFT +{fmt_mb(inc[pf_label])}"))
    dq = sizes["nf4 + double quant"]["bytes"] / fp32
    targets.append(target("resident model, nf4 + double quant / fp32", dq, 0.35,
                          "the embeddings and the output head stay in 16 bits (SmolLM2-135M ties them: 28 M of "
                          "its 135 M parameters), a large share of a small model"))
    cols = ["model", "tensor bytes", "/ fp32"] + (["cuda memory_allocated"] if ctx.device.startswith("cuda") else [])
    what = "peak RSS (VmHWM) − RSS" if ctx.device == "cpu" else "max_memory_allocated − memory_allocated"
    tables = [
        {"caption": f"Resident model: {ctx.model}; nf4 = every Linear but the output head in NF4 (bitsandbytes, "
                    "blocks of 64), the rest in bf16", "columns": cols, "rows": size_rows},
        {"caption": f"Training step on the NF4 + double quant base, {compute_dtype(ctx)} compute, text batch "
                    f"{ctx.batch}×{ctx.seq}, loss = model(input_ids, labels=labels).loss; step memory = {what}",
         "columns": ["competitor", "step (median ±½IQR)", "lorakit / PEFT", "step peak increase",
                     "lorakit / PEFT", "loss, 1st step"], "rows": step_rows}]
    notes = ["Both competitors wrap the same bitsandbytes Linear4bit layers (lk.quantize): PEFT through its "
             "lora.bnb.Linear4bit (the model is flagged is_loaded_in_4bit, as transformers' loader flags it), "
             "lorakit through LoraLinear, whose base forward is bitsandbytes' own.",
             "On CPU, lorakit turns off bitsandbytes' AVX512-BF16 repacking of 4-bit weights (its forward has "
             "no backward: a training step after an eval-mode forward would get no input gradients); both "
             "competitors train in train mode here, where bitsandbytes does not repack."]
    return {"what": WHAT, "tables": tables, "notes": notes, "targets": targets,
            "data": {"resident": sizes, "steps": {k: summary(v) for k, v in samples.items()},
                     "first_loss": first_loss, "memory": memory, "compute_dtype": compute_dtype(ctx)}}
