"""LoRA's matmuls in a bf16 base's dtype (set_compute_dtype; the recipe's lora_compute)."""

import peft
import pytest
import torch
import torch.nn.functional as F
from builders import tiny_llama
from torch import nn

import lorakit as lk
from lorakit.errors import AdapterError, ConfigError, TrainingError
from lorakit.lora.layer import set_compute_dtype
from lorakit.train.recipe import TrainConfig
from lorakit.train.setup import set_lora_compute

BF16 = torch.bfloat16


def _layer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12)).to(BF16)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    return model[0]


def test_the_layer_computes_the_plain_bf16_expression_and_fp32_gradients():
    layer = _layer()
    set_compute_dtype(layer, BF16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x = torch.randn(3, 5, 16, dtype=BF16, requires_grad=True)
    rx = x.detach().clone().requires_grad_()
    out = layer(x)
    ref = layer.base_layer(rx) + F.linear(F.linear(rx, ra.to(BF16)) * 2.0, rb.to(BF16))  # scaling = 8 / 4
    assert out.dtype == BF16 and torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    for ours, theirs in ((a.grad, ra.grad), (b.grad, rb.grad), (x.grad, rx.grad)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_default_upcasts_and_differs_from_bf16():
    """Without set_compute_dtype the activations are upcast to fp32 (the old path, unchanged)."""
    layer = _layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 16, dtype=BF16)
    with torch.no_grad():
        lora32 = F.linear(F.linear(x.float(), a) * 2.0, b)
        assert torch.equal(layer(x), layer.base_layer(x) + lora32.to(BF16))
        set_compute_dtype(layer, BF16)
        half = layer(x)
        set_compute_dtype(layer, None)
        assert torch.equal(layer(x), layer.base_layer(x) + lora32.to(BF16))
    assert not torch.equal(half, layer.base_layer(x) + lora32.to(BF16))


def _grads(model, ids, autocast=False):
    with torch.autocast("cpu", BF16, enabled=autocast):
        model(input_ids=ids, labels=ids).loss.backward()
    return {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_a_bf16_model_gets_the_gradients_of_peft_under_autocast(ids):
    """PEFT under torch.autocast(bf16) (what TRL's bf16=True runs) computes LoRA in bf16: our bf16 compute
    matches its gradients three times closer than our fp32 compute does."""
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}
    ours = [lk.inject(tiny_llama().to(BF16), lk.LoraConfig(**cfg)) for _ in range(2)]
    ours[1].load_state_dict(ours[0].state_dict())
    assert set_compute_dtype(ours[0], BF16) == 7 * len(ours[0].model.layers)
    theirs = peft.get_peft_model(tiny_llama().to(BF16), peft.LoraConfig(**cfg))
    mine = ours[0].state_dict()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(mine[n.removeprefix("base_model.model.")])
    reference = _grads(theirs, ids, autocast=True)
    half, full = _grads(ours[0], ids), _grads(ours[1], ids)

    def worst(g):
        return max(((g[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference)

    assert half.keys() == reference.keys()
    assert worst(half) < 0.03 and worst(half) < worst(full) / 2


def test_dora_and_fp32_inputs_keep_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12)).to(BF16)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False))
    x = torch.randn(2, 16, dtype=BF16)
    with torch.no_grad():
        before = model(x)
        set_compute_dtype(model, BF16)
        assert torch.equal(model(x), before)
    layer = _layer()
    set_compute_dtype(layer, BF16)
    x = torch.randn(2, 16)
    layer.base_layer.float()
    with torch.no_grad():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.equal(layer(x), layer.base_layer(x) + F.linear(F.linear(x, a) * 2.0, b))


def test_the_recipe_sets_bf16_on_a_bf16_base_only():
    model = lk.inject(tiny_llama().to(BF16), lk.LoraConfig(r=4, target_modules="all-linear"))
    layers = [m for m in model.modules() if isinstance(m, lk.LoraLinear)]
    set_lora_compute(model, TrainConfig(), "bfloat16")
    assert {m.compute_dtype for m in layers} == {BF16}
    set_lora_compute(model, TrainConfig(lora_compute="fp32"), "bfloat16")
    assert {m.compute_dtype for m in layers} == {None}
    set_lora_compute(model, TrainConfig(lora_compute="bf16"), torch.bfloat16)
    assert {m.compute_dtype for m in layers} == {BF16}
    set_lora_compute(model, TrainConfig(), "float32")
    assert {m.compute_dtype for m in layers} == {None}
    with pytest.raises(TrainingError, match="the base is float16"):
        set_lora_compute(model, TrainConfig(lora_compute="bfloat16"), "float16")
    with pytest.raises(ConfigError, match="lora_compute float16 is not supported"):
        TrainConfig(lora_compute="fp16")
    with pytest.raises(ConfigError, match="lora_compute"):
        TrainConfig(lora_compute="int8")
    with pytest.raises(AdapterError, match="not supported"):
        set_compute_dtype(model, torch.float16)
