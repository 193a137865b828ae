"""LoraLinear / LoraEmbedding against hand computations and plain nn modules."""

import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.lora.layer import Adapter, LoraEmbedding, LoraLinear
from lorakit.lora.ops import keep_mask


def _linear_layer(r=3, alpha=6.0, rslora=False, init=False, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(5, 7, bias=bias).to(dtype)
    layer = LoraLinear(base)
    layer.add_adapter("a", Adapter(r, alpha, 0.0, rslora), init=init)
    layer.set_active(["a"])
    return base, layer


def test_forward_matches_closed_form():
    base, layer = _linear_layer(r=3, alpha=6.0)
    x = torch.randn(4, 5)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ A.T @ B.T)  # h = W0x + b + (alpha/r)·B·A·x
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    _, layer = _linear_layer(r=4, alpha=8.0, rslora=True)
    assert layer.adapters["a"].scaling == pytest.approx(8.0 / math.sqrt(4))
    delta = layer.delta_weight("a")
    ref = 4.0 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    torch.testing.assert_close(delta, ref)


def test_default_init_b_zero_gives_identical_output():
    base, layer = _linear_layer(init=True)
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["a"].weight) > 0
    x = torch.randn(3, 5)
    assert torch.equal(layer(x), base(x))


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(4000, 50))
    layer.add_adapter("g", Adapter(4, 4), init="gaussian")
    assert layer.lora_A["g"].weight.std().item() == pytest.approx(1 / 4, rel=0.02)
    assert torch.count_nonzero(layer.lora_B["g"].weight) == 0


def test_only_lora_factors_get_gradients():
    _, layer = _linear_layer()
    layer(torch.randn(2, 5)).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A["a"].weight.grad is not None and layer.lora_B["a"].weight.grad is not None


def test_merge_unmerge_round_trip_and_idempotence():
    base, layer = _linear_layer()
    w0 = base.weight.detach().clone()
    x = torch.randn(3, 5)
    y = layer(x)
    layer.merge(["a"])
    layer.merge(["a"])  # idempotent
    assert layer.merged == ["a"]
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight("a"))
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)  # not added twice
    layer.unmerge()
    layer.unmerge()
    assert layer.merged == []
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


def test_bf16_merge_computes_delta_in_fp32():
    base, layer = _linear_layer(dtype=torch.bfloat16)
    w0 = base.weight.detach().clone()
    layer.merge(["a"])
    expected = (w0.float() + layer.delta_weight("a")).to(torch.bfloat16)
    assert torch.equal(base.weight, expected)
    assert base.weight.dtype == torch.bfloat16


def test_bf16_forward_keeps_dtype_and_adapters_fp32():
    _, layer = _linear_layer(dtype=torch.bfloat16)
    assert layer.lora_A["a"].weight.dtype == torch.float32
    out = layer(torch.randn(2, 5, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_two_active_adapters_add_up():
    base, layer = _linear_layer()
    layer.add_adapter("b", Adapter(2, 2.0), init=False)
    layer.set_active(["a", "b"])
    x = torch.randn(3, 5)
    expected = base(x) + x @ layer.delta_weight("a").T + x @ layer.delta_weight("b").T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_and_only_on_lora_path():
    torch.manual_seed(0)
    base = nn.Linear(64, 8)
    layer = LoraLinear(base)
    layer.add_adapter("a", Adapter(4, 4, dropout=0.5), init=False)
    layer.set_active(["a"])
    x = torch.randn(16, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_weight("a").T, rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)  # the layer draws its keep-mask from the global generator (lorakit.ops)
    mask = keep_mask(x.clone(), 0.5) / 0.5  # a fresh draw from the same seed
    assert 0.3 < (mask > 0).float().mean() < 0.7
    torch.testing.assert_close(y1, base(x) + (x * mask) @ layer.delta_weight("a").T, rtol=1e-5, atol=1e-5)


def test_embedding_matches_peft_formula():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = LoraEmbedding(base)
    layer.add_adapter("e", Adapter(3, 6.0), init=False)
    layer.set_active(["e"])
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    A, B = layer.lora_embedding_A["e"], layer.lora_embedding_B["e"]
    # PEFT: after_A = embedding(ids, A.T); result += after_A @ B.T * scaling
    expected = base(ids) + (A.T[ids] @ B.T) * 2.0
    torch.testing.assert_close(layer(ids), expected)
    layer.merge(["e"])
    torch.testing.assert_close(base(ids), expected, rtol=1e-5, atol=1e-5)


def test_conv1d_fan_in_fan_out_merge():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=7, nx=5)  # weight is (in=5, out=7)
    nn.init.normal_(conv.weight)
    layer = LoraLinear(conv)
    assert (layer.in_features, layer.out_features) == (5, 7)
    layer.add_adapter("c", Adapter(2, 4.0), init=False)
    layer.set_active(["c"])
    x = torch.randn(3, 5)
    y = layer(x)
    torch.testing.assert_close(y, x @ conv.weight + conv.bias + x @ layer.delta_weight("c"), rtol=1e-5, atol=1e-5)
    layer.merge(["c"])
    torch.testing.assert_close(conv(x), y, rtol=1e-5, atol=1e-5)


def test_delete_merged_adapter_refused():
    _, layer = _linear_layer()
    layer.merge(["a"])
    with pytest.raises(lk.AdapterError, match="unmerge"):
        layer.delete_adapter("a")
