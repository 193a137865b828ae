"""Run the benchmark suite: lorakit vs PEFT vs full fine-tuning, side by side (issue 7).

    python -m bench.run                          # every figure, CPU (make bench)
    python -m bench.run --only train_step        # one figure; README.md keeps the others' last results
    python -m bench.run --device cuda            # on a GPU: results go to bench/results/cuda/
    python -m bench.run --quick                  # smoke run: small shapes, 3 rounds (bench/results/quick/)

Each figure writes bench/results/<name>.json; bench/results/README.md is regenerated from all of
them (machine, versions, config, medians, ratios, targets MET / MISSED and why).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from . import report
from .harness import (
    DEFAULT_MODEL,
    RESULTS,
    SCHEMA,
    Context,
    LoadMonitor,
    auto_threads,
    machine_info,
    now_iso,
    write_json,
)
from .lora import adapter_io, forward_latency, mixed_throughput
from .train import lora_vs_full, qlora
from .train import memory as step_memory
from .train import step as train_step

FIGURES = [train_step, step_memory, lora_vs_full, forward_latency, adapter_io, mixed_throughput, qlora]
NAMES = [f.NAME for f in FIGURES]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_figure(module, ctx: Context, done: dict, command: str, machine: dict, run_id: str) -> dict:
    """Run one figure, wrap its result with machine, config and load, and write its JSON."""
    log(f"[{module.FIGURE}] {module.TITLE} ...")
    started, t0 = now_iso(), time.perf_counter()
    with LoadMonitor() as load:
        body = module.run(ctx, done, log)
    result = {"schema": SCHEMA, "name": module.NAME, "figure": module.FIGURE, "title": module.TITLE, **body,
              "config": ctx.config(), "machine": machine,
              "run": {"id": run_id, "started": started, "seconds": time.perf_counter() - t0, "quick": ctx.quick,
                      "command": command, "load": load.report()}}
    write_json(ctx.out / f"{module.NAME}.json", result)
    for t in result["targets"]:
        log(f"    {t['status']:6s} {t['what']}: {t['reason']}")
    return result


def run(ctx: Context, names: list[str] | None = None, command: str = "") -> list[dict]:
    """Run the named figures (default: all) in order; returns their results and rewrites README.md."""
    torch.set_num_threads(ctx.threads)
    torch.manual_seed(ctx.seed)
    ctx.out.mkdir(parents=True, exist_ok=True)
    if ctx.quick:
        (ctx.out / ".gitignore").write_text("*\n")  # smoke results are never committed
    done: dict = {}
    machine = machine_info(ctx)  # read once, at the start: the lorakit code this process imported
    run_id = f"{now_iso()} pid {os.getpid()}"
    results = [run_figure(m, ctx, done, command, machine, run_id) for m in FIGURES if names is None or m.NAME in names]
    report.write(ctx.out)
    return results


def parse(argv: list[str] | None = None) -> tuple[Context, list[str] | None]:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog="figures: "
                                     + ", ".join(f"{f.FIGURE}={f.NAME}" for f in FIGURES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=NAMES, help="run only these figures")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds: a smoke run, not a measurement "
                        "(figure 6 keeps bench/lora/mixed_batch.py's fixed size)")
    parser.add_argument("--repeats", type=int, help="measured rounds per figure (default 5; quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before measuring (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the cores left idle by the "
                        "machine's current load, at least 1)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="lorakit.models.load_model spec, or module:function")
    parser.add_argument("--out", help="results folder (default bench/results, bench/results/cuda, or "
                        "bench/results/quick)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if (args.repeats is not None and args.repeats < 1) or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    threads, why = (args.threads, "--threads") if args.threads else auto_threads()
    kw = {"device": args.device, "model": args.model, "warmup": args.warmup, "threads": threads, "threads_why": why}
    if args.repeats:
        kw["repeats"] = args.repeats
    ctx = Context.quick_run(**kw) if args.quick else Context(**kw)
    default_out = RESULTS / ("quick" if args.quick else "cuda" if args.device.startswith("cuda") else "")
    ctx.out = default_out if args.out is None else Path(args.out)
    return ctx, args.only


def main(argv: list[str] | None = None) -> None:
    ctx, names = parse(argv)
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    log(f"bench: {ctx.device}, {ctx.threads} threads ({ctx.threads_why}), results in {ctx.out}")
    t0 = time.perf_counter()
    results = run(ctx, names, command.strip())
    print(f"\n{len(results)} figure(s) in {time.perf_counter() - t0:.0f} s; table: {ctx.out / 'README.md'}")
    for r in results:
        for t in r["targets"]:
            print(f"  {t['status']:6s} [{r['figure']}] {t['what']}: {t['value']:.3f} (target {t['op']} {t['limit']:g})")
        if r.get("skipped"):
            print(f"  SKIPPED [{r['figure']}] {r['title']}: {r['skipped']}")


if __name__ == "__main__":
    main()
