"""How a run is sized and guarded: --epochs, one collective per step, the lock on --out."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from lorakit.errors import ConfigError, TrainingError
from lorakit.train import distributed
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig, load_recipe
from lorakit.train.setup import lr_lambda


def _cfg(model_dir, tmp_path, n=22, **kw):
    rows = [{"prompt": f"{i} is a number, say ", "completion": "yes"} for i in range(n)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), batch_size=4, lr=1e-2,
                warmup_steps=1, eval_every=0, save_every=0, log_every=1, max_seq_len=32, r=4, seed=3,
                dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def test_epochs_size_the_run_schedule_and_summary(tiny_model_dir, tmp_path):
    # 22 examples in batches of 4 = 6 micro-batches an epoch; grad_accum 2 -> 3 steps an epoch
    summary = train(_cfg(tiny_model_dir, tmp_path, epochs=2.5, grad_accum=2), progress=False)
    steps = math.ceil(2.5 * 3)
    assert summary["steps"] == steps and summary["epochs"] == pytest.approx(steps / 3, abs=1e-4)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    cfg = _cfg(tiny_model_dir, tmp_path, epochs=2.5)
    # the cosine schedule ends at the derived step count, not at a default max_steps
    assert lrs == pytest.approx([cfg.lr * lr_lambda(cfg, steps)(s) for s in range(1, steps + 1)])
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_epochs_and_max_steps_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="give one"):
        TrainConfig(max_steps=10, epochs=1)
    assert TrainConfig().max_steps == 200 and TrainConfig(epochs=2).max_steps == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 80\n")
    assert load_recipe(recipe, {"epochs": 3}).max_steps == 0  # the flag replaces the recipe's sizing
    recipe.write_text("epochs: 2\n")
    assert load_recipe(recipe, {"max_steps": 7}).epochs == 0
    recipe.write_text("epochs: 2\nmax_steps: 5\n")
    with pytest.raises(ConfigError, match="give one"):
        load_recipe(recipe)


def test_one_collective_per_training_step(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = distributed.all_sum
    monkeypatch.setattr(distributed, "all_sum", lambda info, *v: calls.append(len(v)) or real(info, *v))
    train(_cfg(tiny_model_dir, tmp_path, max_steps=4), progress=False)
    assert len(calls) == 4  # no eval data: every all_sum is a training step's


HOLD = """
import sys, time
from pathlib import Path
from lorakit.train.setup import lock_out_dir
lock_out_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_out_is_refused_until_the_first_dies(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=f"in use by another training run \\(pid {holder.pid}\\)"):
            train(_cfg(tiny_model_dir, tmp_path, max_steps=2), progress=False)
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the OS released the dead holder's lock: the run goes ahead, and releases the lock when done
    assert train(_cfg(tiny_model_dir, tmp_path, max_steps=2), progress=False)["steps"] == 2
    assert train(_cfg(tiny_model_dir, tmp_path, max_steps=3, resume=True), progress=False)["steps"] == 3
