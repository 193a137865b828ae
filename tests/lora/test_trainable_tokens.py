"""trainable_token_indices: PEFT's file format both ways (equal outputs, equal keys, equal counts), only the
chosen rows train, and a head tied to the embedding reads the same rows in training and after merging."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from builders import tiny_llama, tiny_qwen2
from safetensors import safe_open

import lorakit as lk
from lorakit.errors import ConfigError, TargetError
from lorakit.models.custom import load_custom
from lorakit.plan.count import count_model

peft = pytest.importorskip("peft")
IDS = [3, 5, 7, 60]
COSY = f"{Path(__file__).resolve().parents[2]}/examples/cosyvoice_lm.py"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def file_keys(folder: Path) -> dict[str, tuple]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def trained_rows(model, scale=0.5, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["untied", "tied"])
def test_peft_reads_ours_and_we_read_peft(build, ids, tmp_path):
    cfg = dict(r=2, target_modules=["q_proj"], trainable_token_indices=IDS, init_lora_weights=False)
    ours = lk.inject(build(), lk.LoraConfig(**cfg))
    trained_rows(ours)
    lk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-5, rtol=0)
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in file_keys(tmp_path / "ours")

    torch.manual_seed(1)
    made = peft.get_peft_model(build(), peft.LoraConfig(**cfg))
    trained_rows(made, seed=4)
    made.save_pretrained(tmp_path / "theirs")
    assert file_keys(tmp_path / "theirs") == file_keys(tmp_path / "ours")
    loaded = lk.load_adapter(build(), tmp_path / "theirs", is_trainable=True)
    torch.testing.assert_close(logits(loaded, ids), logits(made, ids), atol=1e-5, rtol=0)
    assert lk.trainable_report(loaded).trainable == made.get_nb_trainable_parameters()[0]
    report = count_model(build(), lk.LoraConfig(**cfg))
    assert report.trainable == made.get_nb_trainable_parameters()[0]
    assert report.saved == file_keys(tmp_path / "theirs")


def test_only_the_chosen_rows_train(ids):
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=IDS))
    emb = model.model.embed_tokens
    base = tiny_llama().model.embed_tokens
    torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids))  # starts at the rows' own values
    trained_rows(model)
    others = torch.tensor([0, 1, 2, 4, 9])
    torch.testing.assert_close(emb(others), base(others))
    torch.testing.assert_close(emb(torch.tensor(IDS)), emb.trainable_tokens_delta["default"])
    model.train()
    model(input_ids=torch.tensor([IDS + [1, 2]])).logits.sum().backward()
    assert emb.trainable_tokens_delta["default"].grad.abs().sum() > 0
    assert emb.base_layer.weight.grad is None and not emb.base_layer.weight.requires_grad


def test_a_tied_head_reads_the_same_rows_in_training_and_after_merging(ids):
    model = lk.inject(tiny_qwen2(), lk.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=IDS))
    trained_rows(model)
    assert model.lm_head.source is model.model.embed_tokens
    want = logits(model, ids)
    reference = tiny_qwen2()  # by hand: both sides of the tie read the new rows
    with torch.no_grad():
        reference.model.embed_tokens.weight[IDS] = model.model.embed_tokens.trainable_tokens_delta["default"]
    lk.set_active(model, [])
    assert not torch.allclose(logits(model, ids), want)
    lk.set_active(model, ["default"])
    q = lk.merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(logits(q, ids), want, atol=1e-5, rtol=0)
    assert q.lm_head.weight is q.model.embed_tokens.weight
    lk.merge(model)
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=0)
    lk.unmerge(model)
    torch.testing.assert_close(model.model.embed_tokens.base_layer.weight, tiny_qwen2().model.embed_tokens.weight)
    reference.model.layers[0].self_attn.q_proj = model.model.layers[0].self_attn.q_proj
    reference.model.layers[1].self_attn.q_proj = model.model.layers[1].self_attn.q_proj
    reference.model.layers[2].self_attn.q_proj = model.model.layers[2].self_attn.q_proj
    torch.testing.assert_close(logits(reference, ids), want, atol=1e-5, rtol=0)


def test_new_speech_rows_in_a_custom_model_export_natively(tmp_path):
    from lorakit.export.native import export_native

    model, _ = load_custom(f"{COSY}:build_tiny")
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": [1, 2]},
                        init_lora_weights=False)
    lk.inject(model, cfg)
    trained_rows(model)
    adapter = lk.save_adapter(model, tmp_path / "adapter")
    out = export_native(adapter, f"{COSY}:build_tiny", tmp_path / "m.safetensors")
    assert out["tied"] == [["llm.model.lm_head.weight", "llm.model.model.embed_tokens.weight"]]
    theirs = peft.PeftModel.from_pretrained(load_custom(f"{COSY}:build_tiny")[0], adapter)
    import sys

    inputs = sys.modules[type(model).__module__].example_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs), model(**inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", [[], [-1], [1.5], {"embed_tokens": []}, "3", {"": [1]}])
def test_bad_indices_are_config_errors(value):
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        lk.LoraConfig(trainable_token_indices=value)


def test_bad_targets_are_named():
    with pytest.raises(TargetError, match=r"distinct integers in \[0, 96\)"):
        lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 500]))
    with pytest.raises(TargetError, match="matches no module"):
        lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"wte": [1]}))
    for cfg in (dict(target_modules=["q_proj", "embed_tokens"]), dict(target_modules=["q_proj"],
                                                                      modules_to_save=["embed_tokens"])):
        model = tiny_llama()
        with pytest.raises(TargetError, match="not both"):
            lk.inject(model, lk.LoraConfig(trainable_token_indices=[1], **cfg))
        assert lk.list_adapters(model) == []  # nothing half-applied


def test_lora_on_a_tied_table_warns_and_merge_refuses_saying_what_to_do(ids):
    with pytest.warns(UserWarning, match="tied to lm_head.weight.*trainable_token_indices"):
        model = lk.inject(tiny_qwen2(), lk.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    with pytest.raises(lk.AdapterError, match="shared with lm_head.weight.*Untie"):
        lk.merge(model)


def test_mixed_batches_refuse_trainable_tokens(ids):
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1]))
    with pytest.raises(lk.AdapterError, match="trainable_token_indices"):
        with lk.mixed_batch(model, ["default", None]):
            model(input_ids=ids)
