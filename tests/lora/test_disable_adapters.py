"""lk.disable_adapters: inside the block every wrapper computes its base alone (equal to the model before
LoRA was injected), the active set comes back on exit and on an exception, merged adapters are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import tiny_llama

import lorakit as lk
from lorakit.errors import AdapterError

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))


def adapted(**cfg):
    """(model with a non-zero adapter "a" of LoraConfig(**cfg), a copy of the model before injection)."""
    model = tiny_llama()
    base = copy.deepcopy(model)
    torch.manual_seed(1)
    lk.inject(model, lk.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                      "init_lora_weights": False, **cfg}), "a")
    return model, base


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("cfg", [
    {},
    {"use_dora": True},
    {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
    {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 7]},
], ids=["lora", "dora", "embedding", "modules_to_save", "trainable_tokens"])
def test_inside_the_block_the_model_equals_the_base_without_lora(cfg):
    model, base = adapted(**cfg)
    if "modules_to_save" in cfg:  # make the trained copy differ from the original head
        with torch.no_grad():
            model.lm_head.modules_to_save["a"].weight.add_(0.5)
    if "trainable_token_indices" in cfg:
        with torch.no_grad():
            model.model.embed_tokens.trainable_tokens_delta["a"].add_(1.0)
    ids_touch = IDS.clone()
    ids_touch[0, :3] = torch.tensor([1, 5, 7])
    with_lora = logits(model)
    assert (with_lora - logits(base)).abs().max() > 1e-3  # the adapter does change the output
    with lk.disable_adapters(model) as inner:
        assert inner is model and lk.active_adapters(model) == []
        assert (logits(model) - logits(base)).abs().max() <= 1e-6
        with torch.no_grad():
            assert (model(ids_touch).logits - base(ids_touch).logits).abs().max() <= 1e-6
    assert lk.active_adapters(model) == ["a"]
    assert torch.equal(logits(model), with_lora)


def test_a_quantized_base_runs_its_dequantized_weights_alone():
    pytest.importorskip("bitsandbytes")
    from lorakit.lora import quantized

    model = lk.quantize(tiny_llama(), "nf4")
    base = tiny_llama()
    for name, module in model.named_modules():
        if quantized.kind(module):
            base.get_submodule(name).weight.data = quantized.dequantize(module).float()
    torch.manual_seed(1)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert (logits(model) - logits(base)).abs().max() > 1e-3
    with lk.disable_adapters(model):
        assert (logits(model) - logits(base)).abs().max() <= 1e-6


def test_the_active_set_comes_back_after_an_exception_and_the_reference_has_no_graph():
    model, _ = adapted()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "b", activate=False)
    lk.set_active(model, ["a", "b"])
    per_layer = {n: list(m.active) for n, m in model.named_modules() if hasattr(m, "active")}
    with pytest.raises(RuntimeError, match="boom"), lk.disable_adapters(model):
        raise RuntimeError("boom")
    assert lk.active_adapters(model) == ["a", "b"]
    assert {n: list(m.active) for n, m in model.named_modules() if hasattr(m, "active")} == per_layer
    assert model(IDS).logits.requires_grad
    with lk.disable_adapters(model):  # only the frozen base runs: nothing to back-propagate into
        assert not model(IDS).logits.requires_grad


def test_inside_a_mixed_batch_the_block_runs_the_base_and_the_mixed_rows_come_back():
    model, base = adapted()
    with lk.mixed_batch(model, ["a", None]):
        mixed = logits(model)
        with lk.disable_adapters(model):
            assert (logits(model) - logits(base)).abs().max() <= 1e-6
        assert torch.equal(logits(model), mixed)


def test_merged_adapters_are_refused_with_what_to_do():
    model, _ = adapted()
    lk.merge(model)
    with pytest.raises(AdapterError, match=r"merged.*lk\.unmerge\(model\)"), lk.disable_adapters(model):
        pass
    lk.unmerge(model)
    with lk.disable_adapters(model):
        pass
