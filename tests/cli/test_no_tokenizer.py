"""Model directories written by ``model.save_pretrained`` alone (weights, no tokenizer files): the verbs
that need no tokenizer work on them, the verbs that do say which directory lacks which files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lorakit as lk
from lorakit.cli.main import main


def _weights_only(folder, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights-only")
    _weights_only(root / "base", 0)
    tuned = _weights_only(root / "tuned", 0)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.1)  # rank 1 change
        tuned.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    tuned.save_pretrained(root / "tuned")
    assert sorted(p.name for p in (root / "base").iterdir()) == ["config.json", "generation_config.json",
                                                                   "model.safetensors"]
    return root / "base", root / "tuned", tuned


@pytest.fixture
def no_tokenizer_loads(monkeypatch):
    """Fail the test if anything asks transformers for a tokenizer."""
    from transformers import AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError(f"a tokenizer was loaded: {args}")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


def test_verbs_on_weights_alone_load_no_tokenizer(pair, tmp_path, capsys, no_tokenizer_loads):
    base, tuned, tuned_model = pair
    assert main(["extract", "--base", str(base), "--tuned", str(tuned), "--r", "3", "--out", str(tmp_path / "ad")]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg, tensors, _ = lk.read_adapter(tmp_path / "ad")
    assert cfg.base_model_name_or_path == str(base.resolve())
    assert {k.split(".lora_")[0] for k in tensors} == {"base_model.model.model.layers.0.self_attn.q_proj",
                                                       "base_model.model.model.layers.1.mlp.down_proj"}
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 0
    assert "max |logits(merged) - logits(unmerged)|" in capsys.readouterr().out
    assert not any("token" in p.name for p in (tmp_path / "m").iterdir())  # weights in, weights out
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:  # rank 3 holds a rank-1 change exactly
        got = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert torch.allclose(got, tuned_model.model.layers[0].self_attn.q_proj.weight, atol=1e-5)
    for argv in (["analyze", "--base", str(base), "--tuned", str(tuned), "--json"],
                 ["analyze", str(tmp_path / "ad"), "--base", str(base), "--json"],
                 ["count", str(base), "--json"], ["targets", str(base), "--json"],
                 ["info", str(tmp_path / "ad"), "--json"], ["plan", str(base), "--gpus", "T4", "--json"]):
        assert main(argv) == 0, argv
        json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("verb", [["eval", "--data", "DATA"], ["generate", "hello"], ["train", "--data", "DATA"],
                                  ["extract", "--tuned", "TUNED", "--r", "2", "--data", "DATA"]])
def test_verbs_that_need_a_tokenizer_name_the_directory_and_files(pair, tmp_path, capsys, verb):
    base, tuned, _ = pair
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    flag = "--base" if verb[0] == "extract" else "--model"
    argv = [str(data) if a == "DATA" else str(tuned) if a == "TUNED" else a for a in verb]
    out = ["--out", str(tmp_path / "o")] if verb[0] in ("extract", "train") else []
    assert main([*argv, flag, str(base), *out]) == 2
    err = capsys.readouterr().err
    assert f"{base}: this command needs a tokenizer" in err and "tokenizer.json" in err
    assert "save_pretrained" in err and "Traceback" not in err


def test_merge_copies_a_tokenizer_without_loading_it(tiny_model_dir, tmp_path, capsys, no_tokenizer_loads):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(model, tmp_path / "ad")
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "ad"), "--out",
                 str(tmp_path / "m")]) == 0
    files = [p.name for p in tiny_model_dir.iterdir() if "token" in p.name or p.name.startswith("chat_template")]
    assert "tokenizer.json" in files
    for name in files:  # byte for byte: a tokenizer whose library is missing is passed on all the same
        assert (tmp_path / "m" / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
