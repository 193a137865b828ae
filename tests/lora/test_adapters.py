"""lorakit.adapters: activate / list / delete, parameter counts, combining adapters.

References: hand-computed LoRA outputs on a single nn.Linear, explicit ΔW = scaling·B·A sums,
torch.linalg.svd of the summed ΔW, and PEFT's own counts and add_weighted_adapter.
"""

from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
from builders import tiny_gpt2, tiny_llama, tiny_qwen2
from torch import nn

import lorakit as lk

ATOL = 1e-5



class One(nn.Module):
    """A model that is a single Linear, so adapter outputs can be computed by hand."""

    def __init__(self, d_in: int = 16, d_out: int = 12, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def factors(model, name, path="proj"):
    layer = model.get_submodule(path)
    if isinstance(layer, lk.LoraEmbedding):
        return layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach()
    return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()


def two_adapters():
    """One Linear with adapter a (r=2, alpha=3) and b (r=3, alpha=5, rsLoRA), both non-zero."""
    model = One()
    base = (model.proj.weight.detach().clone(), model.proj.bias.detach().clone())
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], init_lora_weights=False), "a")
    lk.inject(model, lk.LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["proj"],
                                   init_lora_weights=False), "b")
    scalings = {"a": 3 / 2, "b": 5 / math.sqrt(3)}
    return model, base, scalings


def hand_output(x, base, model, scalings, names):
    w, b = base
    out = x @ w.T + b
    for n in names:
        a_, b_ = factors(model, n)
        out = out + scalings[n] * (x @ a_.T @ b_.T)
    return out


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))


# ---- activate / list / delete -----------------------------------------------------------------

def test_list_and_set_active_semantics():
    model, base, scalings = two_adapters()
    assert lk.list_adapters(model) == ["a", "b"]
    assert lk.active_adapters(model) == ["b"]  # inject activates the new adapter only, as PEFT does
    with torch.no_grad():
        torch.testing.assert_close(model(X), hand_output(X, base, model, scalings, ["b"]), atol=ATOL, rtol=0)
        lk.set_active(model, "a")
        assert lk.active_adapters(model) == ["a"]
        torch.testing.assert_close(model(X), hand_output(X, base, model, scalings, ["a"]), atol=ATOL, rtol=0)
        lk.set_active(model, [])
        torch.testing.assert_close(model(X), hand_output(X, base, model, scalings, []), atol=ATOL, rtol=0)


def test_two_active_adapters_add_up():
    model, base, scalings = two_adapters()
    lk.set_active(model, ["a", "b"])
    with torch.no_grad():
        out = model(X)
    torch.testing.assert_close(out, hand_output(X, base, model, scalings, ["a", "b"]), atol=ATOL, rtol=0)
    # and the sum really has both terms in it
    assert (out - hand_output(X, base, model, scalings, ["a"])).abs().max() > 1e-3
    assert (out - hand_output(X, base, model, scalings, ["b"])).abs().max() > 1e-3


def test_set_active_unknown_adapter_errors_and_changes_nothing():
    model, _, _ = two_adapters()
    with pytest.raises(lk.AdapterError, match="nope"):
        lk.set_active(model, ["a", "nope"])
    assert lk.active_adapters(model) == ["b"]
    assert model.proj.active == ["b"]


def test_delete_frees_parameters_and_deactivates():
    model = One()
    base_count = param_count(model)
    model, base, scalings = two_adapters()
    assert param_count(model) == base_count + 2 * (16 + 12) + 3 * (16 + 12)
    lk.set_active(model, ["a", "b"])
    lk.delete_adapter(model, "b")
    assert lk.list_adapters(model) == ["a"]
    assert lk.active_adapters(model) == ["a"]
    assert param_count(model) == base_count + 2 * (16 + 12)
    assert not any(".b." in k or k.endswith(".b") for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(X), hand_output(X, base, model, scalings, ["a"]), atol=ATOL, rtol=0)
    lk.delete_adapter(model, "a")
    assert lk.list_adapters(model) == [] and lk.active_adapters(model) == []
    assert param_count(model) == base_count
    with torch.no_grad():
        torch.testing.assert_close(model(X), X @ base[0].T + base[1], atol=ATOL, rtol=0)


def test_delete_on_transformers_model_returns_to_base_count():
    base_count = param_count(tiny_llama())
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]))
    assert param_count(model) > base_count
    lk.delete_adapter(model, "default")
    assert param_count(model) == base_count
    assert lk.list_adapters(model) == []


def test_delete_unknown_or_merged_adapter_errors():
    model, _, _ = two_adapters()
    with pytest.raises(lk.AdapterError, match="nope"):
        lk.delete_adapter(model, "nope")
    lk.merge(model, ["a"])
    weight = model.proj.base_layer.weight.detach().clone()
    with pytest.raises(lk.AdapterError, match="merged"):
        lk.delete_adapter(model, "a")
    assert lk.list_adapters(model) == ["a", "b"]
    assert torch.equal(model.proj.base_layer.weight, weight)
    assert "a" in model.proj.lora_A


# ---- trainable report vs PEFT ------------------------------------------------------------------

REPORT_CASES = {
    "llama-qv": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-head": (tiny_llama, dict(target_modules="all-linear", r=4, modules_to_save=["lm_head"])),
    "qwen2-embed": (tiny_qwen2, dict(target_modules=["embed_tokens", "q_proj", "down_proj"], r=2)),
    "qwen2-patterns": (tiny_qwen2, dict(target_modules="all-linear", r=4, rank_pattern={"o_proj": 1},
                                        layers_to_transform=None)),
    "gpt2-all-linear": (tiny_gpt2, dict(target_modules="all-linear", r=4)),
    "gpt2-c_attn": (tiny_gpt2, dict(target_modules=["c_attn"], r=8)),
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_trainable_report_equals_peft(case, capsys):
    make, kw = REPORT_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
        ours = lk.inject(make(), lk.LoraConfig(**kw))
    report = lk.trainable_report(ours)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
    capsys.readouterr()
    theirs.print_trainable_parameters()
    assert str(report) == capsys.readouterr().out.strip()


def test_trainable_report_hand_count():
    # q_proj 32x32, v_proj 16x32 (2 kv heads of 8), 2 layers, r=8: 8·(32+32) + 8·(16+32) per layer
    base_total = param_count(tiny_llama())
    report = lk.trainable_report(lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"])))
    assert report.trainable == 2 * (8 * 64 + 8 * 48) == 1792
    assert report.total == base_total + 1792
    assert report.percent == pytest.approx(100 * 1792 / (base_total + 1792))


# ---- combine ------------------------------------------------------------------------------------

def outputs_each(model, names):
    outs = {}
    with torch.no_grad():
        for n in names:
            lk.set_active(model, [n])
            outs[n] = model(X)
        lk.set_active(model, [])
        outs[None] = model(X)
    return outs


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0}, {"a": 0.7, "b": -0.3}, {"a": 2.0}])
def test_combine_cat_is_exact_weighted_sum(weights):
    model, _, _ = two_adapters()
    outs = outputs_each(model, ["a", "b"])
    lk.combine(model, weights, "mix", method="cat")
    assert lk.active_adapters(model) == []  # combine adds, it does not activate
    assert model.proj.lora_A["mix"].weight.shape[0] == sum({"a": 2, "b": 3}[n] for n in weights)
    lk.set_active(model, ["mix"])
    with torch.no_grad():
        out = model(X)
    expected = outs[None] + sum(w * (outs[n] - outs[None]) for n, w in weights.items())
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert not model.proj.lora_A["mix"].weight.requires_grad


def hand_delta(model, path, name, scaling):
    a, b = factors(model, name, path)
    d = scaling * (b @ a)
    return d.T if isinstance(model.get_submodule(path), lk.LoraEmbedding) else d


def test_combine_cat_on_llama_matches_explicit_delta_sum():
    """Different ranks, layers only one adapter covers, an embedding target."""
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                   init_lora_weights=False), "a")
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"], use_rslora=True,
                                   init_lora_weights=False), "b")
    weights, scaling = {"a": 0.5, "b": -1.5}, {"a": 8 / 4, "b": 6 / math.sqrt(2)}
    lk.combine(model, weights, "mix")
    checked = 0
    for path, layer in model.named_modules():
        if not isinstance(layer, lk.LoraLinear | lk.LoraEmbedding):
            continue
        present = [n for n in weights if n in layer.adapters]
        expected = sum(weights[n] * hand_delta(model, path, n, scaling[n]) for n in present)
        torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=ATOL, rtol=0)
        assert layer.adapters["mix"].r == sum({"a": 4, "b": 2}[n] for n in present)
        checked += 1
    assert checked == 2 * 3 + 1


@pytest.mark.parametrize("rank", [5, 2, None])
def test_combine_svd(rank):
    model, _, scalings = two_adapters()
    weights = {"a": 0.8, "b": 1.3}
    total = sum(w * scalings[n] * (factors(model, n)[1] @ factors(model, n)[0]) for n, w in weights.items())
    lk.combine(model, weights, "svd", method="svd", rank=rank)
    k = rank or 3  # default: the largest input rank
    assert model.proj.lora_A["svd"].weight.shape == (k, 16)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]
    got = model.proj.delta_weight("svd")
    torch.testing.assert_close(got, best, atol=1e-4, rtol=0)
    if k >= 5:  # a+b has rank 5: nothing is lost
        torch.testing.assert_close(got, total, atol=1e-4, rtol=0)
    else:
        assert (got - total).norm() == pytest.approx(s[k:].norm().item(), rel=1e-3)


def test_combine_svd_output_with_full_rank_equals_weighted_sum():
    model, _, _ = two_adapters()
    outs = outputs_each(model, ["a", "b"])
    lk.combine(model, {"a": 0.5, "b": 2.0}, "svd", method="svd", rank=5)
    lk.set_active(model, "svd")
    with torch.no_grad():
        out = model(X)
    torch.testing.assert_close(out, outs[None] + 0.5 * (outs["a"] - outs[None]) + 2.0 * (outs["b"] - outs[None]),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("weights", [[0.6, 0.4], [0.7, -0.4]])
def test_combine_linear_equals_peft_add_weighted_adapter(weights, tmp_path, ids):
    kw = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False, r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(lora_alpha=8, **kw), adapter_name="a")
        theirs.add_adapter("b", peft.LoraConfig(lora_alpha=2, **kw))
        theirs.save_pretrained(tmp_path)
        theirs.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="linear")
        theirs.set_adapter("mix")
    with torch.no_grad():
        expected = theirs(ids).logits

    ours = tiny_llama()
    lk.load_adapter(ours, tmp_path / "a", "a")
    lk.load_adapter(ours, tmp_path / "b", "b")
    lk.combine(ours, dict(zip(["a", "b"], weights, strict=True)), "mix", method="linear")
    lk.set_active(ours, "mix")
    with torch.no_grad():
        got = ours(ids).logits
        lk.set_active(ours, [])
        base = ours(ids).logits
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_combine_linear_has_cross_terms_unlike_cat():
    model, _, _ = two_adapters()
    with pytest.raises(lk.AdapterError, match="equal rank"):
        lk.combine(model, {"a": 1.0, "b": 1.0}, "lin", method="linear")
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["proj"], init_lora_weights=False), "c")
    lk.combine(model, {"a": 1.0, "c": 1.0}, "lin", method="linear")
    lk.combine(model, {"a": 1.0, "c": 1.0}, "cat", method="cat")
    a1, b1 = factors(model, "a")
    a2, b2 = factors(model, "c")
    s1, s2 = 3 / 2, 1.0
    cross = (math.sqrt(s1) * b1 + math.sqrt(s2) * b2) @ (math.sqrt(s1) * a1 + math.sqrt(s2) * a2)
    torch.testing.assert_close(model.proj.delta_weight("lin"), cross, atol=ATOL, rtol=0)
    assert (model.proj.delta_weight("lin") - model.proj.delta_weight("cat")).abs().max() > 1e-3


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, lk.list_adapters(model), lk.active_adapters(model)


def _same(model, state) -> bool:
    sd, names, active = state
    now = model.state_dict()
    return (now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
            and lk.list_adapters(model) == names and lk.active_adapters(model) == active
            and all(set(m.adapters) <= set(names) for m in model.modules() if isinstance(m, lk.LoraLinear)))


@pytest.mark.parametrize(("weights", "new_name", "kw", "match"), [
    ({"a": 1.0}, "mix", dict(method="mean"), "method"),
    ({"a": 1.0, "zzz": 1.0}, "mix", {}, "zzz"),
    ({}, "mix", {}, "at least one"),
    ({"a": 1.0}, "b", {}, "already"),
    ({"a": 1.0}, "a.b", {}, "name"),
    ({"a": 1.0}, "", {}, "name"),
    ({"a": 1.0, "b": 1.0}, "mix", dict(method="svd", rank=-1), "rank"),
])
def test_combine_bad_input_errors_and_changes_nothing(weights, new_name, kw, match):
    model, _, _ = two_adapters()
    before = _state(model)
    with pytest.raises(lk.AdapterError, match=match):
        lk.combine(model, weights, new_name, **kw)
    assert _same(model, before)


def test_combine_refuses_modules_to_save():
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    with pytest.raises(lk.AdapterError, match="modules_to_save"):
        lk.combine(model, {"a": 1.0}, "mix")
    assert lk.list_adapters(model) == ["a"]
