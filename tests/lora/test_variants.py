"""DoRA, PiSSA / OLoRA initialisation (and their conversion to plain LoRA), bias = all | lora_only.

References: PEFT's own models and files (both directions, fp32, 1e-5), closed forms (DoRA's row
norm of W + s·BA formed in full, the top-r SVD of W, W's QR), and a plain re-computation.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from builders import tiny_gpt2, tiny_qwen2

import lorakit as lk
from lorakit.errors import AdapterError, ConfigError, TargetError
from lorakit.lora import dora

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj"]
VARIANTS = [dict(use_dora=True), dict(init_lora_weights="pissa"), dict(init_lora_weights="olora"),
            dict(bias="all"), dict(bias="lora_only", use_dora=True), dict(use_dora=True, init_lora_weights="pissa")]


def ids():
    return torch.randint(0, 80, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def perturb(model, seed: int = 1) -> None:
    """Non-trivial adapter weights (and trainable biases), as training would leave them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or (name.endswith("bias") and p.requires_grad):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def lk_model(**kw):
    return lk.inject(tiny_qwen2(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw))


def peft_model(**kw):
    return peft.get_peft_model(tiny_qwen2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw))


@pytest.mark.parametrize("kw", VARIANTS, ids=str)
def test_lorakit_file_loads_in_peft_and_back(kw, tmp_path):
    model = lk_model(**kw)
    assert torch.allclose(logits(model), logits(tiny_qwen2()), atol=ATOL)  # a new adapter changes nothing
    perturb(model)
    ref = logits(model)
    lk.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_qwen2(), tmp_path)
    assert torch.allclose(logits(theirs), ref, atol=ATOL)
    assert torch.allclose(logits(lk.load_adapter(tiny_qwen2(), tmp_path)), ref, atol=ATOL)


@pytest.mark.parametrize("kw", VARIANTS, ids=str)
def test_peft_file_loads_in_lorakit(kw, tmp_path):
    theirs = peft_model(**kw)
    perturb(theirs, seed=2)
    ref = logits(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lk.load_adapter(tiny_qwen2(), tmp_path)
    assert torch.allclose(logits(ours), ref, atol=ATOL)


@pytest.mark.parametrize("kw", VARIANTS, ids=str)
def test_merged_equals_unmerged(kw):
    model = lk_model(**kw)
    perturb(model)
    ref = logits(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    lk.merge(model)
    assert torch.allclose(logits(model), ref, atol=ATOL)
    lk.unmerge(model)
    assert torch.allclose(logits(model), ref, atol=ATOL)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.allclose(p, before[n], atol=1e-6), n


def test_dora_gradients_match_peft():
    """One backward (no dropout): the same gradients for A, B and the magnitude as PEFT's DoRA."""
    ours, theirs = lk_model(use_dora=True), peft_model(use_dora=True)
    perturb(ours)
    perturb(theirs)
    theirs.load_state_dict({**theirs.state_dict(), **{"base_model.model." + k: v for k, v in ours.state_dict().items()
                                                      if ".lora_" in k and "magnitude" not in k}})
    for k, v in ours.state_dict().items():
        if "magnitude" in k:
            theirs.state_dict()[f"base_model.model.{k}.weight"].copy_(v)
    for m in (ours, theirs):
        m.train()
        m(ids(), labels=ids()).loss.backward()
    grads = {n.removeprefix("base_model.model.").removesuffix(".weight") if "magnitude" in n
             else n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert set(got) == set(grads) and any("magnitude" in n for n in got)
    for n, g in got.items():
        assert torch.allclose(g, grads[n], atol=1e-6, rtol=1e-4), n


def test_dora_norm_is_the_row_norm_of_the_full_weight():
    model = lk_model(use_dora=True)
    perturb(model)
    layer = model.model.layers[0].self_attn.q_proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.adapters["default"].scaling
    full = layer.base_layer.weight + s * b @ a  # (out, in), formed in full only here
    assert torch.allclose(dora.weight_norm(layer, "default"), full.norm(dim=1), rtol=1e-6, atol=1e-6)
    x = torch.randn(3, layer.in_features)
    m = layer.lora_magnitude_vector["default"]
    want = x @ (m[:, None] * full / full.norm(dim=1, keepdim=True)).T + layer.base_layer.bias
    assert torch.allclose(layer(x), want, atol=ATOL)


def test_dora_magnitude_starts_at_the_weight_norm_and_is_trained():
    model = lk_model(use_dora=True)
    layer = model.model.layers[1].mlp.up_proj
    assert torch.allclose(layer.lora_magnitude_vector["default"], layer.base_layer.weight.norm(dim=1), atol=1e-6)
    assert layer.lora_magnitude_vector["default"].requires_grad
    report = lk.trainable_report(model)
    plain = lk.trainable_report(lk_model())
    assert report.trainable - plain.trainable == sum(m.out_features for _, m in lk.lora.adapters.lora_layers(model))


def test_dora_on_conv1d_matches_peft(tmp_path):
    model = lk.inject(tiny_gpt2(), lk.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], use_dora=True))
    perturb(model)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        ref = model(x).logits
    lk.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(theirs(x).logits, ref, atol=ATOL)
    lk.merge(model)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref, atol=ATOL)


def untied(seed: int = 0):
    return tiny_qwen2(seed, tie_word_embeddings=False)  # merging into a tied embedding would change the head


EMBED = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True)


def test_dora_on_embeddings_goes_both_ways_with_peft(tmp_path):
    ours = lk.inject(untied(), lk.LoraConfig(**EMBED))
    emb = ours.model.embed_tokens
    assert emb.lora_magnitude_vector["default"].shape == (32,)  # one per embedding dimension, as PEFT
    assert torch.allclose(logits(ours), logits(untied()), atol=ATOL)  # a new adapter changes nothing
    perturb(ours)
    ref = logits(ours)
    lk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(untied(), tmp_path / "ours")
    assert torch.allclose(logits(theirs), ref, atol=ATOL)
    assert torch.allclose(logits(lk.load_adapter(untied(), tmp_path / "ours")), ref, atol=ATOL)

    theirs = peft.get_peft_model(untied(), peft.LoraConfig(**EMBED))
    perturb(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    assert torch.allclose(logits(lk.load_adapter(untied(), tmp_path / "theirs")), logits(theirs), atol=ATOL)


def test_dora_on_embeddings_is_the_closed_form_and_merges_exactly():
    model = lk.inject(untied(), lk.LoraConfig(**EMBED))
    perturb(model)
    emb = model.model.embed_tokens
    a, b, s = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"], emb.adapters["default"].scaling
    full = emb.base_layer.weight + s * (b @ a).T  # (vocabulary, dim), formed in full only here
    m = emb.lora_magnitude_vector["default"]
    assert torch.allclose(dora.weight_norm(emb, "default"), full.norm(dim=0), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(emb(ids()), (m * full / full.norm(dim=0))[ids()], atol=ATOL)
    ref, before = logits(model), emb.base_layer.weight.detach().clone()
    lk.merge(model)
    assert torch.allclose(emb.base_layer.weight, m * full / full.norm(dim=0), atol=ATOL)
    assert torch.allclose(logits(model), ref, atol=ATOL)
    lk.unmerge(model)
    assert torch.allclose(emb.base_layer.weight, before, atol=1e-6) and torch.allclose(logits(model), ref, atol=ATOL)


def test_dora_on_embeddings_gradients_match_peft():
    ours, theirs = lk.inject(untied(), lk.LoraConfig(**EMBED)), peft.get_peft_model(untied(), peft.LoraConfig(**EMBED))
    perturb(ours)
    mine = ours.state_dict()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(mine[n.removeprefix("base_model.model.").removesuffix(".weight") if "magnitude" in n
                             else n.removeprefix("base_model.model.")])
    for m in (ours, theirs):
        m.train()
        m(ids(), labels=ids()).loss.backward()
    got = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    want = {n.removeprefix("base_model.model.").removesuffix(".weight") if "magnitude" in n
            else n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and "model.embed_tokens.lora_magnitude_vector.default" in got
    for n, g in got.items():
        assert torch.allclose(g, want[n], atol=1e-6, rtol=1e-4), n


def test_pissa_factors_are_the_top_singular_part():
    base = tiny_qwen2()
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = lk.inject(base, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    layer = model.model.layers[0].self_attn.q_proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.adapters["default"].scaling
    u, sv, vh = torch.linalg.svd(w)
    top = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]
    assert torch.allclose(s * b @ a, top, atol=1e-5)
    assert torch.allclose(layer.base_layer.weight, w - top, atol=1e-5)  # the residual base


def test_pissa_niter_is_close_to_the_exact_svd():
    base = tiny_qwen2()
    proj = base.model.layers[0].mlp.up_proj
    u, _, vh = torch.linalg.svd(torch.randn(proj.weight.shape), full_matrices=False)
    spectrum = torch.tensor([10.0, 6.0] + [0.1] * (len(vh) - 2))  # a clear top-2 part, as trained weights have
    with torch.no_grad():
        proj.weight.copy_(u @ torch.diag(spectrum) @ vh)
    w = proj.weight.detach().clone()
    torch.manual_seed(0)
    model = lk.inject(base, lk.LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights="pissa_niter_8"))
    layer = model.model.layers[0].mlp.up_proj
    u, sv, vh = torch.linalg.svd(w)
    got = layer.adapters["default"].scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(got, u[:, :2] @ torch.diag(sv[:2]) @ vh[:2], atol=1e-3)


def test_olora_factors_are_the_qr_of_w():
    base = tiny_qwen2()
    w = base.model.layers[0].self_attn.o_proj.weight.detach().clone()
    model = lk.inject(base, lk.LoraConfig(r=4, lora_alpha=4, target_modules=["o_proj"], init_lora_weights="olora"))
    layer = model.model.layers[0].self_attn.o_proj
    b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    assert torch.allclose(b.T @ b, torch.eye(4), atol=1e-5)  # orthonormal columns
    assert torch.allclose(torch.tril(a[:, :4], diagonal=-1), torch.zeros(4, 4), atol=1e-6)  # upper triangular
    q, r = torch.linalg.qr(w)
    assert torch.allclose(b @ a, q[:, :4] @ r[:4], atol=1e-5)
    assert torch.allclose(layer.base_layer.weight, w - b @ a, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_converted_adapter_is_a_plain_lora_on_the_original_base(init, rslora, tmp_path):
    model = lk_model(init_lora_weights=init, use_rslora=rslora)
    perturb(model)
    ref = logits(model)
    lk.save_adapter(model, tmp_path, convert_to_lora=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    assert cfg["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    theirs = peft.PeftModel.from_pretrained(tiny_qwen2(), tmp_path)  # the original base, no decomposition
    assert torch.allclose(logits(theirs), ref, atol=ATOL)
    ours = lk.load_adapter(tiny_qwen2(), tmp_path)
    assert torch.allclose(logits(ours), ref, atol=ATOL)
    assert not any(layer.initial_factors for _, layer in lk.lora.adapters.lora_layers(ours))


def test_convert_refuses_a_plain_adapter(tmp_path):
    with pytest.raises(AdapterError, match="plain LoRA already"):
        lk.save_adapter(lk_model(), tmp_path, convert_to_lora=True)


def test_bias_all_trains_and_saves_every_bias(tmp_path):
    model = lk_model(bias="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith("bias")} and trainable
    lk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model." + n for n in trainable} <= keys


def test_bias_lora_only_trains_the_adapted_modules_biases():
    model = lk_model(bias="lora_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable == {f"model.layers.{i}.self_attn.{p}.base_layer.bias" for i in range(3) for p in ("q_proj", "v_proj")}


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="bias"):
        lk.LoraConfig(bias="some")
    with pytest.raises(ConfigError, match="init_lora_weights"):
        lk.LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(TargetError, match="Linear layers only.*embed_tokens"):
        lk.inject(tiny_qwen2(), lk.LoraConfig(target_modules=["embed_tokens", "q_proj"], init_lora_weights="olora"))


def test_mixed_batches_refuse_dora_and_moved_bases():
    for kw, match in ((dict(use_dora=True), "DoRA"), (dict(init_lora_weights="pissa"), "convert_to_lora")):
        model = lk_model(**kw).eval()
        with pytest.raises(AdapterError, match=match), lk.mixed_batch(model, ["default", None]):
            pass


def test_an_unconverted_pissa_adapter_says_it_needs_the_residual_base(tmp_path):
    model = lk_model(init_lora_weights="pissa", use_dora=True)
    lk.save_adapter(model, tmp_path / "raw")
    lk.save_adapter(model, tmp_path / "plain", convert_to_lora=True)
    raw = (tmp_path / "raw" / "README.md").read_text()
    assert "needs the modified (residual) base" in raw and "use_dora: true" in raw
    assert json.loads((tmp_path / "raw" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    assert "residual" not in (tmp_path / "plain" / "README.md").read_text()
