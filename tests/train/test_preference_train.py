"""lorakit train --objective dpo / orpo / simpo end to end on a tiny model: TRL's figures every logging step
and in evaluation, before/after preference accuracy in summary.json, --precompute-ref giving the same steps
as the reference forward, an exact resume (a pause, and kill -9), and bad settings refused before the model
loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError, DataError
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig

ROWS = [{"prompt": f"{i} is ", "chosen": "even" if i % 2 == 0 else "odd", "rejected": "odd!" if i % 2 == 0 else "even"}
        for i in range(24)]
CONV = [{"prompt": [{"role": "user", "content": f"{i}?"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]} for i in range(6)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(model_dir, tmp_path, name="out", **kw):
    data = write(tmp_path / "train.jsonl", ROWS[:16] + CONV)
    held = write(tmp_path / "eval.jsonl", ROWS[16:])
    return TrainConfig(**{"model": str(model_dir), "data": str(data), "eval_data": str(held), "test_data": str(held),
                          "out": str(tmp_path / name), "objective": "dpo", "max_steps": 6, "batch_size": 4,
                          "lr": 1e-2, "warmup_steps": 1, "max_seq_len": 48, "eval_every": 3, "log_every": 1,
                          "dtype": "float32", "max_new_tokens": 4, "data_cache": str(tmp_path / "cache"),
                          "seed": 3, **kw})


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TRL_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}


def test_dpo_logs_trls_figures_every_step_and_the_before_after_score(tiny_model_dir, tmp_path):
    summary = train(cfg(tiny_model_dir, tmp_path), progress=False)
    rows = metrics(tmp_path / "out")
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6 and all(TRL_NAMES <= set(r) for r in steps)
    first = steps[0]  # the adapter starts at B = 0: the policy is the reference at step 1
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), abs=1e-6)
    assert steps[-1]["loss"] < first["loss"] and steps[-1]["rewards/margins"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and all({"eval_rewards/accuracies", "eval_logps/chosen"} <= set(r) for r in evals)
    for when in ("before", "after"):
        assert set(summary[when]) >= {"preference_accuracy", "exact_match", "n"} and summary[when]["n"] == 8


def test_precomputed_reference_gives_the_steps_of_the_reference_forward(tiny_model_dir, tmp_path):
    train(cfg(tiny_model_dir, tmp_path, "plain"), progress=False)
    train(cfg(tiny_model_dir, tmp_path, "pre", precompute_ref=True), progress=False)
    assert list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "pre"), strict=True):
        for k in a.keys() & (TRL_NAMES | {"eval_loss"}):
            if not (k == "rewards/accuracies" and a["step"] == 1):  # margins of ±1e-8 at step 1 (policy = reference)
                assert a[k] == pytest.approx(b[k], abs=1e-5), k
    with pytest.raises(ConfigError, match="orpo has none"):
        train(cfg(tiny_model_dir, tmp_path, "o", objective="orpo", precompute_ref=True), progress=False)


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_objectives_train_without_a_reference_pass(tiny_model_dir, tmp_path, monkeypatch, objective):
    import lorakit.train.objectives.preference as pref

    def refuse(model):
        raise AssertionError("a reference-free objective switched the adapters off")

    monkeypatch.setattr(pref, "disable_adapters", refuse)
    train(cfg(tiny_model_dir, tmp_path, objective=objective), progress=False)
    steps = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    assert all(r["logps/chosen"] > -20 for r in steps)  # per-token means, not sums


def test_a_paused_run_resumes_exactly(tiny_model_dir, tmp_path):
    train(cfg(tiny_model_dir, tmp_path, "straight"), progress=False)
    assert "paused_at" in train(cfg(tiny_model_dir, tmp_path, "paused", stop_after=4), progress=False)
    train(cfg(tiny_model_dir, tmp_path, "paused", resume=True), progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "paused" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_nine_during_dpo_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    train(cfg(tiny_model_dir, tmp_path, "straight", max_steps=16, save_every=2, eval_every=8), progress=False)
    c = cfg(tiny_model_dir, tmp_path, "faulted", max_steps=16, save_every=2, eval_every=8)
    args = ["train", "--model", c.model, "--data", c.data, "--eval-data", c.eval_data, "--out", c.out,
            "--objective", "dpo", "--max-steps", "16", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1",
            "--max-seq-len", "48", "--eval-every", "8", "--save-every", "2", "--log-every", "1", "--dtype",
            "float32", "--seed", "3", "--max-new-tokens", "4", "--data-cache", c.data_cache, "--cpu-allocator",
            "glibc"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    ckpts = tmp_path / "faulted" / "checkpoints"
    for kill_at in (3, 9):
        proc = subprocess.Popen([sys.executable, "-m", "lorakit", *args, *(["--resume"] if kill_at > 3 else [])],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 120:
            if any(int(p.name[5:]) >= kill_at for p in ckpts.glob("step-*")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read()[-2000:]
    done = subprocess.run([sys.executable, "-m", "lorakit", *args, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "faulted" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_and_bad_pairs_fail_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(ConfigError, match="--packing"):
        train(cfg(missing, tmp_path, packing=True), progress=False)
    with pytest.raises(ConfigError, match="loss_type"):
        train(cfg(missing, tmp_path, loss_type="nope"), progress=False)
    bad = write(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*missing \['rejected'\]"):
        train(cfg(missing, tmp_path, data=str(bad)), progress=False)


def test_dpo_on_a_4bit_base_uses_the_quantized_base_as_its_reference(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    train(cfg(tiny_model_dir, tmp_path, quantize="nf4", max_steps=3), progress=False)
    steps = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert steps[0]["rewards/margins"] == 0.0  # step 1: the adapter is zero, the policy is the (4-bit) reference
    assert steps[-1]["rewards/margins"] != 0.0
