"""Plots people would rather look at than read: matplotlib PNGs, written atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path

from .fileio import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_loss(metrics_path: str | Path, png_path: str | Path) -> bool:
    """Train and eval loss against step from metrics.jsonl; returns False when there is nothing to plot."""
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return False
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return False
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("lorakit training")
    save_png(fig, png_path)
    plt.close(fig)
    return True
