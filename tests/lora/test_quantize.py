"""lorakit.quantize: which layers become bitsandbytes layers, and the bits match transformers' loader."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from builders import tiny_gpt2, tiny_llama
from torch import nn

import lorakit as lk
from lorakit.lora import quantized

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_every_linear_but_the_head_is_quantized_and_the_rest_keeps_its_dtype(method):
    model = tiny_llama()
    dense = {n: type(m) for n, m in model.named_modules()}
    lk.quantize(model, method)
    want = bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit
    for name, module in model.named_modules():
        if dense[name] is nn.Linear and name != "lm_head":
            assert type(module) is want, name
            assert not any(p.requires_grad for p in module.parameters())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is nn.Embedding
    assert model.model.norm.weight.dtype == torch.float32
    assert quantized.describe(model) == {"method": method, "double_quant": method != "int8",
                                         "compute_dtype": "float32", "layers": 14}


@pytest.mark.parametrize(("method", "double"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_bits_equal_transformers_bitsandbytes_loader(tiny_model_dir, method, double):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=double,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config, device_map="cpu",
                                                  dtype=torch.float32)
    ours = lk.quantize(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), method, double)
    assert quantized.describe(ours) == quantized.describe(theirs)
    for name, module in ours.named_modules():
        if quantized.kind(module):
            other = theirs.get_submodule(name)
            assert torch.equal(module.weight.data, other.weight.data), name
            assert torch.equal(quantized.dequantize(module), quantized.dequantize(other)), name


def test_quantization_is_deterministic():
    a, b = lk.quantize(tiny_llama(), "nf4"), lk.quantize(tiny_llama(), "nf4")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nf4_dequantizes_close_to_the_dense_weight_and_double_quant_changes_only_the_scales():
    dense = tiny_llama()
    single, double = lk.quantize(tiny_llama(), "nf4", False), lk.quantize(tiny_llama(), "nf4", True)
    w = dense.model.layers[0].mlp.up_proj.weight
    w1 = quantized.dequantize(single.model.layers[0].mlp.up_proj)
    w2 = quantized.dequantize(double.model.layers[0].mlp.up_proj)
    assert 0.01 < (w1 - w).norm() / w.norm() < 0.25  # 4-bit codes: close, not equal
    assert torch.equal(single.model.layers[0].mlp.up_proj.weight.data, double.model.layers[0].mlp.up_proj.weight.data)
    assert not torch.equal(w1, w2) and (w1 - w2).norm() / w.norm() < 0.01


def test_compute_dtype_and_a_bf16_model():
    model = lk.quantize(tiny_llama().to(torch.bfloat16), "nf4")
    assert quantized.describe(model)["compute_dtype"] == "bfloat16"
    assert quantized.dequantize(model.model.layers[0].self_attn.q_proj).dtype == torch.bfloat16
    forced = lk.quantize(tiny_llama(), "nf4", compute_dtype="bfloat16")
    assert forced.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16


def test_gpt2_conv1d_layers_are_quantized_transposed():
    dense, model = tiny_gpt2(), lk.quantize(tiny_gpt2(), "nf4")
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, bnb.nn.Linear4bit) and (layer.out_features, layer.in_features) == (96, 32)
    ref = dense.transformer.h[0].attn.c_attn.weight.T  # Conv1D stores (in, out)
    assert (quantized.dequantize(layer) - ref).norm() / ref.norm() < 0.25
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert (model(ids).logits - dense(ids).logits).abs().max() < 0.5


def test_errors_name_the_fix(monkeypatch):
    with pytest.raises(lk.ConfigError, match="nf4, fp4, int8"):
        lk.quantize(tiny_llama(), "int4")
    injected = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lk.ConfigError, match="quantize the base model first, then inject"):
        lk.quantize(injected, "nf4")
    with pytest.raises(lk.ConfigError, match="compute_dtype"):
        lk.quantize(tiny_llama(), "nf4", compute_dtype="int8")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(lk.ConfigError, match=r"pip install 'lorakit\[qlora\]'"):
        lk.quantize(tiny_llama(), "nf4")


def test_import_lorakit_does_not_import_bitsandbytes():
    code = "import sys, lorakit; assert 'bitsandbytes' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_forward_does_not_repack_the_weight_so_training_still_gets_gradients():
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first no-grad eval
    forward, and that kernel has no backward; lorakit keeps the canonical layout."""
    model = lk.quantize(tiny_llama(), "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.data.clone()
    with torch.no_grad():
        model.eval()(torch.randint(0, 96, (1, 5)))
    assert torch.equal(layer.weight.data, before)
    x = torch.randn(3, 32, requires_grad=True)
    layer.train()(x).sum().backward()
    assert torch.allclose(x.grad, quantized.dequantize(layer).sum(0).expand(3, -1), atol=1e-5)
