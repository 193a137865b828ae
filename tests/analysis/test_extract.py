"""lorakit.extract: base + tuned checkpoints → a PEFT-format adapter by truncated SVD of each ΔW.

References: the tuned model's own logits (full-rank extraction must reproduce them, through
lorakit's and PEFT's loaders), and ΔW's known spectrum (Eckart–Young: the rank-k error is
sqrt(1 − energy kept)).
"""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from builders import tiny_gpt2, tiny_llama
from test_analysis import known_delta, save_known_pair

import lorakit as lk
from lorakit.analysis.extract import extract, extract_into, format_extract, svd_factors
from lorakit.analysis.svd import energy_at

WORDS = ["<unk>", "<pad>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "convert", "date",
         "one", "two", "three", "four", "five", "2019", "2020", "-", "01", "02", "03"]
CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   chat_template=CHATML)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def perturb_linears(model, seed: int = 3, scale: float = 0.05):
    """A tuned copy: every Linear / Conv1D weight (not a tied head) gets a dense, full-rank update."""
    from lorakit.lora.inject import candidate_modules, module_kind

    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    tied = tuned.get_output_embeddings().weight is tuned.get_input_embeddings().weight
    with torch.no_grad():
        for m in candidate_modules(tuned).values():
            if module_kind(m) in ("linear", "conv1d") and not (tied and m is tuned.get_output_embeddings()):
                m.weight.add_(torch.randn(m.weight.shape, generator=gen) * scale)
    return tuned


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """(base dir, tuned dir, tuned model), both dirs with a tokenizer: tuned changes every Linear."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama()
    tuned = perturb_linears(base)
    for folder, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(root / folder)
        tokenizer().save_pretrained(root / folder)
    return root / "base", root / "tuned", tuned


def test_svd_factors_full_rank_and_truncated():
    delta = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    b, a, s = svd_factors(delta, r=50)
    assert b.shape == (20, 12) and a.shape == (12, 12)
    assert float((b @ a - delta).norm() / delta.norm()) < 1e-6
    b, a, s = svd_factors(delta, r=3)
    err = float((delta.double() - (b @ a).double()).norm() / delta.double().norm())
    assert err == pytest.approx(math.sqrt(1 - energy_at(s, 3)), rel=1e-5)
    b, a, _ = svd_factors(known_delta((20, 12), torch.tensor([3.0, 2.0, 1.0, 0.5])), energy=0.95)
    assert a.shape[0] == 3


def test_full_rank_extraction_gives_the_tuned_logits(llama_pair, tmp_path, ids):
    base_dir, tuned_dir, tuned = llama_pair
    model = tiny_llama()
    report = extract_into(model, base_dir, tuned_dir, r=64, progress=False)
    assert len(report.modules) == 2 * 7 + 1 and report.not_extracted == {}
    assert max(m.rel_error for m in report.modules) < 1e-5  # fp32 round-off only
    ranks = {m.name.rsplit(".", 1)[-1]: m.r for m in report.modules}
    assert ranks == {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 32, "gate_proj": 32, "up_proj": 32,
                     "down_proj": 32, "lm_head": 32}
    want = logits(tuned, ids)
    assert torch.allclose(logits(model, ids), want, atol=1e-4)
    lk.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 32 and set(cfg["rank_pattern"].values()) == {16}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]  # scaling 1 everywhere
    ours = lk.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert torch.allclose(logits(ours, ids), want, atol=1e-4)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert torch.allclose(logits(theirs, ids), want, atol=1e-4)


def test_conv1d_models_extract_too(tmp_path, ids):
    base = tiny_gpt2()
    tuned = perturb_linears(base)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    model = tiny_gpt2()
    report = extract_into(model, tmp_path / "base", tmp_path / "tuned", r=64, progress=False)
    assert {m.name.rsplit(".", 1)[-1] for m in report.modules} == {"c_attn", "c_proj", "c_fc"}
    assert torch.allclose(logits(model, ids % 64), logits(tuned, ids % 64), atol=1e-4)
    lk.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter")
    assert torch.allclose(logits(theirs, ids % 64), logits(tuned, ids % 64), atol=1e-4)


def test_energy_picks_per_module_ranks_and_lists_what_lora_cannot_hold(tmp_path):
    save_known_pair(tiny_llama(), tmp_path)
    report = extract_into(tiny_llama(), tmp_path / "base", tmp_path / "tuned", energy=0.95, progress=False)
    got = {m.name: m for m in report.modules}
    want = {"model.layers.0.self_attn.q_proj": 3, "model.layers.1.self_attn.q_proj": 1,
            "model.layers.0.mlp.down_proj": 3, "model.layers.1.mlp.down_proj": 2}
    assert {n: m.r for n, m in got.items()} == want
    assert got["model.layers.0.self_attn.q_proj"].rel_error == pytest.approx(math.sqrt(0.25 / 14.25), rel=1e-4)
    assert got["model.layers.0.self_attn.q_proj"].energy == pytest.approx(14 / 14.25, abs=1e-6)
    assert list(report.not_extracted) == ["model.norm.weight"]
    assert report.not_extracted["model.norm.weight"] == pytest.approx(0.5, abs=1e-6)


def test_extract_end_to_end_with_eval_loss(llama_pair, tmp_path):
    base_dir, tuned_dir, _ = llama_pair
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"convert date {w} two"},
                          {"role": "assistant", "content": f"2019 - 0{i % 3 + 1}"}]}
            for i, w in enumerate(["one", "three", "four", "five"] * 3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = extract(str(base_dir), str(tuned_dir), tmp_path / "out", r=64, data=str(data), batches=2,
                     batch_size=4, progress=False)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    ev = result["eval_loss"]
    assert ev["extracted"] == pytest.approx(ev["tuned"], abs=1e-4) and abs(ev["base"] - ev["tuned"]) > 1e-3
    _, tensors, _ = lk.read_adapter(tmp_path / "out")
    assert result["adapter_params"] == sum(t.numel() for t in tensors.values())
    text = format_extract(result)
    assert "15 modules" in text and "eval loss: base" in text


def test_errors_name_the_problem(llama_pair, tmp_path):
    base_dir, tuned_dir, _ = llama_pair
    with pytest.raises(lk.ConfigError, match="exactly one"):
        extract_into(tiny_llama(), base_dir, tuned_dir, r=4, energy=0.9)
    with pytest.raises(lk.ConfigError, match="exactly one"):
        extract_into(tiny_llama(), base_dir, tuned_dir)
    with pytest.raises(lk.ConfigError, match="energy"):
        extract_into(tiny_llama(), base_dir, tuned_dir, energy=1.2)
    with pytest.raises(lk.ModelLoadError, match="nothing to extract"):
        extract_into(tiny_llama(), base_dir, base_dir, r=4, progress=False)
    tiny_llama(intermediate_size=40).save_pretrained(tmp_path / "other")
    with pytest.raises(lk.ModelLoadError, match=r"first differing tensor 'model\.layers\.0\.mlp\.down_proj\.weight'"):
        extract_into(tiny_llama(), base_dir, tmp_path / "other", r=4, progress=False)
    with pytest.raises(lk.ModelLoadError, match="no such file or directory"):
        extract(str(base_dir), str(tmp_path / "missing"), tmp_path / "out", r=4, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_extract(llama_pair, tmp_path, capsys):
    from lorakit.cli.main import main

    base_dir, tuned_dir, _ = llama_pair
    assert main(["extract", "--base", str(base_dir), "--tuned", str(tuned_dir), "--energy", "0.5",
                 "--out", str(tmp_path / "a")]) == 0
    assert "relative Frobenius error" in capsys.readouterr().out
    cfg, _, _ = lk.read_adapter(tmp_path / "a")
    assert cfg.r < 16
    with pytest.raises(SystemExit):
        main(["extract", "--base", str(base_dir), "--tuned", str(tuned_dir), "--out", str(tmp_path / "b")])
    assert main(["extract", "--base", str(base_dir), "--tuned", str(tmp_path / "nope"), "--r", "2",
                 "--out", str(tmp_path / "b")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
