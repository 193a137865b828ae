"""The server under load and attack: concurrent clients, adapter churn and hostile requests on 127.0.0.1.

A tiny random Llama (hidden 32, 2 layers, char-level tokenizer) and four random adapters are written to
a temporary --adapter-root; ``create_app`` is served by uvicorn in a thread on a free 127.0.0.1 port.
First every (prompt, adapter) of a fixed pool is answered alone (greedy, one request at a time): the
single-request reference. Then, together and bounded:

- ``clients`` threads each send ``requests`` completions (temperature 0; a quarter of them streamed)
  for random prompts and adapters of the pool, and compare each answer with its reference;
- a churn thread loads the fourth adapter (POST /v1/adapters), asks it once (its own reference),
  refuses a duplicate load (409) and unloads it (DELETE), until the clients are done;
- a hostile thread sends malformed and hostile requests (bad JSON, huge max_tokens and prompts, path
  traversal, absolute paths and a symlink out of the root, a pickle that would leave a marker file if
  it were ever unpickled, unknown adapters ...), each of which must get its 4xx.

Recorded: status counts (no 5xx allowed), mismatches against the references (none allowed), latency
percentiles, throughput, the server's RSS before and after, and whether /health still answers.
Usage: ``python -m bench.serve.load [--clients 32 --requests 20]`` writes bench/results/serve_load.json
and serve_load.md (about a minute on two busy cores). The mixed-length workload (continuous vs window
batching) is ``python -m bench.serve.mixed``; it serves the same files with ``build_files`` and ``serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import random
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

from lorakit.testing import write_tiny_model

from ..harness import RESULTS, LoadMonitor, cpu_summary, load_line, now_iso, write_json

BASE = "tiny"
CHURN = "churn"
LIMITS = dict(max_prompt_tokens=64, max_tokens=32, max_adapters=8, max_batch_size=8, batch_window_ms=5)
TARGETS = [(2, "all-linear"), (4, ["q_proj", "v_proj"]), (3, ["o_proj", "down_proj"]), (8, ["gate_proj", "k_proj"])]
WORDS = "the quick brown fox jumps over a lazy dog while seven zebras hum softly near old river banks".split()
CHURN_CYCLES = 200  # upper bound; the churn stops as soon as the clients are done


# ---- the model, the adapters, the server ------------------------------------------------------

def build_files(folder: Path, adapters: int) -> tuple[Path, Path, list[str]]:
    """A tiny random Llama directory, and an adapter root with ``adapters`` + 1 random adapters (the last
    one is churned), a corrupt one, one for another base model, a pickle-only one and a symlink out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit as lk

    model_dir, root = folder / "model", folder / "adapters"
    write_tiny_model(model_dir)
    names = [f"a{i}" for i in range(adapters)] + [CHURN]
    for i, name in enumerate(names):
        r, targets = TARGETS[i % len(TARGETS)]
        model = LlamaForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(100 + i)
        lk.inject(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False), name)
        lk.save_adapter(model, root / name, name)
    wide = LlamaForCausalLM(LlamaConfig.from_pretrained(model_dir, hidden_size=48, head_dim=12))
    lk.save_adapter(lk.inject(wide, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)),
                    root / "other-base")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_bytes((root / "a0" / "adapter_config.json").read_bytes())
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(
        (root / "a0" / "adapter_model.safetensors").read_bytes()[:200])
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_bytes((root / "a0" / "adapter_config.json").read_bytes())
    (root / "pickled" / "adapter_model.bin").write_bytes(pickle.dumps(_Tripwire(folder / "UNPICKLED")))
    outside = folder / "outside"  # a valid adapter outside the root, reached through symlinks
    outside.mkdir()
    for item in (root / "a0").iterdir():
        (outside / item.name).write_bytes(item.read_bytes())
    (root / "escape").symlink_to(outside)
    (root / "linked").mkdir()
    for item in outside.iterdir():
        (root / "linked" / item.name).symlink_to(item)
    return model_dir, root, names


class _Tripwire:
    """Unpickling this touches a marker file: proof that a server unpickled what a client pointed it at."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@contextlib.contextmanager
def serve(engine, root: Path):
    """uvicorn on 127.0.0.1 (a free port, bound first) in a thread; yields the base URL, stops it after."""
    import uvicorn

    from lorakit.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(engine, root), log_level="error", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        if not server.started:
            raise RuntimeError("uvicorn did not start within 30 s")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("uvicorn did not stop within 30 s")


def rss_mib() -> float:
    """Resident memory of this process (the server runs in it), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# ---- requests ---------------------------------------------------------------------------------

def complete(http: httpx.Client, model: str, prompt: str, max_tokens: int, stream: bool = False):
    """One greedy completion: (status, text, completion tokens); text is None unless the status is 200."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        r = http.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, None, 0
        out = r.json()
        return 200, out["choices"][0]["text"], out["usage"]["completion_tokens"]
    body.update(stream=True, stream_options={"include_usage": True})
    with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, None, 0
        parts, tokens = [], 0
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # an error after the 200 header: count it as the status it carries
                return chunk["error"].get("code") or 500, None, 0
            parts += [c["text"] for c in chunk["choices"]]
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return 200, "".join(parts), tokens


def prompt_pool(rng: random.Random, n: int = 8) -> list[tuple[str, int]]:
    """``n`` prompts of 1-8 words, each with its own max_tokens (4-24)."""
    return [(" ".join(rng.choices(WORDS, k=rng.randint(1, 8))), rng.randint(4, 24)) for _ in range(n)]


def hostile_cases(folder: Path) -> list[tuple[str, int, str, str, dict]]:
    """(what, expected status, method, path, httpx kwargs) of each malformed or hostile request."""
    ok = {"model": "a0", "prompt": "hi", "max_tokens": 4}
    raw = {"headers": {"content-type": "application/json"}}
    comp, chat, load = "/v1/completions", "/v1/chat/completions", "/v1/adapters"
    return [
        ("bad JSON", 400, "POST", comp, {"content": b'{"model": "a0", "prompt": ', **raw}),
        ("JSON nested 100k deep", 400, "POST", comp, {"content": b"[" * 100_000 + b"]" * 100_000, **raw}),
        ("body is a list", 400, "POST", comp, {"json": [ok]}),
        ("prompt of the wrong type", 400, "POST", comp, {"json": {**ok, "prompt": {"x": 1}}}),
        ("huge max_tokens", 400, "POST", comp, {"json": {**ok, "max_tokens": 10**12}}),
        ("negative max_tokens", 400, "POST", comp, {"json": {**ok, "max_tokens": -5}}),
        ("huge prompt (200k chars)", 400, "POST", comp, {"json": {**ok, "prompt": "x" * 200_000}}),
        ("body over --max-request-bytes (2 MB)", 413, "POST", comp, {"json": {**ok, "prompt": "x" * 2_000_000}}),
        ("huge chat message", 400, "POST", chat,
         {"json": {"model": "a0", "messages": [{"role": "user", "content": "y" * 100_000}]}}),
        ("too many prompts", 400, "POST", comp, {"json": {**ok, "prompt": ["x"] * 1000}}),
        ("n = 10000", 400, "POST", comp, {"json": {**ok, "n": 10_000}}),
        ("temperature 1e9", 400, "POST", comp, {"json": {**ok, "temperature": 1e9}}),
        ("unknown adapter", 404, "POST", comp, {"json": {**ok, "model": "no-such-adapter"}}),
        ("first use of a truncated adapter", 400, "POST", comp, {"json": {**ok, "model": "corrupt"}}),
        ("first use of a link out of the root", 403, "POST", comp, {"json": {**ok, "model": "escape"}}),
        ("first use of a path", 404, "POST", comp, {"json": {**ok, "model": "a0/../../x"}}),
        ("adapter path ../x", 403, "POST", load, {"json": {"name": "evil", "path": "../x"}}),
        ("adapter path a0/../../..", 403, "POST", load, {"json": {"name": "evil", "path": "a0/../../.."}}),
        ("absolute path /etc", 403, "POST", load, {"json": {"name": "evil", "path": "/etc"}}),
        ("absolute path outside the root", 403, "POST", load, {"json": {"name": "evil", "path": str(folder)}}),
        ("symlinked directory out of the root", 403, "POST", load, {"json": {"name": "evil", "path": "escape"}}),
        ("symlinked files out of the root", 403, "POST", load, {"json": {"name": "evil", "path": "linked"}}),
        ("missing adapter directory", 404, "POST", load, {"json": {"name": "evil", "path": "nothing-here"}}),
        ("truncated adapter file", 400, "POST", load, {"json": {"name": "evil", "path": "corrupt"}}),
        ("adapter for another base model", 400, "POST", load, {"json": {"name": "evil", "path": "other-base"}}),
        ("pickle-only adapter (.bin)", 400, "POST", load, {"json": {"name": "evil", "path": "pickled"}}),
        ("adapter name with a slash", 400, "POST", load, {"json": {"name": "../a0", "path": "a0"}}),
        ("adapter name already loaded", 409, "POST", load, {"json": {"name": "a0", "path": "a0"}}),
        ("unload the base model", 400, "DELETE", f"{load}/{BASE}", {}),
        ("unload an unknown adapter", 404, "DELETE", f"{load}/no-such-adapter", {}),
        ("unknown route", 404, "GET", "/v1/../../etc/passwd", {}),
        ("wrong method", 405, "GET", comp, {}),
    ]


# ---- the three kinds of traffic ---------------------------------------------------------------

def _client(url: str, seed: int, requests: int, pool: list, models: list[str], refs: dict, out: list) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as http:
        for _ in range(requests):
            (prompt, max_tokens), model = rng.choice(pool), rng.choice(models)
            stream = rng.random() < 0.25
            t0 = time.perf_counter()
            try:
                status, text, tokens = complete(http, model, prompt, max_tokens, stream)
            except httpx.HTTPError as exc:
                status, text, tokens = f"{type(exc).__name__}", None, 0
            out.append({"status": status, "latency_s": time.perf_counter() - t0, "tokens": tokens,
                        "match": text == refs[prompt, model], "stream": stream})


def _churn(url: str, pool: list, refs: dict, done: threading.Event, log: list) -> None:
    """Load, use, double-load (409), unload, load on first use and unload the churn adapter until ``done`` (at
    least twice)."""
    prompt, max_tokens = pool[0]
    with httpx.Client(base_url=url, timeout=120) as http:
        for cycle in range(CHURN_CYCLES):
            if cycle >= 2 and done.is_set():
                break
            steps = {"load": http.post("/v1/adapters", json={"name": CHURN, "path": CHURN}).status_code}
            status, text, _ = complete(http, CHURN, prompt, max_tokens)
            steps["use"], steps["match"] = status, text == refs[prompt, CHURN]
            steps["reload"] = http.post("/v1/adapters", json={"name": CHURN, "path": CHURN}).status_code
            steps["unload"] = _unload(http, steps)
            status, text, _ = complete(http, CHURN, prompt, max_tokens)  # loads it again: first use
            steps["after"], steps["match_after"] = status, text == refs[prompt, CHURN]
            steps["unload_after"] = _unload(http, steps)
            log.append(steps)


def _unload(http, steps: dict) -> int:
    for _ in range(100):  # 409 while a batch that held one of its requests is still running: retry
        status = http.delete(f"/v1/adapters/{CHURN}").status_code
        if status != 409:
            return status
        steps["unload_409"] = steps.get("unload_409", 0) + 1
        time.sleep(0.01)
    return status


def _hostile(url: str, cases: list, done: threading.Event, log: list, max_rounds: int = 50) -> None:
    """Every hostile case once per round, until the clients are done (at least one round)."""
    with httpx.Client(base_url=url, timeout=120) as http:
        for rnd in range(max_rounds):
            if rnd >= 1 and done.is_set():
                break
            for what, expected, method, path, kwargs in cases:
                try:
                    status = http.request(method, path, **kwargs).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                log.append({"what": what, "expected": expected, "status": status})


def _sample_rss(done: threading.Event, out: list[float]) -> None:
    while not done.wait(0.1):
        out.append(rss_mib())


def references(url: str, pool: list, models: list[str]) -> dict:
    """The single-request greedy answer of every (prompt, model), one request at a time."""
    refs = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.post("/v1/adapters", json={"name": CHURN, "path": CHURN}).status_code == 201
        for model in [*models, CHURN]:
            for prompt, max_tokens in pool:
                status, text, _ = complete(http, model, prompt, max_tokens)
                if status != 200:
                    raise RuntimeError(f"reference request for {model!r} failed with {status}")
                refs[prompt, model] = text
        assert http.delete(f"/v1/adapters/{CHURN}").status_code == 200
    return refs


# ---- the run ----------------------------------------------------------------------------------

def _percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}

    def at(q: float) -> float:  # nearest rank
        return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))]
    return {"p50_ms": 1e3 * at(0.5), "p90_ms": 1e3 * at(0.9), "p99_ms": 1e3 * at(0.99), "max_ms": 1e3 * xs[-1],
            "mean_ms": 1e3 * statistics.fmean(xs)}


def _load_phase(url, clients, requests, churn, models, pool, refs, seed, folder) -> dict:
    results, churn_log, hostile_log, done = [], [], [], threading.Event()
    workers = [threading.Thread(target=_client, args=(url, seed * 1000 + i, requests, pool, models, refs, results))
               for i in range(clients)]
    side = [threading.Thread(target=_hostile, args=(url, hostile_cases(folder), done, hostile_log))]
    if churn:
        side.append(threading.Thread(target=_churn, args=(url, pool, refs, done, churn_log)))
    rss = [rss_mib()]
    side.append(threading.Thread(target=_sample_rss, args=(done, rss)))
    t0 = time.perf_counter()
    for t in workers + side:
        t.start()
    for t in workers:
        t.join(600)
    wall = time.perf_counter() - t0
    done.set()
    for t in side:
        t.join(600)
    if any(t.is_alive() for t in workers + side):
        raise RuntimeError("load threads did not finish within 10 minutes")
    return {"results": results, "churn": churn_log, "hostile": hostile_log, "wall_s": wall, "rss": rss}


def _summarize(phase: dict, clients: int, requests: int) -> dict:
    res, churn, hostile = phase["results"], phase["churn"], phase["hostile"]
    statuses = Counter(str(r["status"]) for r in res)
    ok = [r for r in res if r["status"] == 200]
    churn_bad = [c for c in churn if (c["load"], c["use"], c["match"], c["reload"], c["unload"], c["after"],
                                      c["match_after"], c["unload_after"]) != (201, 200, True, 409, 200, 200, True, 200)]
    hostile_wrong = [h for h in hostile if h["status"] != h["expected"]]
    by_case = {}
    for h in hostile:
        by_case.setdefault(h["what"], Counter())[str(h["status"])] += 1
    return {
        "requests": {"sent": len(res), "expected": clients * requests, "status": dict(statuses),
                     "streamed": sum(r["stream"] for r in res),
                     "5xx": sum(1 for r in res if isinstance(r["status"], int) and r["status"] >= 500),
                     "non_200": len(res) - len(ok), "mismatches": sum(not r["match"] for r in ok)},
        "latency": _percentiles([r["latency_s"] for r in ok]),
        "throughput": {"wall_s": phase["wall_s"], "requests_per_s": len(ok) / phase["wall_s"],
                       "completion_tokens_per_s": sum(r["tokens"] for r in ok) / phase["wall_s"]},
        "churn": {"cycles": len(churn), "bad_cycles": len(churn_bad), "examples": churn_bad[:3],
                  "unload_retries_409": sum(c.get("unload_409", 0) for c in churn)},
        "hostile": {"sent": len(hostile), "cases": len(by_case),
                    "not_4xx": sum(1 for h in hostile if not (isinstance(h["status"], int) and
                                                              400 <= h["status"] < 500)),
                    "5xx": sum(1 for h in hostile if isinstance(h["status"], int) and h["status"] >= 500),
                    "unexpected_status": len(hostile_wrong), "examples": hostile_wrong[:5],
                    "by_case": {k: dict(v) for k, v in by_case.items()}},
    }


def run(clients: int = 32, requests: int = 20, adapters: int = 3, churn: bool = True, seed: int = 0) -> dict:
    """Serve a tiny model on 127.0.0.1 and hold ``clients`` x ``requests`` concurrent completions, adapter
    churn and hostile requests; returns the figures (see the module docstring).

    Args:
        clients: concurrent client threads.
        requests: completions each client sends, one after another.
        adapters: adapters the clients spread over (a further one is churned).
        churn: load/unload an adapter during the load.
        seed: seeds the prompt pool and each client's choices.
    """
    from lorakit.serve.engine import Limits, engine_from_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the machine is shared
    try:
        with tempfile.TemporaryDirectory(prefix="lorakit-serve-load-") as tmp:
            folder = Path(tmp)
            model_dir, root, names = build_files(folder, adapters)
            models = names[:adapters]
            engine = engine_from_spec(str(model_dir), {n: root / n for n in models}, name=BASE,
                                      limits=Limits(**LIMITS))
            pool = prompt_pool(random.Random(seed))
            with serve(engine, root) as url:
                refs = references(url, pool, models)
                phase = _load_phase(url, clients, requests, churn, models, pool, refs, seed, folder)
                t0 = time.perf_counter()
                health = httpx.get(f"{url}/health", timeout=30)
                health_s = time.perf_counter() - t0
                rss_after = rss_mib()
                loaded_after = sorted(engine.adapters())
            out = _summarize(phase, clients, requests)
            out.update(config={"scheduler": engine.limits.scheduler, "admission": engine.limits.admission,
                               "clients": clients, "requests": requests, "adapters": adapters, "churn": churn,
                               "seed": seed, "prompts": len(pool), "limits": LIMITS, "torch_threads": 1},
                       health_after={"status": health.status_code, "seconds": health_s, "body": health.json()},
                       rss_mib={"before": phase["rss"][0], "peak": max(phase["rss"]), "after": rss_after,
                                "growth": rss_after - phase["rss"][0]},
                       adapters_loaded_after=loaded_after, pickle_was_unpickled=(folder / "UNPICKLED").exists())
            return out
    finally:
        torch.set_num_threads(threads)


def write(results: dict, out: Path, machine: dict) -> None:
    """bench/results/serve_load.json and serve_load.md; ``machine``: CPU, flags and the load during the run."""
    req, lat, thr, hos, ch = (results[k] for k in ("requests", "latency", "throughput", "hostile", "churn"))
    cfg, rss, load = results["config"], results["rss_mib"], machine["load"]
    write_json(out / "serve_load.json", {"name": "serve_load", "when": now_iso(), "machine": machine, **results})
    lines = [f"# Server under load and attack ({now_iso()})", "",
             f"Tiny random Llama (hidden 32, 2 layers) on CPU, 1 torch thread, uvicorn on 127.0.0.1; "
             f"{cfg['clients']} concurrent clients x {cfg['requests']} greedy completions over {cfg['adapters']} "
             f"adapters ({req['streamed']} streamed), {ch['cycles']} load/use/unload cycles of a further "
             f"adapter, {hos['sent']} hostile requests ({hos['cases']} kinds) at the same time; scheduler "
             f"{cfg['scheduler']}, admission {cfg['admission']}. CPU: {machine['cpu']} ({machine['logical_cpus']} "
             f"logical CPUs; {', '.join(machine['flags'])}); " + load_line(load)
             + ". Generated by `python -m bench.serve.load`.", "",
             "| figure | value |", "|---|---|",
             f"| completions answered / sent | {req['sent'] - req['non_200']} / {req['sent']} |",
             f"| 5xx answers (clients + hostile) | {req['5xx'] + hos['5xx']} |",
             f"| answers differing from their single-request result | {req['mismatches']} |",
             f"| latency p50 / p90 / p99 / max | {lat['p50_ms']:.0f} / {lat['p90_ms']:.0f} / {lat['p99_ms']:.0f} / "
             f"{lat['max_ms']:.0f} ms |",
             f"| throughput | {thr['requests_per_s']:.1f} requests/s, {thr['completion_tokens_per_s']:.0f} "
             f"tokens/s over {thr['wall_s']:.1f} s |",
             f"| churn cycles / failed | {ch['cycles']} / {ch['bad_cycles']} ({ch['unload_retries_409']} "
             "unloads retried after 409) |",
             f"| hostile requests / not 4xx / other status than expected | {hos['sent']} / {hos['not_4xx']} / "
             f"{hos['unexpected_status']} |",
             f"| pickle unpickled | {results['pickle_was_unpickled']} |",
             f"| /health afterwards | {results['health_after']['status']} in "
             f"{1e3 * results['health_after']['seconds']:.0f} ms |",
             f"| process RSS before / peak / after (server and clients share it) | {rss['before']:.0f} / "
             f"{rss['peak']:.0f} / {rss['after']:.0f} MiB ({rss['growth']:+.0f}) |", "",
             "Hostile requests, by kind (status: count):", "", "| request | answers |", "|---|---|"]
    lines += [f"| {what} | {', '.join(f'{s}: {n}' for s, n in counts.items())} |"
              for what, counts in hos["by_case"].items()]
    (out / "serve_load.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve.load", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--no-churn", dest="churn", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with LoadMonitor() as load:
        results = run(args.clients, args.requests, args.adapters, args.churn, args.seed)
    write(results, args.out, {**cpu_summary(), "load": load.report()})
    print((args.out / "serve_load.md").read_text())


if __name__ == "__main__":
    main()
