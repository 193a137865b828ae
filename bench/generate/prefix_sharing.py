"""Prefix sharing in generate(): n = 8 completions per prompt, the prompt prefilled once vs once per row.

GRPO-shaped batches on the embedded SmolLM2-135M-Instruct: 4 math questions × n = 8 completions of at
most 64 tokens, temperature 1, seeded, all 32 rows in flight, with two prompt shapes: ``zero-shot``
(a system prompt and the question, 81-96 tokens) and ``few-shot`` (the same with two worked examples as
earlier turns, about 260 tokens). Each arm runs in a fresh process (model load, a warm-up call, then one
timed call); per shape the arms alternate A B, B A, ... and the figure is the ratio of median
completions/s, by wall-clock time and by the CPU time of the timing process (``time.process_time``: on a
machine shared with other jobs, waiting for a core does not count there, so it is the steadier figure;
the arms run one torch thread each by default). Both arms draw with the same seeds from logits equal up to float32 rounding, so their
completions are compared too (a draw can flip where two tokens' cumulative probabilities are that close).

    python -m bench.generate.prefix_sharing            # bench/results/prefix_sharing.{json,md}
    python -m bench.generate.prefix_sharing --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

from ..harness import (
    RESULTS,
    LoadMonitor,
    alternate_processes,
    auto_threads,
    emit,
    load_line,
    ratio,
    recorded,
    run_worker,
    write_json,
)

SYSTEM = ("You are a careful math tutor. Solve the problem step by step, show each calculation, and give "
          "the final answer on its own line as 'Answer: <number>'. Be brief and exact; do not restate the "
          "question, and do not add anything after the answer line.")
SHOTS = [("Tom has 12 apples and gives away 5. He then buys 3 times as many as he has left. How many apples "
          "does he have now?", "He has 12 - 5 = 7 apples left. He buys 3 * 7 = 21 more, so he has 7 + 21 = 28.\n"
          "Answer: 28"),
         ("A shop sells pens at 4 dollars each and notebooks at 6 dollars each. Sara buys 3 pens and 2 "
          "notebooks. How much does she pay?", "Pens cost 3 * 4 = 12 dollars. Notebooks cost 2 * 6 = 12 "
          "dollars. Together 12 + 12 = 24 dollars.\nAnswer: 24")]
QUESTIONS = ["A train travels 120 km in 1.5 hours. What is its average speed in km/h?",
             "If 3 pencils cost 45 cents, how much do 7 pencils cost?",
             "What is 17 times 23?",
             "A rectangle is 8 cm wide and 13 cm long. What is its area in square centimetres?"]
SHAPES = ("zero-shot", "few-shot")
N = 8


def prompts(shape: str) -> list[list[dict]]:
    shots = [m for q, a in SHOTS for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    head = [{"role": "system", "content": SYSTEM}] + (shots if shape == "few-shot" else [])
    return [head + [{"role": "user", "content": q}] for q in QUESTIONS]


def worker(shape: str, shared: bool, max_tokens: int, threads: int) -> dict:
    """One arm in this process: a warm-up call, then one timed generate() call."""
    import torch

    from lorakit.generate import SamplingParams, generate
    from lorakit.generate.api import encode_prompt
    from lorakit.generate.prefix import plan_groups
    from lorakit.models.load import load_model

    torch.set_num_threads(threads)
    model, tok = load_model("smollm2-135m-instruct")
    chats = prompts(shape)
    generate(model, tok, chats[:1], n=2, sampling=SamplingParams(max_tokens=2), prefix_sharing=shared)
    start, cpu = time.perf_counter(), time.process_time()
    out = generate(model, tok, chats, n=N, sampling=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0),
                   prefix_sharing=shared, max_rows=len(chats) * N)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    ids = [encode_prompt(tok, p) for p in chats for _ in range(N)]
    groups = plan_groups(ids, [None] * len(ids)) if shared else [(0, [i]) for i in range(len(ids))]
    return {"seconds": seconds, "completions_per_s": len(ids) / seconds, "cpu_seconds": cpu,
            "completions_per_cpu_s": len(ids) / cpu,
            "generated_tokens": sum(len(c.token_ids) for g in out for c in g),
            "prompt_tokens": [len(i) for i in ids[::N]],
            "prefill_tokens": sum(map(len, ids)) - sum((len(rows) - 1) * p for p, rows in groups),
            "token_ids": [c.token_ids for g in out for c in g]}


def measure(shape: str, rounds: int, max_tokens: int, threads: int) -> dict:
    def arm(name: str):
        argv = ["-m", "bench.generate.prefix_sharing", "--worker", f"{shape}:{name}", "--max-tokens",
                str(max_tokens), "--threads", str(threads)]
        return lambda _round: run_worker(argv)
    runs = alternate_processes({"shared": arm("shared"), "plain": arm("plain")}, rounds,
                               log=lambda line: print(f"{shape} {line[:110]}", flush=True))
    speed = {arm: [r["completions_per_s"] for r in rs] for arm, rs in runs.items()}
    per_cpu = {arm: [r["completions_per_cpu_s"] for r in rs] for arm, rs in runs.items()}
    first = {arm: rs[0] for arm, rs in runs.items()}
    equal = sum(a == b for a, b in zip(first["shared"]["token_ids"], first["plain"]["token_ids"], strict=True))
    return {"completions_per_s": {arm: {"median": statistics.median(v), "runs": v} for arm, v in speed.items()},
            "speedup": ratio(speed["shared"], speed["plain"]),
            "completions_per_cpu_s": {arm: {"median": statistics.median(v), "runs": v} for arm, v in per_cpu.items()},
            "speedup_cpu": ratio(per_cpu["shared"], per_cpu["plain"]),
            "seconds": {arm: [r["seconds"] for r in rs] for arm, rs in runs.items()},
            "cpu_seconds": {arm: [r["cpu_seconds"] for r in rs] for arm, rs in runs.items()},
            "generated_tokens": {arm: [r["generated_tokens"] for r in rs] for arm, rs in runs.items()},
            "prefill_tokens": {arm: r["prefill_tokens"] for arm, r in first.items()},
            "prompt_tokens": first["shared"]["prompt_tokens"],
            "completions_equal": f"{equal}/{len(first['shared']['token_ids'])}"}


def render(doc: dict) -> str:
    c, m = doc["config"], doc["machine"]
    lines = [f"# Prefix sharing: n = {N} completions per prompt", "",
             f"Generated by `python -m bench.generate.prefix_sharing` on {doc['when']}.", "",
             f"{len(QUESTIONS)} chat prompts × n = {N}, at most {c['max_tokens']} tokens each, temperature 1, seed 0, "
             f"all {len(QUESTIONS) * N} rows in flight; SmolLM2-135M-Instruct (float32), {c['threads']} thread(s) "
             f"({c['threads_why']}); each arm in a fresh process, {c['rounds']} alternated rounds per shape, medians.",
             "", "| prompts | prompt tokens | prefilled tokens, shared / each row | by | completions/s, shared / "
             "each row | ratio | per round | same completions |", "|---|---|---|---|---|---|---|---|"]
    for shape, r in doc["results"].items():
        for by, med, s in [("CPU time", r["completions_per_cpu_s"], r["speedup_cpu"]),
                           ("wall clock", r["completions_per_s"], r["speedup"])]:
            lines.append(f"| {shape} | {', '.join(map(str, r['prompt_tokens']))} | {r['prefill_tokens']['shared']} / "
                         f"{r['prefill_tokens']['plain']} | {by} | {med['shared']['median']:.3f} / "
                         f"{med['plain']['median']:.3f} | **{s['value']:.2f}×** (±{s['noise']:.0%}) | "
                         f"{', '.join(f'{x:.2f}' for x in s['per_round'])} | {r['completions_equal']} |")
    lines += ["", f"Goal (issue 24): ≥ 1.5× completions/s with n = {N}, by CPU time: "
              + ", ".join(f"{shape} {'MET' if r['speedup_cpu']['value'] >= 1.5 else 'MISSED'}"
                          for shape, r in doc["results"].items()) + ". The gain is the prefill work saved over the "
              "whole call: decoding (the same in both arms) dominates when completions are long against the prompt.",
              "", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, flags {' '.join(m['flags'])}; torch "
              f"{m['torch']}, transformers {m['transformers']}. {load_line(m['load'])}; the machine was shared with "
              "other jobs, so wall-clock times are slower and noisier than on a quiet one.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # SHAPE:shared or SHAPE:plain, one fresh-process arm
    args = p.parse_args(argv)
    if args.worker:
        shape, arm = args.worker.split(":")
        emit(worker(shape, arm == "shared", args.max_tokens, args.threads or 1))
        return
    why = f"{args.threads} given"
    if not args.threads:
        args.threads, why = auto_threads()
    if args.quick:
        args.rounds, args.max_tokens = 1, 4
    with LoadMonitor() as load:
        results = {shape: measure(shape, args.rounds, args.max_tokens, args.threads) for shape in args.shapes}
    doc = {"name": "prefix_sharing", "when": recorded(load)["when"], "machine": recorded(load), "results": results,
           "config": {"rounds": args.rounds, "max_tokens": args.max_tokens, "n": N, "prompts": len(QUESTIONS),
                      "threads": args.threads, "threads_why": why, "quick": args.quick}}
    out = RESULTS / ("quick" if args.quick else "")
    write_json(out / "prefix_sharing.json", doc)
    (out / "prefix_sharing.md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
