"""loss.png: a cross-entropy on a log scale, a loss that reaches 0 or below (GRPO, DPO) on a linear one."""

from __future__ import annotations

import json

import pytest

from lorakit import plots


@pytest.mark.parametrize("losses, scale", [([2.0, 1.0, 0.5], "log"), ([0.01, -0.02, 0.0], "linear")])
def test_the_loss_axis_is_logarithmic_only_for_positive_losses(tmp_path, monkeypatch, losses, scale):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)))
    seen = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: seen.append(fig.axes[0].get_yscale()))
    assert plots.plot_loss(metrics, tmp_path / "loss.png")
    assert seen == [scale]
