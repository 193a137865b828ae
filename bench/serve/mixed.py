"""Mixed-length load and a short request behind a long one: continuous batching against window batching.

Three engines: continuous batching with its default admission ("shortest": highest response ratio
next), continuous batching admitting oldest first ("fcfs"), and window batching.

Same tiny model and adapters as bench/serve/load.py (its context raised to 1024 positions so 256-token
answers fit), served by uvicorn on 127.0.0.1, ``Limits(max_batch_size=8)``, one torch thread.

- Mixed workload: ``clients`` concurrent streaming clients each send ``requests`` greedy completions
  drawn from a pool of (prompt, max_tokens) with max_tokens log-uniform in 4..256, over 3 adapters and
  the base. Each answer is compared with its single-request reference (asked alone, one at a time,
  with the continuous engine). Reported per scheduler: latency p50/p99 (all, and short requests of at
  most 16 tokens), time to first token p50/p99 (first streamed text), throughput (tokens/s, requests/s).
- Short behind long: a 4-token request (adapter a1) alone, and the same request sent 0.3 s after a
  200-token one (adapter a0); the ratio of the two latencies, and both answers against references.

Rounds rotate the engines A B C A B C; medians over rounds and per-round ratios are reported.
Usage: ``python -m bench.serve.mixed [--rounds 3]`` (bench/results/serve_mixed.{json,md,png}).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from ..harness import RESULTS, LoadMonitor, cpu_summary, load_line, now_iso, target, write_json
from .load import WORDS, build_files, serve

SCHEDULERS = {"continuous": dict(scheduler="continuous", admission="shortest"),  # the engine's defaults
              "continuous-fcfs": dict(scheduler="continuous", admission="fcfs"),
              "window": dict(scheduler="window")}
LIMITS = dict(max_prompt_tokens=64, max_tokens=256, max_adapters=8, max_batch_size=8, batch_window_ms=5)
SHORT = 16  # requests with max_tokens <= SHORT are "short"
LONG_BEHIND = (200, 0.3)  # the long request's max_tokens, and how long after it the short one is sent


def mixed_pool(rng: random.Random, n: int = 16) -> list[tuple[str, int]]:
    """``n`` prompts of 1-8 words with max_tokens log-uniform in 4..256."""
    return [(" ".join(rng.choices(WORDS, k=rng.randint(1, 8))), int(math.exp(rng.uniform(math.log(4), math.log(257)))))
            for _ in range(n)]


def stream(http: httpx.Client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: status, text, tokens, latency and time to first text (seconds)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, parts, tokens, status = time.perf_counter(), None, [], 0, 0
    try:
        with http.stream("POST", "/v1/completions", json=body) as r:
            status = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    status = 500
                    break
                text = "".join(c["text"] for c in chunk["choices"])
                if text and first is None:
                    first = time.perf_counter() - t0
                parts.append(text)
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    latency = time.perf_counter() - t0
    return {"status": status, "text": "".join(parts), "tokens": tokens, "latency_s": latency,
            "ttft_s": first if first is not None else latency, "max_tokens": max_tokens}


def _engine(model_dir: Path, root: Path, scheduler: str):
    from lorakit.serve.engine import Limits, engine_from_spec

    return engine_from_spec(str(model_dir), {n: root / n for n in ("a0", "a1", "a2")}, name="tiny",
                            limits=Limits(**LIMITS, **SCHEDULERS[scheduler]))


def references(url: str, pool: list, models: list[str]) -> dict:
    with httpx.Client(base_url=url, timeout=300) as http:
        return {(p, m): stream(http, m, p, n)["text"] for p, n in pool for m in models}


def mixed_round(url: str, clients: int, requests: int, pool: list, models: list[str], refs: dict, seed: int) -> dict:
    results: list[dict] = []

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=url, timeout=300) as http:
            for _ in range(requests):
                (prompt, n), model = rng.choice(pool), rng.choice(models)
                out = stream(http, model, prompt, n)
                out["match"] = out["text"] == refs[prompt, model]
                results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    short = [r for r in ok if r["max_tokens"] <= SHORT]
    return {"sent": len(results), "ok": len(ok), "mismatches": sum(not r["match"] for r in ok),
            "5xx": sum(1 for r in results if not isinstance(r["status"], int) or r["status"] >= 500),
            "short_requests": len(short), "wall_s": wall,
            "latency_p50_s": _q([r["latency_s"] for r in ok], 0.5), "latency_p99_s": _q([r["latency_s"] for r in ok], 0.99),
            "short_p50_s": _q([r["latency_s"] for r in short], 0.5), "short_p99_s": _q([r["latency_s"] for r in short], 0.99),
            "ttft_p50_s": _q([r["ttft_s"] for r in ok], 0.5), "ttft_p99_s": _q([r["ttft_s"] for r in ok], 0.99),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "requests_per_s": len(ok) / wall,
            "samples": [[r["max_tokens"], round(r["latency_s"], 4), round(r["ttft_s"], 4)] for r in ok]}


def short_behind_long(url: str, refs: dict, repeats: int = 5) -> dict:
    """Latency of a short request alone, and sent 0.3 s after a long one on another adapter."""
    long_n, delay = LONG_BEHIND
    alone, behind, match = [], [], True
    with httpx.Client(base_url=url, timeout=300) as http, httpx.Client(base_url=url, timeout=300) as other:
        for _ in range(repeats):
            out = stream(http, "a1", "x", 4)
            alone.append(out["latency_s"])
            match &= out["text"] == refs["short"]
            box: dict = {}
            t = threading.Thread(target=lambda b=box: b.update(stream(other, "a0", "hello there", long_n)))
            t.start()
            time.sleep(delay)
            out = stream(http, "a1", "x", 4)
            behind.append(out["latency_s"])
            t.join(600)
            match &= out["text"] == refs["short"] and box["text"] == refs["long"]
    return {"alone_s": statistics.median(alone), "behind_s": statistics.median(behind),
            "ratio": statistics.median(behind) / statistics.median(alone), "all_match": match}


def run(clients: int = 16, requests: int = 8, rounds: int = 3, seed: int = 0) -> dict:
    """Each engine of SCHEDULERS, rotating, ``rounds`` rounds each; returns per-round figures and medians."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="lorakit-serve-mixed-") as tmp:
            model_dir, root, _ = build_files(Path(tmp), 3)
            cfg = json.loads((model_dir / "config.json").read_text())
            (model_dir / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1024}))
            models = ["a0", "a1", "a2", "tiny"]
            pool = mixed_pool(random.Random(seed))
            with serve(_engine(model_dir, root, "continuous"), root) as url:
                refs = references(url, pool, models)
                with httpx.Client(base_url=url, timeout=300) as http:
                    refs["short"] = stream(http, "a1", "x", 4)["text"]
                    refs["long"] = stream(http, "a0", "hello there", LONG_BEHIND[0])["text"]
            per: dict[str, list] = {s: [] for s in SCHEDULERS}
            for rnd in range(rounds):
                for scheduler in SCHEDULERS:  # A B C A B C
                    with serve(_engine(model_dir, root, scheduler), root) as url:
                        figures = mixed_round(url, clients, requests, pool, models, refs, seed + rnd)
                        figures["short_behind_long"] = short_behind_long(url, refs)
                    per[scheduler].append(figures)
        return {"config": {"clients": clients, "requests": requests, "rounds": rounds, "seed": seed,
                           "limits": LIMITS, "pool": pool, "short_max_tokens": SHORT, "long_behind": LONG_BEHIND,
                           "torch_threads": 1},
                "rounds": per, "summary": _summary(per)}
    finally:
        torch.set_num_threads(threads)


def _summary(per: dict[str, list]) -> dict:
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for s, rs in per.items()}
    for s, rs in per.items():
        med[s]["short_behind_long_ratio"] = statistics.median(r["short_behind_long"]["ratio"] for r in rs)
        med[s]["short_behind_long_s"] = statistics.median(r["short_behind_long"]["behind_s"] for r in rs)
        med[s]["short_alone_s"] = statistics.median(r["short_behind_long"]["alone_s"] for r in rs)
        med[s]["mismatches"] = sum(r["mismatches"] for r in rs) + sum(not r["short_behind_long"]["all_match"]
                                                                      for r in rs)
        med[s]["5xx"] = sum(r["5xx"] for r in rs)
    c, f, w = per["continuous"], per["continuous-fcfs"], per["window"]

    def ratio(key, xs, ys):
        return [a[key] / b[key] for a, b in zip(xs, ys, strict=True)]

    ratios = {"short_p99_vs_window": ratio("short_p99_s", c, w),
              "throughput_vs_window": ratio("tokens_per_s", c, w),
              "ttft_p99_vs_window": ratio("ttft_p99_s", c, w),
              "fcfs_short_p99_vs_window": ratio("short_p99_s", f, w),
              "fcfs_throughput_vs_window": ratio("tokens_per_s", f, w),
              "short_p99_vs_fcfs": ratio("short_p99_s", c, f),
              "latency_p99_vs_fcfs": ratio("latency_p99_s", c, f)}
    return {"medians": med, "ratios": {k: {"median": statistics.median(v), "per_round": [round(x, 3) for x in v]}
                                       for k, v in ratios.items()}}


def _q(xs: list[float], q: float) -> float:
    """Nearest-rank quantile (0 for no samples)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))] if xs else 0.0


def plot(results: dict, png: Path) -> None:
    """Latency against max_tokens, and the distribution of time to first token, per scheduler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.plots import save_png

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for scheduler, color in zip(SCHEDULERS, ("tab:blue", "tab:green", "tab:orange"), strict=True):
        samples = [s for r in results["rounds"][scheduler] for s in r["samples"]]
        left.scatter([s[0] for s in samples], [s[1] for s in samples], s=8, alpha=0.5, color=color, label=scheduler)
        ttft = sorted(s[2] for s in samples)
        right.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], color=color, label=scheduler)
    left.set(xscale="log", xlabel="max_tokens of the request", ylabel="latency (s)",
             title="latency by request length (all rounds)")
    right.set(xscale="log", xlabel="time to first token (s)", ylabel="fraction of requests", title="TTFT, CDF")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    save_png(fig, png)
    plt.close(fig)


def write(results: dict, out: Path, machine: dict) -> None:
    """bench/results/serve_mixed.json and serve_mixed.md."""
    med, ratios = results["summary"]["medians"], results["summary"]["ratios"]
    c = med["continuous"]
    targets = [
        target("short request behind a long one / alone (continuous)", c["short_behind_long_ratio"], 2.0,
               "the short request's prefill waits for the step in flight"),
        target("p99 latency of short requests, continuous / window", ratios["short_p99_vs_window"]["median"], 0.3,
               "short requests still queue behind max_batch_size rows in flight"),
        target("throughput (tokens/s), continuous / window", ratios["throughput_vs_window"]["median"], 1.0,
               "more, smaller prefills and cache splices than window batching", op=">="),
    ]
    write_json(out / "serve_mixed.json", {"name": "serve_mixed", "when": now_iso(), "machine": machine,
                                          **results, "targets": targets})
    cfg = results["config"]
    rows = [("latency p50 / p99 (all)", "latency_p50_s", "latency_p99_s"),
            (f"latency p50 / p99 (short, max_tokens <= {SHORT})", "short_p50_s", "short_p99_s"),
            ("time to first token p50 / p99", "ttft_p50_s", "ttft_p99_s")]
    names = list(SCHEDULERS)
    lines = [f"# Mixed-length load: continuous vs window batching ({now_iso()})", "",
             f"Tiny random Llama on CPU ({machine['cpu']}, {machine['logical_cpus']} logical CPUs, 1 torch thread), "
             f"uvicorn on 127.0.0.1, max_batch_size {LIMITS['max_batch_size']}; {cfg['clients']} streaming clients x "
             f"{cfg['requests']} greedy completions per round, max_tokens log-uniform 4..256 over 3 adapters + base; "
             f"{cfg['rounds']} rounds per engine, rotating; medians over rounds. `continuous` is the default engine "
             "(admission `shortest`: highest response ratio next), `continuous-fcfs` the same admitting oldest "
             "first. " + load_line(machine["load"]) + "; the ratios compare rounds run back to back. "
             "Generated by `python -m bench.serve.mixed`.", "",
             "| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {name} | " + " | ".join(f"{1e3 * med[n][a]:.0f} / {1e3 * med[n][b]:.0f} ms" for n in names) + " |"
              for name, a, b in rows]
    lines += ["| throughput | " + " | ".join(f"{med[n]['tokens_per_s']:.0f} tokens/s, {med[n]['requests_per_s']:.1f} "
                                            "req/s" for n in names) + " |",
              "| 4-token request alone / 0.3 s behind a 200-token one | " + " | ".join(
                  f"{1e3 * med[n]['short_alone_s']:.0f} / {1e3 * med[n]['short_behind_long_s']:.0f} ms "
                  f"({med[n]['short_behind_long_ratio']:.1f}x)" for n in names) + " |",
              "| answers differing from their single-request reference | "
              + " | ".join(str(med[n]["mismatches"]) for n in names) + " |",
              "| 5xx | " + " | ".join(str(med[n]["5xx"]) for n in names) + " |",
              "", "| target (issue 18) | value | status |", "|---|---|---|"]
    lines += [f"| {t['what']} | {t['reason']} | {t['status']} |" for t in targets]
    labels = {"short_p99_vs_window": "short p99, continuous / window",
              "throughput_vs_window": "throughput, continuous / window",
              "ttft_p99_vs_window": "ttft p99, continuous / window",
              "fcfs_short_p99_vs_window": "short p99, continuous-fcfs / window",
              "fcfs_throughput_vs_window": "throughput, continuous-fcfs / window",
              "short_p99_vs_fcfs": "short p99, continuous / continuous-fcfs",
              "latency_p99_vs_fcfs": "p99 of all, continuous / continuous-fcfs"}
    lines += ["", "Per round (rounds run back to back): " + "; ".join(
        f"{labels[name]} " + ", ".join(f"{x:.2f}" for x in r["per_round"]) for name, r in ratios.items())
        + f". The p99 of {c['short_requests']} short requests is close to their slowest, so it moves a lot between "
        "rounds."]
    plot(results, out / "serve_mixed.png")
    lines += ["", "![latency by request length and TTFT per engine](serve_mixed.png)"]
    (out / "serve_mixed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve.mixed", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per engine, rotating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with LoadMonitor() as load:
        results = run(rounds=args.rounds, seed=args.seed)
    write(results, args.out, {**cpu_summary(), "load": load.report()})
    print((args.out / "serve_mixed.md").read_text())


if __name__ == "__main__":
    main()
