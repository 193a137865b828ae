"""lorakit.merge: W ← W + scaling·B·A (fp32), unmerge, merge_and_unload.

References: the unmerged model's own output, a hand-computed scaling·B·A, PEFT's
merge_and_unload on the same adapter, and transformers' save_pretrained/from_pretrained.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from builders import tiny_gpt2, tiny_llama, tiny_qwen2

import lorakit as lk

ATOL = 1e-5



def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor, under the plain model's names."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k or ".modules_to_save." in k:
            continue
        out[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = v.detach().clone()
    return out


CASES = {
    "llama-all-linear-embed": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj", "embed_tokens"])),
    "qwen2-patterns-rslora": (tiny_qwen2, dict(target_modules="all-linear", r=4, lora_alpha=16, use_rslora=True,
                                               rank_pattern={"o_proj": 2})),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules="all-linear", r=4, lora_alpha=8)),
}


def adapted(case, **extra):
    make, kw = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: fan_in_fan_out is set with a warning
        return make(), lk.inject(make(), lk.LoraConfig(init_lora_weights=False, **kw, **extra))


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_round_trip_restores_weights(case):
    _, model = adapted(case)
    before = base_weights(model)
    lk.merge(model)
    assert lk.merged_adapters(model) == ["default"]
    changed = [k for k, v in base_weights(model).items() if not torch.equal(v, before[k])]
    assert changed  # merging did change base weights
    lk.unmerge(model)
    assert lk.merged_adapters(model) == []
    for k, v in base_weights(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0, msg=k)
    lk.unmerge(model)  # idempotent: nothing left to subtract
    for k, v in base_weights(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_is_idempotent(case):
    _, model = adapted(case)
    lk.merge(model)
    once = base_weights(model)
    lk.merge(model)
    lk.merge(model, "default")
    for k, v in base_weights(model).items():
        assert torch.equal(v, once[k]), k
    assert lk.merged_adapters(model) == ["default"]


@pytest.mark.parametrize("case", list(CASES))
def test_merged_output_equals_unmerged_output(case, ids):
    base, model = adapted(case)
    unmerged = logits(model, ids)
    assert (unmerged - logits(base, ids)).abs().max() > 1e-3
    lk.merge(model)
    # still active and merged: the delta is in the weight once, and not added again in forward
    assert lk.active_adapters(model) == ["default"]
    torch.testing.assert_close(logits(model, ids), unmerged, atol=ATOL, rtol=0)
    model.train()
    model.eval()  # neither merges nor unmerges
    assert lk.merged_adapters(model) == ["default"]
    lk.unmerge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=ATOL, rtol=0)


def test_merged_weight_is_hand_computed_delta():
    """Linear: W + (alpha/r)·B·A; Conv1D (stored (in, out)): W + ((alpha/r)·B·A)ᵀ; embedding: W + ((alpha/r)·B·A)ᵀ."""
    checks = [(tiny_llama, ["q_proj", "embed_tokens"], "model.layers.1.self_attn.q_proj", False),
              (tiny_llama, ["q_proj", "embed_tokens"], "model.embed_tokens", True),
              (tiny_gpt2, ["c_attn"], "transformer.h.0.attn.c_attn", True)]
    for make, targets, path, transposed in checks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lk.inject(make(), lk.LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False))
        layer = model.get_submodule(path)
        w0 = layer.base_layer.weight.detach().clone()
        if isinstance(layer, lk.LoraEmbedding):
            a, b = layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
        else:
            a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        delta = 6 / 4 * (b @ a)
        lk.merge(model)
        torch.testing.assert_close(layer.base_layer.weight, w0 + (delta.T if transposed else delta), atol=1e-6, rtol=0)


def test_merge_only_some_adapters_does_not_double_count(ids):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["v_proj", "o_proj"], init_lora_weights=False), "b")
    lk.set_active(model, ["a", "b"])
    both = logits(model, ids)
    lk.merge(model, ["a"])
    assert lk.merged_adapters(model) == ["a"]
    torch.testing.assert_close(logits(model, ids), both, atol=ATOL, rtol=0)
    lk.merge(model, ["b"])
    torch.testing.assert_close(logits(model, ids), both, atol=ATOL, rtol=0)
    lk.unmerge(model)
    torch.testing.assert_close(logits(model, ids), both, atol=ATOL, rtol=0)


def test_merge_inactive_adapter_applies_it(ids):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "a")
    with_a = logits(model, ids)
    lk.set_active(model, [])
    assert (logits(model, ids) - with_a).abs().max() > 1e-3
    lk.merge(model, "a")  # merged weights act whether or not the adapter is active
    torch.testing.assert_close(logits(model, ids), with_a, atol=ATOL, rtol=0)


def test_merge_unknown_adapter_errors_and_merges_nothing():
    _, model = adapted("llama-all-linear-embed")
    before = base_weights(model)
    with pytest.raises(lk.AdapterError, match="nope"):
        lk.merge(model, ["default", "nope"])
    assert lk.merged_adapters(model) == []
    assert all(torch.equal(v, before[k]) for k, v in base_weights(model).items())


def test_merge_then_delete_errors_until_unmerged():
    _, model = adapted("gpt2-conv1d")
    lk.merge(model)
    merged = base_weights(model)
    with pytest.raises(lk.AdapterError, match="merged"):
        lk.delete_adapter(model, "default")
    assert lk.list_adapters(model) == ["default"]
    assert lk.merged_adapters(model) == ["default"]
    assert all(torch.equal(v, merged[k]) for k, v in base_weights(model).items())
    lk.unmerge(model)
    lk.delete_adapter(model, "default")
    assert lk.list_adapters(model) == []


def test_bf16_base_merges_delta_computed_in_fp32():
    model = tiny_llama().to(torch.bfloat16)
    lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lk.LoraLinear)}
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    assert all(w.dtype == torch.bfloat16 for w in w0.values())
    lk.merge(model)
    differs_from_bf16_math = False
    for n, m in layers.items():
        a, b = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
        assert a.dtype == torch.float32
        delta = 16 / 8 * (b.float() @ a.float())
        expected = (w0[n].float() + delta).to(torch.bfloat16)
        assert m.base_layer.weight.dtype == torch.bfloat16
        assert torch.equal(m.base_layer.weight, expected), n
        naive = w0[n] + (16 / 8 * (b.bfloat16() @ a.bfloat16()))  # the delta rounded to bf16 first
        differs_from_bf16_math |= not torch.equal(naive, expected)
    assert differs_from_bf16_math  # the reference really tells the two computations apart


@pytest.mark.parametrize("case", ["llama-all-linear-embed", "gpt2-conv1d"])
def test_merge_and_unload_gives_plain_model(case, ids, tmp_path):
    base, model = adapted(case)
    expected = logits(model, ids)
    plain = lk.merge_and_unload(model)
    assert plain is model
    assert not any(isinstance(m, lk.LoraLinear | lk.LoraEmbedding | lk.ModulesToSave) for m in plain.modules())
    assert plain.state_dict().keys() == base.state_dict().keys()
    assert {n: type(m) for n, m in plain.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    torch.testing.assert_close(logits(plain, ids), expected, atol=ATOL, rtol=0)
    assert not hasattr(plain, "lorakit_active")

    from transformers import AutoModelForCausalLM

    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=ATOL, rtol=0)


def _perturb_copies(model):
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=gen))


def test_merge_and_unload_keeps_active_modules_to_save_copy(ids):
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                                   init_lora_weights=False))
    _perturb_copies(model)
    copy_weight = model.lm_head.modules_to_save["default"].weight.detach().clone()
    expected = logits(model, ids)
    plain = lk.merge_and_unload(model)
    assert isinstance(plain.lm_head, torch.nn.Linear)
    assert torch.equal(plain.lm_head.weight, copy_weight)
    torch.testing.assert_close(logits(plain, ids), expected, atol=ATOL, rtol=0)


def test_merge_and_unload_matches_peft(ids, tmp_path):
    """The same adapter merged by PEFT and by lorakit gives the same plain weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
            r=4, lora_alpha=12, target_modules="all-linear", rank_pattern={"v_proj": 2}, init_lora_weights=False))
        theirs.save_pretrained(tmp_path)
        theirs_plain = theirs.merge_and_unload()
    ours_plain = lk.merge_and_unload(lk.load_adapter(tiny_llama(), tmp_path))
    ref = theirs_plain.state_dict()
    assert ours_plain.state_dict().keys() == ref.keys()
    for k, v in ours_plain.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(logits(ours_plain, ids), logits(theirs_plain, ids), atol=ATOL, rtol=0)


def test_merge_and_unload_names_only_merges_those(ids):
    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "a")
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "b")
    lk.set_active(model, ["a"])
    expected = logits(model, ids)
    plain = lk.merge_and_unload(copy.deepcopy(model), names=["a"])
    torch.testing.assert_close(logits(plain, ids), expected, atol=ATOL, rtol=0)


def test_merge_tied_embedding_keeps_output_or_refuses(ids):
    """Qwen2 ties lm_head to embed_tokens. Merging an embed_tokens adapter into the shared weight would
    also change lm_head; merge must either keep the output or refuse with a lorakit error, unchanged."""
    model = lk.inject(tiny_qwen2(), lk.LoraConfig(target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = logits(model, ids)
    before = base_weights(model)
    try:
        lk.merge(model)
    except lk.LorakitError:
        assert lk.merged_adapters(model) == []
        assert all(torch.equal(v, before[k]) for k, v in base_weights(model).items())
    else:
        torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
