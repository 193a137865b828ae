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


def plot_loss(metrics_path: str | Path, png_path: str | Path, extra: tuple[str, ...] | list[str] = ()) -> bool:
    """Train and eval loss against step from metrics.jsonl; returns False when there is nothing to plot.

    Args:
        metrics_path, png_path: the records read, the PNG written.
        extra: other figures (a loss function's sub-losses) drawn in a second panel below, each in training
            and, where logged, in evaluation (``eval_<name>``).
    """
    metrics_path = Path(metrics_path)
    if not metrics_path.exists():
        return False
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return False
    plt = _figure()
    fig, axes = plt.subplots(2 if extra else 1, 1, figsize=(7, 7 if extra else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)" if not extra else "loss")
    if all(v > 0 for _, v in train + evals):  # a cross-entropy; GRPO's and DPO's losses may reach 0 or below
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("lorakit training")
    if extra:
        _plot_parts(axes[1][0], records, extra)
    save_png(fig, png_path)
    plt.close(fig)
    return True


def _plot_parts(ax, records: list[dict], names) -> None:
    for i, name in enumerate(names):
        for key, style, label in ((name, "-", name), (f"eval_{name}", "o--", f"eval {name}")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, color=f"C{i}", label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("sub-losses")
    ax.grid(alpha=0.3)
    ax.legend()
