"""Where a run's metrics go. The loop hands every record to one ``Reporters`` fan-out; each
``Reporter`` writes it its own way (metrics.jsonl here; trackers plug in beside it). Sample rows an objective
shows (GRPO's completions with their rewards) go the same way: samples.jsonl here, a table in each tracker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text


class Reporter:
    """One destination for metrics. ``log`` gets ``{"loss", "lr", "grad_norm", "tokens_per_s"}`` every
    ``log_every`` steps and ``{"eval_loss"}`` at each evaluation; ``log_params`` the resolved recipe once."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """A few examples of step ``step`` (JSON-able rows, e.g. prompt, completion, reward)."""

    def close(self, status: str = "finished") -> None:
        """End the destination; ``status`` is "finished", "failed" (an exception ended the run) or
        "killed" (Ctrl-C)."""


class JsonlReporter(Reporter):
    """``metrics.jsonl``: one JSON object per record, ``{"step": N, ...metrics}`` (and ``samples.jsonl``: one per
    sample row, ``{"step": N, ...row}``).

    A fresh run starts the files anew; a resumed one first drops the records written after the
    checkpoint it resumes from (and a line cut by a kill), so every step appears once.
    """

    def __init__(self, path: Path, resume_step: int | None, samples: Path | None = None) -> None:
        self.path, self.samples = path, samples
        for p in (path, samples):
            if p is not None and resume_step is None:
                p.unlink(missing_ok=True)
            elif p is not None:
                _truncate_metrics(p, resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """``samples.jsonl``: one line per sample, ``{"step": N, ...row}`` (kept in step with metrics.jsonl)."""
        if self.samples is not None and samples:
            with open(self.samples, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n" for row in samples))


class Reporters(Reporter):
    """Every reporter of the run; rank 0 holds them all, other ranks none."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for r in self.reporters:
            r.log(step, metrics)

    def log_params(self, params: dict[str, Any]) -> None:
        for r in self.reporters:
            r.log_params(params)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        if samples:
            for r in self.reporters:
                r.log_samples(step, samples)

    def close(self, status: str = "finished") -> None:
        for r in self.reporters:
            r.close(status)


def make_reporters(cfg, out: Path, main: bool, resume_step: int | None) -> Reporters:
    """The run's reporters: metrics.jsonl and the ``--report-to`` trackers on rank 0, the resolved recipe
    logged to each (``resume_step``: the step a resumed run continues from)."""
    if not main:
        return Reporters([])
    from .trackers import make_trackers  # lazy: a tracker's package is imported only when asked for

    reporters = Reporters([JsonlReporter(out / "metrics.jsonl", resume_step, out / "samples.jsonl"),
                           *make_trackers(cfg.report_to, out, resuming=resume_step is not None)])
    reporters.log_params(cfg.to_dict())
    return reporters


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint (and a line cut by a kill) from the log."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the last line of a process killed mid-write
    atomic_write_text(path, "".join(line + "\n" for line in keep))
