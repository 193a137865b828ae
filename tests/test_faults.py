"""Faults survived: kill -9 at random moments (also mid-checkpoint) and --resume gives the same adapter."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import lorakit as lk
from lorakit.recipe import TrainConfig
from lorakit.train import train

pytestmark = pytest.mark.slow
STEPS = 40


def _args(model_dir, data, out):
    return ["train", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data), "--out", str(out),
            "--max-steps", str(STEPS), "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2",
            "--max-seq-len", "32", "--r", "4", "--eval-every", "10", "--save-every", "3", "--log-every", "1",
            "--seed", "5", "--keep-checkpoints", "2"]


def _start(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    return subprocess.Popen([sys.executable, "-m", "lorakit", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc, ready, timeout=120.0):
    """SIGKILL ``proc`` as soon as ready() is true; False if it finished first."""
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    proc.wait()
    return False


def test_kill_nine_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} say ", "completion": "yes" if i % 3 else "no"}) + "\n"
                            for i in range(20)))
    straight = _start(_args(tiny_model_dir, data, tmp_path / "straight"))
    assert straight.wait() == 0, straight.stderr.read()[-2000:]

    out = tmp_path / "faulted"
    ckpts = out / "checkpoints"
    rng = random.Random(0)

    def n_complete():
        return len(list(ckpts.glob("step-*"))) if ckpts.exists() else 0

    def writing():
        return ckpts.exists() and any(ckpts.glob(".step-*"))

    def after_checkpoints(k):
        return lambda: n_complete() >= k

    def after_seconds(s):
        t = time.monotonic()
        return lambda: time.monotonic() - t > s

    # six kills: mid-checkpoint-write twice, right after a checkpoint, and at random moments
    plans = [writing, after_checkpoints(1), after_seconds(rng.uniform(0.5, 3.0)), writing,
             after_seconds(rng.uniform(2.0, 6.0)), after_checkpoints(2)]
    kills = 0
    for ready in plans:
        proc = _start([*_args(tiny_model_dir, data, out), "--resume"])
        kills += _kill_when(proc, ready)
    assert kills >= 5
    final = _start([*_args(tiny_model_dir, data, out), "--resume"])
    assert final.wait() == 0, final.stderr.read()[-2000:]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert not list(ckpts.glob(".step-*"))  # no half-written checkpoint left behind
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == STEPS


def test_unwritable_output_fails_before_training(tiny_model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = TrainConfig(model=str(tiny_model_dir), data="dates", out=str(blocker / "run"))
    with pytest.raises(lk.LorakitError, match="not writable"):
        train(cfg, progress=False)


def test_too_little_disk_is_refused_up_front(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "run"), max_seq_len=16)
    with pytest.raises(lk.LorakitError, match="MiB free"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
