"""kill -9 while training a model of your own (2-stream rows, a loss with sub-losses, a saved head), then
--resume: the adapter equals the uninterrupted run's, and so do the logged losses."""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load_file
from test_custom_train import grid  # noqa: F401  (the fixture)
from test_faults import _kill_when, _start

pytestmark = pytest.mark.slow
STEPS = 30


def _args(src, data, out):
    return ["train", "--model", f"{src}:build", "--loss", f"{src}:loss", "--data", str(data), "--eval-data", str(data),
            "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "3", "--grad-accum", "2", "--lr", "1e-2",
            "--warmup-steps", "2", "--target-modules", "wqkv", "wo", "--modules-to-save", "head", "--eval-every", "7",
            "--save-every", "3", "--log-every", "1", "--seed", "5", "--dtype", "float32"]


def test_kill_nine_then_resume_equals_uninterrupted(grid, tmp_path):  # noqa: F811
    src, _, data = grid
    straight = _start(_args(src, data, tmp_path / "straight"))
    assert straight.wait() == 0, straight.stderr.read()[-2000:]
    out = tmp_path / "faulted"
    ckpts = out / "checkpoints"

    def writing():  # it has begun writing a checkpoint
        old = set(ckpts.glob(".step-*"))
        return lambda: bool(set(ckpts.glob(".step-*")) - old)

    def after_steps(k):  # it has logged k steps past the checkpoint it resumes from
        target = max((int(p.name[5:]) for p in ckpts.glob("step-*")), default=0) + k
        since, log = time.time(), out / "metrics.jsonl"

        def ready():
            try:
                return log.stat().st_mtime > since and json.loads(log.read_text().splitlines()[-1])["step"] >= target
            except (OSError, ValueError, IndexError, KeyError):
                return False
        return ready

    kills = 0
    for plan, *arg in [(writing,), (after_steps, 2), (writing,), (after_steps, 4)]:
        proc = _start([*_args(src, data, out), "--resume"])
        kills += _kill_when(proc, plan(*arg))
    assert kills >= 3
    final = _start([*_args(src, data, out), "--resume"])
    assert final.wait() == 0, final.stderr.read()[-2000:]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("head" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

    def losses(run):  # (step, train or eval) -> every figure but the timing
        return {(r["step"], "eval_loss" in r): {k: v for k, v in r.items() if k not in ("step", "tokens_per_s")}
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    want, got = losses(tmp_path / "straight"), losses(out)
    assert sorted(got) == sorted(want) and max(got)[0] == STEPS
    assert {"semantic", "codebook"} <= set(want[1, False]) and "eval_semantic" in want[7, True]
    for key, values in want.items():
        assert got[key] == pytest.approx(values, rel=1e-5), key
