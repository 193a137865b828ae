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
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig

pytestmark = pytest.mark.slow
TORTURE = os.environ.get("LORAKIT_TORTURE") == "1"  # `make torture`: the same faults at scale
STEPS = 120 if TORTURE else 40
KILLS = 20 if TORTURE else 6


def _args(model_dir, data, out):
    return ["train", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data), "--out", str(out),
            "--max-steps", str(STEPS), "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2",
            "--max-seq-len", "32", "--r", "4", "--eval-every", "10", "--save-every", "3", "--log-every", "1",
            "--seed", "5", "--keep-checkpoints", "2", "--dtype", "float32"]


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

    # each condition is made when its process starts: it watches what that process does
    def writing():  # it has begun writing a checkpoint (not a temp dir an earlier kill left)
        old = set(ckpts.glob(".step-*"))
        return lambda: bool(set(ckpts.glob(".step-*")) - old)

    def after_checkpoint():  # it has just completed a checkpoint
        old = set(ckpts.glob("step-*"))
        return lambda: bool(set(ckpts.glob("step-*")) - old)

    def after_steps(k):  # it has logged k steps past the checkpoint it resumes from
        target = max((int(p.name[5:]) for p in ckpts.glob("step-*")), default=0) + k
        since, log = time.time(), out / "metrics.jsonl"

        def ready():
            try:  # an older log (before the resumed run truncates it) or a line being written does not count
                return log.stat().st_mtime > since and json.loads(log.read_text().splitlines()[-1])["step"] >= target
            except (OSError, ValueError, IndexError, KeyError):
                return False
        return ready

    def after_seconds(s):  # s seconds after it started: at import, or during training
        t = time.monotonic()
        return lambda: time.monotonic() - t > s

    # six kills (KILLS under torture): mid-checkpoint-write, right after a checkpoint, k steps into training,
    # and a random time (last: it may let the run finish)
    plans = [(writing,), (after_checkpoint,), (after_steps, rng.randint(1, 6)), (writing,),
             (after_steps, rng.randint(1, 6))]
    plans += [rng.choice([(writing,), (after_checkpoint,), (after_steps, rng.randint(1, 8))])
              for _ in range(KILLS - len(plans) - 1)] + [(after_seconds, rng.uniform(0.5, 3.0))]
    kills = 0
    for plan, *arg in plans:
        proc = _start([*_args(tiny_model_dir, data, out), "--resume"])
        kills += _kill_when(proc, plan(*arg))
    assert kills >= KILLS - 1
    final = _start([*_args(tiny_model_dir, data, out), "--resume"])
    assert final.wait() == 0, final.stderr.read()[-2000:]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert not list(ckpts.glob(".step-*"))  # no half-written checkpoint left behind
    from lorakit.train.checkpoint import list_checkpoints

    assert sorted(p.name for p in ckpts.iterdir()) == [p.name for p in list_checkpoints(ckpts)]  # nor half-deleted
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
