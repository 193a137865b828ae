"""What every bench shares: the run context, A B A B timing in one process or in fresh processes,
medians and ratios, the machine and its load, targets, result files.

Timing rule (DESIGN.md rule 9): competitors run side by side, interleaved. Round i runs every
competitor once, starting at a rotated position (A B C, B C A, C A B, ...), so none is always first
or always after the heaviest one; warm-up rounds are discarded; a figure reports the median of the
rounds and ratios of medians. The spread of a ratio is half the interquartile range of its per-round
ratios, relative to the ratio: a target closer than that is inside the run's noise.

In one process: ``alternate(cases, ctx)`` times callables. In fresh processes (peak RSS, an
allocator, a whole training run): ``alternate_processes(arms, rounds)`` calls one function per arm
per round, each of which starts a worker with ``run_worker(argv)``; the worker answers with
``emit(result)``. Every result file records ``recorded(load)``: when, CPU model, vector flags,
versions and the 1-minute load average during the run (``load_line`` says it in words).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODEL = "smollm2-135m-instruct"
SCHEMA = "lorakit-bench/1"  # marks this suite's JSON files among other scripts' results


@dataclass
class Context:
    """One run's settings; every figure reads them from here (and records them)."""

    device: str = "cpu"
    model: str = DEFAULT_MODEL  # a lorakit.models.load_model spec, or "module:function" returning model[, tok]
    quick: bool = False  # smaller shapes and fewer rounds: a smoke run, not a measurement
    repeats: int = 5  # measured rounds per figure (cheap figures multiply this)
    warmup: int = 1  # rounds run first and discarded
    threads: int = 1
    threads_why: str = ""
    seed: int = 0
    batch: int = 4
    seq: int = 128
    r: int = 8
    lora_alpha: int = 16
    dropouts: tuple[float, ...] = (0.0, 0.05)
    precisions: tuple[str, ...] = ("float32", "bfloat16")  # frozen-base dtypes of the training figures
    lr: float = 1e-4
    infer_batches: tuple[int, ...] = (1, 8)
    infer_seq: int = 128
    out: Path = RESULTS
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def quick_run(cls, **kw) -> Context:
        """The --quick settings: small shapes, 3 rounds; enough to exercise every code path."""
        base = {"quick": True, "repeats": 3, "batch": 2, "seq": 64, "infer_batches": (1, 2), "infer_seq": 64}
        return cls(**{**base, **kw})

    def config(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k != "out"}
        out["dropouts"], out["infer_batches"] = list(self.dropouts), list(self.infer_batches)
        out["precisions"] = list(self.precisions)
        return out

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


# ---- timing -------------------------------------------------------------------------------------

Case = Callable[[], object] | tuple[Callable[[], object], Callable[[], object]]  # fn, or (fn, untimed reset)


def time_once(case: Case, sync: Callable[[], None]) -> float:
    fn, reset = case if isinstance(case, tuple) else (case, None)
    gc.collect()  # collect between calls, never inside one
    gc.disable()
    try:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    if reset is not None:
        reset()
    return elapsed


def alternate(cases: dict[str, Case], ctx: Context, repeats: int | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each case: warm-up rounds discarded, then ``repeats`` rotated rounds."""
    names, repeats = list(cases), repeats or ctx.repeats
    gc.collect()
    gc.freeze()  # models and modules move out of the collector's sight: collecting between calls stays cheap
    try:
        for _ in range(ctx.warmup):
            for name in names:
                time_once(cases[name], ctx.sync)
        samples: dict[str, list[float]] = {n: [] for n in names}
        for i in range(repeats):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(time_once(cases[name], ctx.sync))
            if log:
                log(f"  round {i + 1}/{repeats}: " + ", ".join(f"{n} {samples[n][-1]:.3g}s" for n in names))
    finally:
        gc.unfreeze()
    return samples


def summary(samples: list[float]) -> dict:
    """Median, quartiles and relative spread (IQR / median) of one case's samples."""
    med = statistics.median(samples)
    q1, q3 = _quartiles(samples)
    return {"median": med, "q1": q1, "q3": q3, "spread": (q3 - q1) / med if med else 0.0,
            "n": len(samples), "samples": [round(s, 6) for s in samples]}


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def ratio(a: list[float], b: list[float]) -> dict:
    """median(a) / median(b), with ± = half the IQR of the per-round ratios a_i / b_i, relative."""
    value = statistics.median(a) / statistics.median(b)
    per_round = [x / y for x, y in zip(a, b, strict=True)]
    q1, q3 = _quartiles(per_round)
    return {"value": value, "noise": (q3 - q1) / 2 / value, "per_round": [round(x, 4) for x in per_round]}


# ---- fresh processes ----------------------------------------------------------------------------

RESULT_PREFIX = "RESULT "  # the line a worker answers with; everything else it prints is ignored


def emit(result: dict) -> None:
    """A worker's answer to ``run_worker``: one line on stdout."""
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def run_worker(argv: list[str], env: dict[str, str] | None = None, timeout: float = 3600,
               input: str | None = None) -> dict:
    """Run ``python ARGV`` (e.g. ``["-m", "bench.train.allocator", "--worker", ...]``) in a fresh
    interpreter from the repository root and return the dict its ``emit`` printed.

    Args:
        argv: the interpreter's arguments.
        env: the whole environment (default: this one's); the repository root is put on PYTHONPATH.
        timeout: seconds before the worker is killed.
        input: text on the worker's stdin.
    """
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout, input=input)
    answers = [ln[len(RESULT_PREFIX):] for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode or not answers:
        raise RuntimeError(f"worker {' '.join(argv)} failed (exit {proc.returncode}, "
                           f"{'no' if not answers else len(answers)} answer):\n{proc.stderr[-4000:]}")
    return json.loads(answers[-1])


def alternate_processes(arms: dict[str, Callable[[int], dict]], rounds: int,
                        log: Callable[[str], None] | None = None,
                        after_round: Callable[[dict[str, list[dict]]], None] | None = None) -> dict[str, list[dict]]:
    """A B A B in fresh processes: round i calls every arm once (``arms[name](i)``, which runs its
    worker with ``run_worker``), starting at a rotated position; returns each arm's results in
    round order. ``after_round`` sees the results so far (write them: a cut-short run keeps its figures)."""
    names = list(arms)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(arms[name](i))
            if log:
                log(f"round {i + 1}/{rounds} {name}: {results[name][-1]}")
        if after_round:
            after_round(results)
    return results


# ---- targets ------------------------------------------------------------------------------------

def target(what: str, value: float, limit: float, why_missed: str, *, op: str = "<=", noise: float = 0.0,
           unit: str = "x") -> dict:
    """A target from the issue, checked: ``value <= limit``, ``value >= limit`` or, with op "within",
    ``|value - 1| <= limit``. ``why_missed`` is the data-driven explanation shown when it is missed."""
    shown = f"{value:.3f}{unit}"
    if op == "within":
        met, margin = abs(value - 1) <= limit, abs(abs(value - 1) - limit)
        reason = f"{shown} is {'within' if met else 'outside'} ±{limit:.0%} of 1"
    else:
        met, margin = (value <= limit if op == "<=" else value >= limit), abs(value - limit)
        reason = f"{shown} {op.replace('<=', '≤').replace('>=', '≥') if met else _negate(op)} {limit:.3g}{unit}"
    if noise and margin <= noise * value:
        reason += f" (inside the run's noise ±{noise:.1%}: rerun on a quieter machine to settle it)"
    if not met and why_missed:
        reason += f"; {why_missed}"
    return {"what": what, "value": value, "limit": limit, "op": op, "noise": noise,
            "status": "MET" if met else "MISSED", "reason": reason}


def _negate(op: str) -> str:
    return {"<=": ">", ">=": "<"}[op]


# ---- machine and load ---------------------------------------------------------------------------

def auto_threads() -> tuple[int, str]:
    """As many threads as there are cores the rest of the machine leaves idle (at least one).

    On a shared machine more threads than idle cores make OpenMP threads wait on each other and
    slow every call down severalfold (measured here: 2 threads 2.5x slower than 1 at load 7 on 2 cores).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    n = max(1, min(cores, cores - int(load)))
    return n, f"auto: {n} of {cores} cores, 1-min load {load:.1f} before the run"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_summary() -> dict:
    """CPU model, its vector flags (avx*, amx*, fma), logical CPUs and the versions that matter: the line
    every CPU figure is recorded with."""
    import transformers

    info = {"cpu": _cpu_model(), "flags": [], "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                info["flags"] = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    return info


def _mem_total_gb() -> float | None:
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        return round(kb / 2**20, 1)
    except (OSError, StopIteration):
        return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(ctx: Context) -> dict:
    import peft
    import transformers

    import lorakit

    status = [(ln[:2], ln[3:]) for ln in _git("status", "--porcelain", "--", "lorakit").splitlines() if ln]
    changed = [path for code, path in status if code != "??"]
    if any(code == "??" for code, _ in status):
        changed.append(f"{sum(code == '??' for code, _ in status)} untracked path(s)")
    commit = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
    info = {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "memory_gb": _mem_total_gb(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "lorakit": lorakit.__version__, "git_commit": commit,
            "lorakit_changes_since_commit": changed, "device": ctx.device,
            "threads": ctx.threads, "threads_why": ctx.threads_why}
    if ctx.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(ctx.device))
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
    return info


class LoadMonitor:
    """Samples the 1-minute load average every few seconds while a figure runs."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.samples = every_s, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def report(self) -> dict:
        s = self.samples
        return {"cores": os.cpu_count(), "min": min(s), "median": statistics.median(s), "max": max(s), "n": len(s)}


def recorded(load: LoadMonitor | dict) -> dict:
    """What every result is recorded with: when, the CPU line (``cpu_summary``) and the load during the run."""
    return {"when": now_iso(), **cpu_summary(),
            "load": load.report() if isinstance(load, LoadMonitor) else load}


def load_line(load: dict) -> str:
    """The load during a run, in words, for a results page."""
    busy = " (busier than its cores: read the ratios, not the times)" if load["median"] > load["cores"] else ""
    return (f"1-min load average during the run {load['min']:.1f}–{load['max']:.1f} (median {load['median']:.1f}) "
            f"on {load['cores']} cores{busy}")


def machine_line(m: dict, load: dict, libraries: tuple[str, ...], threads: str = "",
                 shared: str = "read the ratios rather than the times") -> str:
    """The CPU, its vector flags, the library versions in ``libraries`` (keys of ``m``), the threads and the
    load during the run, as every peer comparison's results page ends; ``shared``: what a busy machine means."""
    versions = ", ".join(f"{name} {m[name]}" for name in ("torch", "transformers", *libraries))
    return (f"CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs; flags {' '.join(m['flags']) or 'none'}); {versions}"
            + (f"; {threads}" if threads else "") + f". 1-min load average during the run {load['min']:.1f}-"
            f"{load['max']:.1f} (median {load['median']:.1f}) on {load['cores']} cores"
            + (f": other jobs shared the machine; {shared}." if load["median"] > load["cores"] / 2 else "."))


def run_peer_bench(args, measure: Callable[[Any], dict], render: Callable[[dict], str], config: dict,
                   prepare: Callable[[], None] | None = None) -> dict:
    """A lorakit-vs-TRL bench's driver: threads (``--threads`` 0: ``auto_threads``), ``prepare`` outside the
    timed workers, ``measure(args)`` under a LoadMonitor, then bench/results/NAME.{json,md} (``--quick``: under
    quick/) with the CPU line, peft's and trl's versions, and the page printed. ``args`` carries threads, quick
    and name; ``config`` the bench's own settings."""
    import peft
    import trl

    why = f"{args.threads} (given)"
    if not args.threads:
        args.threads, why = auto_threads()
    if prepare is not None:
        prepare()
    with LoadMonitor() as load:
        results = measure(args)
    doc = {"name": args.name, "when": now_iso(),
           "config": {**config, "threads": args.threads, "threads_why": why, "quick": args.quick},
           "machine": {**cpu_summary(), "peft": peft.__version__, "trl": trl.__version__}, "load": load.report(),
           "results": results}
    out = RESULTS / ("quick" if args.quick else "")
    write_json(out / f"{args.name}.json", doc)
    page = render(doc)
    (out / f"{args.name}.md").write_text(page)
    print(page)
    return doc


# ---- results ------------------------------------------------------------------------------------

def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_json(path: Path, obj: dict) -> Path:
    """Write ``obj`` as indented JSON via a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_results(out: Path) -> dict[str, dict]:
    """This suite's results in ``out`` (other scripts' JSON files there are skipped), by name."""
    found = {}
    for path in sorted(out.glob("*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(obj, dict) and obj.get("schema") == SCHEMA:
            found[obj["name"]] = obj
    return found


def fmt_s(seconds: float) -> str:
    """Seconds in a readable unit: 2.41 s, 183 ms, 950 µs."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_median(s: dict) -> str:
    """'2.41 s ±3%': median and half the relative IQR."""
    return f"{fmt_s(s['median'])} ±{s['spread'] / 2:.0%}"


def fmt_mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"
