"""Figure 2: peak memory of a training step, over the loaded model, lorakit vs PEFT vs full fine-tuning.

On CPU each case runs in its own fresh process, so one case's freed memory cannot hide another's
peak: a worker process imports torch, transformers, peft and lorakit once, then forks one child per
case (the worker itself never loads a model or runs a tensor op). On CUDA the worker runs the cases
one after the other itself (allocated bytes do not depend on history, and a forked child cannot use
CUDA once its parent touched it). Each case loads the model, builds the competitor and the batch,
then measures two training steps (the first creates the AdamW state):

- CPU: peak resident memory. The weights are made resident first (workload.load copies them out of
  the mmapped checkpoint), and the high-water mark is reset after loading (/proc/self/clear_refs, so
  the loading's transient peak is not counted); increase = VmHWM after the steps − VmRSS before them.
- CUDA: torch.cuda.max_memory_allocated after the steps − memory_allocated before them.

Usage of the worker (internal): ``python -m bench.train.memory --worker < spec.json``.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
from pathlib import Path

from ..harness import Context, emit, fmt_mb, run_worker, target

NAME, FIGURE, TITLE = "step_memory", 2, "Peak memory of a training step"
WHAT = ("Peak memory during two training steps minus the memory of the loaded model (with its adapter), "
        "each case in a fresh process. Same model, batch, loss and AdamW as figure 1. Ratios < 1: lorakit "
        "needs less.")
STEPS = 2
# glibc raises its mmap threshold after each large free, so later tensors land in the heap and RSS
# follows allocation history rather than live memory; a fixed threshold keeps every tensor above
# 128 KiB in its own mapping, returned to the system when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _measure(ctx: Context, case) -> dict:
    """One case: load, build, reset the peak, run STEPS steps, report bytes."""
    import torch

    from .. import workload

    torch.set_num_threads(ctx.threads)
    model, tok = workload.load(ctx.model)
    ctx._cache.update(model=model, tokenizer=tok)
    model = workload.build(case, ctx, model.to(ctx.device))
    batch = workload.to_device(workload.text_batch(ctx), ctx)
    step = workload.train_step(model, batch, ctx, workload.loss_of(case))
    # Page in the code and scratch a forward + backward touches the first time (kernels, allocator
    # arenas: ~300 MiB on CPU, the same for every case) with one short row, gradients dropped after.
    workload.plain_loss(model, {k: v[:1, :8] for k, v in batch.items()}).backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    cuda = ctx.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS") * 1024
    for _ in range(STEPS):
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kb("VmHWM") * 1024
    n_params = sum(t.numel() for t in model.parameters())
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    inputs = sum(m.in_features for m in adapted)  # PEFT's and lorakit's LoRA Linear both know in_features
    return {"before": before, "peak": peak, "increase": peak - before, "params": n_params, "trainable": trainable,
            "adapted_linears": len(adapted), "adapted_input_floats_per_token": inputs,
            "loss": [float(x) for x in step.losses]}


def _case(ctx: Context, case) -> dict:
    try:
        return {"label": case.label, **_measure(ctx, case)}
    except Exception as exc:  # reported to the parent process, which raises with it
        return {"label": case.label, "error": f"{type(exc).__name__}: {exc}"}


def _in_child(ctx: Context, case) -> dict:
    """Run one case in a forked child; its JSON comes back through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, json.dumps(_case(ctx, case)).encode())
        os._exit(0)  # the child must never return into the worker's loop
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    return json.loads(text) if text else {"label": case.label, "error": f"child died (wait status {status})"}


def worker() -> None:
    """Read the spec from stdin, run each case (CPU: in a forked child), emit every case's row."""
    import peft  # noqa: F401  (imported once here, before the forks)
    import torch
    import transformers  # noqa: F401

    import lorakit  # noqa: F401

    from ..workload import Case, preload

    spec = json.load(sys.stdin)
    cfg = spec["context"]
    preload(cfg["model"])
    ctx = Context(**{**cfg, **{k: tuple(cfg[k]) for k in ("dropouts", "infer_batches", "precisions")}})
    rows = []
    for row in spec["cases"]:
        case = Case(*row)
        if ctx.device.startswith("cuda"):
            rows.append(_case(ctx, case))
            ctx._cache.clear()  # the next case starts from an empty GPU
            gc.collect()
            torch.cuda.empty_cache()
        else:
            rows.append(_in_child(ctx, case))
    emit({"rows": rows})


def _run_worker(ctx: Context, cases, log) -> dict[str, dict]:
    # the worker imports the figure's model spec ("module:function") from this process's path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **MALLOC_ENV}
    spec = {"context": ctx.config(), "cases": cases}
    rows = run_worker(["-m", "bench.train.memory", "--worker"], env=env, input=json.dumps(spec), timeout=1800)["rows"]
    found = {row["label"]: row for row in rows}
    for row in rows:
        log("  " + (f"{row['label']}: +{fmt_mb(row['increase'])}" if "error" not in row else json.dumps(row)))
    if len(found) != len(cases) or any("error" in r for r in found.values()):
        raise RuntimeError(f"memory worker failed: {found}")
    return found


def run(ctx: Context, done: dict, log) -> dict:
    from ..workload import SHORT, base_label, precision_tag, training_cases

    cases = training_cases(ctx, variants=True)
    rows_data = _run_worker(ctx, cases, log)
    inc = {label: row["increase"] for label, row in rows_data.items()}
    tokens = ctx.batch * ctx.seq
    rows = []
    for label, row in rows_data.items():
        plain, vs = base_label(label), ""
        if label != plain:
            vs = f"{inc[label] / inc[plain]:.2f}× {plain}"
        elif label.startswith("lorakit"):
            vs = f"**{inc[label] / inc['peft' + label.removeprefix('lorakit')]:.3f}**"
        rows.append([label, fmt_mb(row["increase"]), vs,
                     "" if label.startswith("full") else f"{inc[label] / inc['full' + precision_tag(label)]:.3f}",
                     fmt_mb(row["before"]), f"{row['trainable']:,}"])
    targets = []
    for dtype in ctx.precisions:
        tag = SHORT[dtype]
        for p in [q for q in ctx.dropouts if q > 0]:
            lk, pf = inc[f"lorakit p={p:g}{tag}"], inc[f"peft p={p:g}{tag}"]
            copy_mb = rows_data[f"lorakit p={p:g}{tag}"]["adapted_input_floats_per_token"] * tokens * 4
            why = (f"dropout adds {fmt_mb(lk - inc.get(f'lorakit p=0{tag}', lk))} to lorakit's peak "
                   f"(PEFT: {fmt_mb(pf - inc.get(f'peft p=0{tag}', pf))}); one fp32 dropped copy of every adapted "
                   f"Linear's input for this batch is {fmt_mb(copy_mb)}")
            targets.append(target(f"step peak memory, lorakit / PEFT at dropout {p:g}, {dtype} base", lk / pf, 0.85,
                                  why))
    what = "peak RSS (VmHWM) − RSS" if ctx.device == "cpu" else "max_memory_allocated − memory_allocated"
    table = {"caption": f"{what}; text batch {ctx.batch}×{ctx.seq}, {STEPS} steps (the first creates AdamW's state)",
             "columns": ["competitor", "peak increase", "lorakit / PEFT", "/ full FT", "loaded model", "trainable params"],
             "rows": rows}
    notes = [f"Measured once per case, each in a fresh process ({what} does not vary like time does; glibc's "
             "mmap threshold is fixed at 128 KiB there, so RSS follows live tensors rather than allocation history).",
             "full FT's increase holds its gradients and AdamW's two moments for every parameter (bf16 table: fp32 "
             "weights under autocast, which also keeps bf16 copies of the weights for the step).",
             "+ckpt: activation checkpointing in every decoder block (non-reentrant, so the frozen base needs no "
             "input gradients): each block keeps only its input and is recomputed in backward. +lk loss: lorakit's "
             "trainer loss (head and cross-entropy fused, logits in chunks, never kept) instead of transformers'."]
    return {"what": WHAT, "tables": [table], "notes": notes, "targets": targets,
            "data": {"cases": rows_data, "steps": STEPS, "measure": what}}


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
        sys.stdout.flush()
        os._exit(0)  # skip the interpreter's teardown of torch & co. (seconds), nothing is left to clean
    else:
        sys.exit("internal worker of bench/train/memory.py; run the suite with: python -m bench.run --only step_memory")
