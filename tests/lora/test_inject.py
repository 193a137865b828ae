"""Target matching and injection, checked against PEFT on the same models."""

import pytest
import torch
from builders import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tts
from torch import nn

import lorakit as lk
from lorakit.lora.layer import LoraLayer

CONFIGS = [
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj", "mlp.down_proj"], "r": 2},
    {"target_modules": r".*\.(q|k)_proj"},
    {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
    {"target_modules": ["q_proj", "k_proj", "gate_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": "all-linear", "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
    {"target_modules": ["q_proj", "embed_tokens"]},
    {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
]


def _peft(model, kwargs):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=kwargs.pop("r", 4), lora_alpha=8, **kwargs))


def _peft_lora_names(peft_model):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    prefix = "base_model.model."
    return {n.removeprefix(prefix): m.r["default"] for n, m in peft_model.named_modules()
            if isinstance(m, PeftLoraLayer)}


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_same_modules_ranks_and_counts_as_peft(make, kwargs):
    ours = lk.inject(make(), lk.LoraConfig(r=kwargs.get("r", 4), lora_alpha=8,
                                           **{k: v for k, v in kwargs.items() if k != "r"}))
    theirs = _peft(make(), dict(kwargs))
    got = {n: m.adapters["default"].r for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert got == _peft_lora_names(theirs)
    rep = lk.trainable_report(ours)
    assert (rep.trainable, rep.total) == theirs.get_nb_trainable_parameters()


def test_gpt2_conv1d_counts_match_peft():
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        ours = lk.inject(tiny_gpt2(), lk.LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    with pytest.warns(UserWarning):
        theirs = _peft(tiny_gpt2(), {"target_modules": ["c_attn", "c_proj"]})
    assert (lk.trainable_report(ours).trainable, lk.trainable_report(ours).total) == \
        theirs.get_nb_trainable_parameters()


def test_plan_is_a_dry_run_with_exact_counts():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = lk.plan_injection(model, lk.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    q = next(t for t in plan if t.name.endswith("q_proj"))
    down = next(t for t in plan if t.name.endswith("down_proj"))
    assert q.shape == (32, 32) and q.lora_params == 4 * (32 + 32)
    assert down.shape == (32, 48) and down.lora_params == 4 * (32 + 48)  # (out, in) of a 48→32 Linear
    assert len(plan) == 4


def test_seed_count_1024_square_at_r8():
    model = nn.Sequential(nn.Linear(1024, 1024))
    [t] = lk.plan_injection(model, lk.LoraConfig(r=8, target_modules=["0"]))
    assert t.lora_params == 16_384 and round(100 * t.lora_params / 1024**2, 2) == 1.56


def test_unmatched_pattern_lists_closest_names():
    with pytest.raises(lk.TargetError) as err:
        lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "qproj_typo"]))
    assert "qproj_typo" in str(err.value) and "q_proj" in str(err.value)


def test_unmatched_regex_is_an_error():
    with pytest.raises(lk.TargetError, match="matches no module"):
        lk.inject(tiny_llama(), lk.LoraConfig(target_modules=r".*\.attention\.query"))


def test_unsupported_module_type_is_refused():
    with pytest.raises(lk.TargetError, match="LlamaRMSNorm"):
        lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["input_layernorm"]))


def test_rank_larger_than_matrix_refused():
    with pytest.raises(lk.TargetError, match="r must be <= 32"):
        lk.inject(tiny_llama(), lk.LoraConfig(r=33, target_modules=["q_proj"]))


def test_everything_else_frozen_and_only_lora_trains():
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=4, target_modules="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids = torch.randint(0, 96, (2, 6))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_A.default.weight"))


def test_plain_pytorch_tts_model():
    model = tiny_tts()
    ids = torch.randint(0, 50, (2, 5))
    ref = model(ids)
    cfg = lk.LoraConfig(r=4, lora_alpha=8, target_modules=["wqkv", "wo", "w1", "w2", "w3"])
    lk.inject(model, cfg)
    torch.testing.assert_close(model(ids), ref)  # B = 0: identical
    per_layer = 4 * ((24 + 72) + (24 + 24) + 2 * (24 + 40) + (40 + 24))
    assert lk.trainable_report(model).trainable == 2 * per_layer
    # all-linear on a plain model (no get_output_embeddings) adapts the head too, as PEFT does
    assert len(lk.plan_injection(tiny_tts(), lk.LoraConfig(target_modules="all-linear", r=2))) == 11


def test_second_adapter_reuses_wrappers_and_duplicate_name_refused():
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.inject(model, lk.LoraConfig(r=3, target_modules=["q_proj", "v_proj"]), adapter_name="b")
    q = model.model.layers[0].self_attn.q_proj
    assert set(q.adapters) == {"default", "b"} and isinstance(q.base_layer, nn.Linear)
    assert lk.list_adapters(model) == ["default", "b"]
    with pytest.raises(lk.AdapterError, match="already has an adapter"):
        lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]), adapter_name="b")


def test_inject_makes_the_frozen_head_see_a_contiguous_input():
    """PyTorch #151934: freezing the head is what sends a strided bf16 input down the copying path."""
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    model(input_ids=torch.randint(0, 90, (2, 7)), logits_to_keep=1)
    assert seen == [True]


def test_a_module_to_save_answers_for_the_module_it_wraps():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    head = model[1]
    assert head.out_features == 3  # a plain Linear's attribute, read through the wrapper
    assert head.weight is head.modules_to_save["default"].weight and head.weight.requires_grad
    with lk.disable_adapters(model):
        assert head.weight is head.original_module.weight  # no adapter active: the original's
    # PEFT's wrapper answers the same way
    theirs = get_peft_model(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)),
                            LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    assert theirs.base_model.model[1].weight is theirs.base_model.model[1].modules_to_save["default"].weight
    with pytest.raises(AttributeError):
        getattr(head, "no_such_attribute")  # noqa: B009
