"""LoRA on a quantized base: outputs and gradients against bitsandbytes' dequantized weights in a
plain model and against PEFT's bnb LoRA layers, adapter files both ways, merging exact or refused."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from builders import tiny_llama
from torch import nn

import lorakit as lk
from lorakit.lora import quantized, siblings
from lorakit.train.evaluate import loss_sum

bnb = pytest.importorskip("bitsandbytes")
CFG = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def pair(method: str = "nf4", dropout: float = 0.0, seed: int = 1):
    """(quantized model with a random-B adapter, plain model holding bnb's dequantized weights and the same adapter)."""
    model = lk.quantize(tiny_llama(), method)
    ref = tiny_llama()
    for name, module in model.named_modules():
        if quantized.kind(module):
            ref.get_submodule(name).weight.data = quantized.dequantize(module).float()
    cfg = lk.LoraConfig(**CFG, lora_dropout=dropout, init_lora_weights=False)
    torch.manual_seed(seed)
    lk.inject(model, cfg)
    lk.inject(ref, cfg)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" in k}, strict=False)
    return model, ref


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def batch(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_outputs_and_gradients_equal_a_plain_model_with_bnb_dequantized_weights(method):
    model, ref = pair(method)
    tol = 1e-5 if method == "int8" else 0  # LLM.int8() on CPU matmuls the dequantized weight in fp32 too
    ids = batch()["input_ids"]
    a, b = model.train()(ids).logits, ref.train()(ids).logits
    assert (a - b).abs().max() <= tol * b.abs().max()
    a.square().mean().backward()
    b.square().mean().backward()
    ga, gb = grads(model), grads(ref)
    assert ga.keys() == gb.keys() and len(ga) == 28
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-7 if method == "int8" else 0), name


@pytest.mark.parametrize("fast", ["dropout", "checkpointing", "unfused"])
def test_fast_paths_match_the_reference_on_a_quantized_base(fast, monkeypatch):
    """Sibling fusion and one-byte dropout masks (same RNG stream), gradient checkpointing and the fused loss."""
    model, ref = pair("nf4", dropout=0.1 if fast == "dropout" else 0.0)
    if fast == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fast == "unfused":
        monkeypatch.setattr(siblings, "enabled", False)
    losses = []
    for m in (model, ref):
        torch.manual_seed(7)
        loss, n = loss_sum(m.train(), batch())  # the fused linear-cross-entropy path (llama)
        (loss / n).backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    ga, gb = grads(model), grads(ref)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-8), name


def test_training_after_an_evaluation_still_reaches_the_first_layer():
    model, ref = pair("nf4")
    with torch.no_grad():
        model.eval()(batch()["input_ids"])
    for m in (model, ref):
        loss, n = loss_sum(m.train(), batch())
        loss.backward()
    a = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
    assert a is not None and torch.allclose(a, ref.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad,
                                            rtol=1e-4, atol=1e-8)


def peft_bnb_model(tiny_model_dir):
    """What PEFT users have: transformers' 4-bit loader (BitsAndBytesConfig)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32)


def test_adapter_files_both_ways_with_peft_bnb_lora(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 50, (2, 10))
    # train mode (dropout is 0): in eval mode bitsandbytes would repack PEFT's weights for its CPU
    # kernel, which fails for layers narrower than a quantization block (hidden size 32 here)
    # PEFT trains on its bnb layers and saves ...
    theirs = peft.get_peft_model(peft_bnb_model(tiny_model_dir),
                                 peft.LoraConfig(**CFG, init_lora_weights=False))
    assert type(theirs.base_model.model.model.layers[0].mlp.up_proj) is peft.tuners.lora.bnb.Linear4bit
    theirs.save_pretrained(tmp_path / "peft")
    assert "quant" not in (tmp_path / "peft" / "adapter_config.json").read_text()
    # ... lorakit loads it onto its own quantization of the same checkpoint
    ours = lk.quantize(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), "nf4")
    lk.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        want = theirs.train()(ids).logits
        assert torch.allclose(ours.eval()(ids).logits, want, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    # lorakit saves; PEFT loads it back onto transformers' 4-bit model
    lk.save_adapter(ours, tmp_path / "ours")
    assert not {k for k in json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) if "quant" in k}
    back = peft.PeftModel.from_pretrained(peft_bnb_model(tiny_model_dir), tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(back.train()(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_a_transformers_4bit_model_injects_like_lk_quantize(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    theirs = peft_bnb_model(tiny_model_dir)
    ours = lk.quantize(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), "nf4")
    for m in (theirs, ours):
        torch.manual_seed(3)
        lk.inject(m, lk.LoraConfig(**CFG, init_lora_weights=False))
    ids = torch.randint(0, 50, (2, 10))
    assert torch.equal(theirs.train()(ids).logits, ours.train()(ids).logits)


def test_adapter_loads_onto_a_full_precision_base_with_a_small_difference(tmp_path):
    model, _ = pair("nf4")
    lk.save_adapter(model, tmp_path / "a")
    dense = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same fingerprint: a 4-bit base hashes as its dense self
        lk.load_adapter(dense, tmp_path / "a")
    ids = batch()["input_ids"]
    with torch.no_grad():
        a, b = model.eval()(ids).logits, dense.eval()(ids).logits
    assert 0 < (a - b).norm() / b.norm() < 0.1
    card = (tmp_path / "a" / "README.md").read_text()
    assert "## Quantized base (QLoRA)" in card and "nf4 with double-quantized scales" in card
    lk.save_adapter(dense, tmp_path / "b")
    assert "Quantized base" not in (tmp_path / "b" / "README.md").read_text()


def test_merge_keeps_the_packed_weight_and_unmerge_restores_it_bit_for_bit():
    model, _ = pair("nf4")
    layer = model.model.layers[1].mlp.down_proj
    packed, data, absmax = layer.base_layer, layer.base_layer.weight.data.clone(), layer.base_layer.weight.quant_state.absmax.clone()
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model.eval()(ids).logits
        lk.merge(model)
        assert type(layer.base_layer) is quantized.DenseFromQuantized
        assert torch.allclose(model(ids).logits, before, rtol=1e-5, atol=1e-6)
        lk.merge(model)  # idempotent
        lk.unmerge(model)
        assert layer.base_layer is packed and not layer.merged
        assert torch.equal(packed.weight.data, data) and torch.equal(packed.weight.quant_state.absmax, absmax)
        assert torch.equal(model(ids).logits, before)


def test_merge_and_unload_gives_plain_linears_with_dequantized_weight_plus_delta():
    model, _ = pair("nf4")
    layer = model.model.layers[0].self_attn.v_proj
    want = quantized.dequantize(layer.base_layer) + layer.delta_weight("default")
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model.eval()(ids).logits
    with pytest.warns(UserWarning, match="dequantized"):
        plain = lk.merge_and_unload(model)
    v = plain.model.layers[0].self_attn.v_proj
    assert type(v) is nn.Linear and v.weight.dtype == torch.float32 and not hasattr(v, "packed")
    assert torch.allclose(v.weight, want, atol=1e-7)
    assert not any(quantized.kind(m) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, before, rtol=1e-5, atol=1e-6)


def test_requantizing_a_merge_would_lose_most_of_the_delta():
    """Why lorakit never merges back into 4 bits: what survives of ΔW after re-quantizing W + ΔW."""
    model, _ = pair("nf4")
    layer = model.model.layers[0].mlp.gate_proj
    w = quantized.dequantize(layer.base_layer)
    delta = layer.delta_weight("default") * 0.01  # a trained ΔW is small next to W
    q, state = bnb.functional.quantize_4bit(w + delta, quant_type="nf4")
    kept = bnb.functional.dequantize_4bit(q, state) - w
    assert (kept - delta).norm() / delta.norm() > 0.9


def test_deepcopy_of_a_qlora_model_runs():
    model, _ = pair("nf4")
    twin = copy.deepcopy(model)
    ids = batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(twin.eval()(ids).logits, model.eval()(ids).logits)


def test_lorakit_merge_quantize_writes_dequantized_weights_plus_delta(tiny_model_dir, tmp_path, capsys):
    """`lorakit merge --quantize nf4`: the adapter goes into the weights it was trained against."""
    from transformers import AutoModelForCausalLM

    from lorakit.cli.main import main

    model = lk.quantize(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), "nf4")
    torch.manual_seed(4)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lk.save_adapter(model, tmp_path / "a")
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--out",
                 str(tmp_path / "m"), "--quantize", "nf4"]) == 0
    assert "merged into the nf4-dequantized base: its 14 quantized Linear layers" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    q, k = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight,
                          quantized.dequantize(q.base_layer) + q.delta_weight("default"), atol=1e-7)
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, quantized.dequantize(k))  # no adapter there
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model.train()(ids).logits, rtol=1e-5, atol=1e-5)
