"""lorakit train --quantize: a 4-bit base trains, says so, resumes exactly after kill -9, and gives
the same adapter with 1 and 2 DDP processes; FSDP and --full are refused with the reason."""

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

import lorakit as lk
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig

pytest.importorskip("bitsandbytes")


def _data(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"{i} is a number, say ", "completion": "yes" if i % 3 else "no"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model_dir, data, out, steps=12, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data), "--out", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1",
            "--max-seq-len", "32", "--r", "4", "--dropout", "0.05", "--eval-every", "4", "--save-every", "2",
            "--log-every", "1", "--seed", "3", "--dtype", "float32", "--quantize", "nf4", *extra]


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    return subprocess.Popen([sys.executable, "-m", "lorakit", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_a_quantized_run_trains_reports_and_saves_a_plain_peft_adapter(tiny_model_dir, tmp_path, capsys):
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(_data(tmp_path)), eval_data=str(_data(tmp_path)),
                      out=str(tmp_path / "run"), max_steps=8, batch_size=4, lr=1e-2, warmup_steps=1, max_seq_len=32,
                      r=4, dropout=0.05, eval_every=0, save_every=0, log_every=1, dtype="float32", quantize="nf4")
    summary = train(cfg, progress=False)
    assert "base quantized to nf4 with double-quantized scales by bitsandbytes: 14 Linear" in capsys.readouterr().out
    assert summary["quantization"] == {"method": "nf4", "double_quant": True, "compute_dtype": "float32",
                                       "layers": 14}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["quantization"]["method"] == "nf4"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert not [k for k in config if "quant" in k]
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "## Quantized base (QLoRA)" in card and "its Linears quantized to nf4" in card and "## Training results" in card
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lk.load_adapter(dense, tmp_path / "run" / "adapter")  # onto the 32-bit base as well
    assert any(m.lora_B["default"].weight.abs().sum() > 0 for _, m in lk.lora.adapters.lora_layers(dense)
               if hasattr(m, "lora_B"))


@pytest.mark.parametrize(("extra", "match"), [({"quantize": "int4"}, "nf4, fp4 or int8"),
                                              ({"quantize": "nf4", "full": True}, "--full"),
                                              ({"quantize": "nf4", "fsdp": True}, "quant_state")])
def test_bad_combinations_are_refused_with_the_reason(extra, match):
    with pytest.raises(lk.ConfigError, match=match):
        TrainConfig(**extra)


def test_without_bitsandbytes_quantize_fails_at_once_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(lk.ConfigError, match=r"pip install 'lorakit\[qlora\]'"):
        TrainConfig(quantize="nf4")


@pytest.mark.slow
def test_kill_nine_then_resume_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    straight = _run(_args(tiny_model_dir, data, tmp_path / "straight"))
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]
    out = tmp_path / "faulted"
    for kill_at in (3, 7):  # steps logged before SIGKILL: mid-way between checkpoints, then after one
        proc = _run([*_args(tiny_model_dir, data, out), "--resume"])
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 300:
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            try:
                if lines and json.loads(lines[-1])["step"] >= kill_at:
                    proc.send_signal(signal.SIGKILL)
                    break
            except ValueError:
                pass
            time.sleep(0.01)
        proc.wait()
    final = _run([*_args(tiny_model_dir, data, out), "--resume"])
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    assert _max_diff(_adapter(tmp_path / "straight"), _adapter(out)) < 1e-6


@pytest.mark.slow
def test_two_ddp_processes_give_the_adapter_of_one(tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    for name, nproc in (("one", 1), ("two", 2)):
        proc = _run(_args(tiny_model_dir, data, tmp_path / name, 6, "--nproc", str(nproc), "--dropout", "0"))
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert _max_diff(_adapter(tmp_path / "one"), _adapter(tmp_path / "two")) < 1e-5
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["quantization"]["method"] == "nf4"
