"""The planner's fit check before the first step: the verdict follows free memory, and the trainer warns
or (with --gradient-checkpointing auto) turns checkpointing on."""

from __future__ import annotations

import json

import pytest

import lorakit.plan.fit as fit
from lorakit.plan.arch import read_arch
from lorakit.plan.count import count_model, meta_model
from lorakit.plan.inputs import PlanInputs
from lorakit.plan.memory import plan_memory
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig


def _cfg(model_dir, tmp_path, **kw):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} say", "completion": "yes"}) + "\n" for i in range(8)))
    base = dict(model=str(model_dir), data=str(data), out=str(tmp_path / "run"), max_steps=1, batch_size=4,
                max_seq_len=32, r=4, dtype="float32", eval_every=0, save_every=0, data_cache="off")
    return TrainConfig(**{**base, **kw})


def test_verdict_is_the_planned_lora_peak_against_free_memory(tiny_model_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, tmp_path)
    from lorakit.lora.config import LoraConfig

    model = meta_model(cfg.model)
    expected = plan_memory(read_arch(model), count_model(model, LoraConfig(r=4, target_modules="all-linear")),
                           PlanInputs(batch_size=4, seq_len=20, dtype="float32", label_fraction=0.5, device="cpu"))
    monkeypatch.setattr(fit, "free_bytes", lambda device: expected.total("lora") + 1)
    verdict = fit.check_fit(cfg, "float32", "cpu", 20, 0.5)
    assert verdict.peak == expected.total("lora") and verdict.fits and "fits" in verdict.message
    monkeypatch.setattr(fit, "free_bytes", lambda device: expected.total("lora") - 1)
    assert not fit.check_fit(cfg, "float32", "cpu", 20, 0.5).fits
    assert fit.check_fit(cfg, "float32", "cpu", 40, 0.5).peak > verdict.peak
    assert 0 < fit.free_bytes("cpu")


@pytest.mark.parametrize("setting, fits, turned_on", [("auto", False, True), ("auto", True, False),
                                                       (False, False, False)])
def test_trainer_warns_or_turns_checkpointing_on(tiny_model_dir, tmp_path, monkeypatch, capsys, setting, fits,
                                                 turned_on):
    import lorakit.train.setup as setup

    calls = []
    monkeypatch.setattr(setup, "enable_checkpointing", lambda model: calls.append(model))
    seen = []

    def stub(cfg, dtype, device, seq_len, label_fraction, nproc):
        seen.append((seq_len, label_fraction, nproc))
        return fit.Fit(2.0, 1.0 if not fits else 3.0, fits, "planned peak x")

    train(_cfg(tiny_model_dir, tmp_path, gradient_checkpointing=setting), progress=False, fit_check=stub)
    assert len(calls) == turned_on
    assert seen[0] == (9, 32 / 72, 1)  # every example is 9 tokens (72 / 8), 32 of the 72 labelled; 1 process
    out = capsys.readouterr().out
    assert "lorakit: memory: planned peak x" in out
    assert ("turned on" in out) == turned_on and ("pass --gradient-checkpointing" in out) == (not fits and not setting)


def test_real_check_runs_before_the_first_step(tiny_model_dir, tmp_path, capsys):
    train(_cfg(tiny_model_dir, tmp_path), progress=False, fit_check=fit.check_fit)
    assert "GiB free on cpu: fits" in capsys.readouterr().out
