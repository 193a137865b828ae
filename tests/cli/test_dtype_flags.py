"""Every verb that takes --dtype takes the short names (bf16, fp16, fp32); serve defaults to auto."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lorakit.cli.main import main


def _native_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)


def test_plan_takes_short_dtype_names(capsys):
    docs = {}
    for name in ("bf16", "bfloat16", "fp16", "float16", "fp32"):
        assert main(["plan", "gpt2", "--gpus", "T4", "--dtype", name, "--json"]) == 0
        docs[name] = json.loads(capsys.readouterr().out)
    assert docs["bf16"] == docs["bfloat16"] and docs["fp16"]["inputs"]["dtype"] == "float16"
    assert docs["fp32"]["memory"]["full"]["weights"] == 2 * docs["bf16"]["memory"]["full"]["weights"]
    with pytest.raises(SystemExit):
        main(["plan", "gpt2", "--dtype", "fp8"])
    assert "accepted: float32, bfloat16, float16, fp32" in capsys.readouterr().err


def test_merge_takes_short_dtype_names(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import lorakit as lk

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(model, tmp_path / "ad")
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "ad"), "--out",
                 str(tmp_path / "m"), "--dtype", "bf16"]) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@pytest.mark.parametrize("native, flag, expected", [
    (True, [], "bfloat16"), (False, [], "float32"), (False, ["--dtype", "bf16"], "bfloat16"),
    (True, ["--dtype", "fp32"], "float32"),
])
def test_serve_defaults_to_auto_and_says_so(tiny_model_dir, monkeypatch, capsys, native, flag, expected):
    import uvicorn

    from lorakit.serve import engine as engine_mod

    _native_bf16(monkeypatch, native)
    served = {}
    real = engine_mod.engine_from_spec

    def spy(*args, **kwargs):
        served["engine"] = real(*args, **kwargs)
        return served["engine"]

    monkeypatch.setattr(engine_mod, "engine_from_spec", spy)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.setdefault("app", app))
    assert main(["serve", "--model", str(tiny_model_dir), *flag]) == 0
    assert {p.dtype for p in served["engine"].model.parameters()} == {getattr(torch, expected)}
    why = "as configured" if flag else "auto: cpu"
    assert f"base weights in {expected} ({why}" in capsys.readouterr().err


@pytest.mark.parametrize("native, flag, expected", [(True, [], "bfloat16"), (False, [], "float32"),
                                                     (True, ["--dtype", "fp32"], "float32")])
def test_eval_and_generate_default_to_auto_and_say_so(tiny_model_dir, tmp_path, monkeypatch, capsys, native, flag,
                                                      expected):
    from lorakit.models import load as load_mod

    _native_bf16(monkeypatch, native)
    loaded = []
    real = load_mod.load_model

    def spy(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        loaded.append({p.dtype for p in model.parameters()})
        return model, tokenizer

    monkeypatch.setattr(load_mod, "load_model", spy)
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "2", *flag]) == 0
    assert main(["generate", "--model", str(tiny_model_dir), "hi", "--max-new-tokens", "2", *flag]) == 0
    assert loaded == [{getattr(torch, expected)}] * 2
    err = capsys.readouterr().err
    assert err.count(f"base weights in {expected} ({'as configured' if flag else 'auto: cpu'}") == 2
