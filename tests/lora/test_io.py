"""lorakit.io: PEFT-format adapters on disk, both directions, and refusal of bad files.

References: PEFT's own PeftModel.from_pretrained / save_pretrained outputs, the fresh base
model's module names, and the model's state before a failed load.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import torch
from builders import tiny_llama, tiny_qwen2
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit as lk

ATOL = 1e-5
TORTURE = os.environ.get("LORAKIT_TORTURE") == "1"  # `make torture`: ten times the fuzz cases
FUZZ_BYTES, FUZZ_CONFIG = (2000, 1200) if TORTURE else (200, 120)



def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def lorakit_layers(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, lk.LoraLinear | lk.LoraEmbedding)}


def peft_layers(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def perturb_saved_copies(model, seed: int = 7) -> None:
    """Make every modules_to_save copy differ from the original, so that loading it is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def snapshot(model):
    """Everything a failed load must leave as it was."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        list(getattr(model, "lorakit_active", [])),
        sorted(getattr(model, "lorakit_configs", {})),
        lk.list_adapters(model),
    )


def unchanged(model, snap) -> bool:
    state, types, grads, active, configs, adapters = snap
    now = model.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
            and {n: type(m) for n, m in model.named_modules()} == types
            and {n: p.requires_grad for n, p in model.named_parameters()} == grads
            and list(getattr(model, "lorakit_active", [])) == active
            and sorted(getattr(model, "lorakit_configs", {})) == configs
            and lk.list_adapters(model) == adapters)


# ---- interop matrix ---------------------------------------------------------------------------

VARIANTS = {
    "llama-list": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "qwen2-list": (tiny_qwen2, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-all-linear": (tiny_llama, dict(target_modules="all-linear", r=4)),
    "qwen2-all-linear": (tiny_qwen2, dict(target_modules="all-linear", r=4, lora_alpha=12)),
    "llama-patterns": (tiny_llama, dict(target_modules="all-linear", r=4, lora_alpha=8,
                                        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                        alpha_pattern={"v_proj": 3, "o_proj": 20})),
    "qwen2-rslora": (tiny_qwen2, dict(target_modules=["q_proj", "k_proj", "up_proj"], r=4, lora_alpha=16,
                                      use_rslora=True)),
    "qwen2-layers": (tiny_qwen2, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2])),
    "llama-embed": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "qwen2-embed": (tiny_qwen2, dict(target_modules=["embed_tokens", "v_proj"])),
    "llama-modules-to-save": (tiny_llama, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lorakit_adapter_loads_in_peft_with_same_logits(variant, ids, tmp_path):
    make, kw = VARIANTS[variant]
    model = lk.inject(make(), lk.LoraConfig(init_lora_weights=False, **kw))
    perturb_saved_copies(model)
    ours = logits(model, ids)
    assert (ours - logits(make(), ids)).abs().max() > 1e-3  # the adapter does something
    lk.save_adapter(model, tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert peft_layers(theirs_model) == lorakit_layers(model)
    torch.testing.assert_close(logits(theirs_model, ids), ours, atol=ATOL, rtol=0)

    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, peft.LoraConfig)
    assert cfg.r == lk.LoraConfig(**kw).r


PEFT_VARIANTS = {
    "llama-list": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "qwen2-all-linear": (tiny_qwen2, dict(target_modules="all-linear", r=4, lora_alpha=12)),
    "llama-patterns": (tiny_llama, dict(target_modules="all-linear", r=4, rank_pattern={"q_proj": 2},
                                        alpha_pattern={"down_proj": 3})),
    "llama-rslora": (tiny_llama, dict(target_modules=["q_proj", "o_proj"], r=4, lora_alpha=16, use_rslora=True)),
    "qwen2-layers": (tiny_qwen2, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "llama-embed": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "qwen2-embed": (tiny_qwen2, dict(target_modules=["embed_tokens", "v_proj"])),
    "llama-modules-to-save": (tiny_llama, dict(target_modules=["q_proj"], modules_to_save=["lm_head"],
                                               task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_peft_adapter_loads_in_lorakit_with_same_logits(variant, ids, tmp_path):
    make, kw = PEFT_VARIANTS[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **kw)).eval()
        perturb_saved_copies(theirs)
        theirs.save_pretrained(tmp_path)
    expected = logits(theirs, ids)
    assert (expected - logits(make(), ids)).abs().max() > 1e-3
    if "embed_tokens" in kw["target_modules"]:  # PEFT saves the targeted embedding in full as well
        with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
            assert "base_model.model.model.embed_tokens.base_layer.weight" in set(f.keys())

    ours = lk.load_adapter(make(), tmp_path)
    assert lorakit_layers(ours) == peft_layers(theirs)
    torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=0)
    assert lk.active_adapters(ours) == ["default"]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".lora_" in n)  # is_trainable=False


def test_load_is_trainable_leaves_only_adapter_trainable(tmp_path):
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(model, tmp_path)
    loaded = lk.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert len(trainable) == 2 * 2  # A and B of q_proj in 2 layers


def test_save_one_of_two_adapters_loads_in_peft(ids, tmp_path):
    """Only the named adapter is written, and its target list resolves to its own modules in PEFT."""
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["v_proj", "o_proj"], layers_to_transform=[1],
                                   init_lora_weights=False), "b")
    lk.save_adapter(model, tmp_path, "b")
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == {k for k in expected_keys(tiny_llama(), {"v_proj", "o_proj"}) if ".layers.1." in k}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert peft_layers(theirs) == {"model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"}
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=ATOL, rtol=0)  # b is active


def test_load_with_activate_false_keeps_active_set(ids, tmp_path):
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "a")
    with_a = logits(model, ids)
    other = lk.inject(tiny_llama(seed=3), lk.LoraConfig(target_modules=["k_proj"], init_lora_weights=False))
    lk.save_adapter(other, tmp_path)
    lk.load_adapter(model, tmp_path, "b", activate=False)
    assert lk.list_adapters(model) == ["a", "b"] and lk.active_adapters(model) == ["a"]
    assert torch.equal(logits(model, ids), with_a)
    lk.set_active(model, ["a", "b"])
    assert (logits(model, ids) - with_a).abs().max() > 1e-3


# ---- lorakit → disk → lorakit -----------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama-patterns", "qwen2-rslora", "qwen2-layers", "llama-embed"])
def test_round_trip_is_exact(variant, ids, tmp_path):
    make, kw = VARIANTS[variant]
    model = lk.inject(make(), lk.LoraConfig(init_lora_weights=False, **kw), adapter_name="mine")
    lk.save_adapter(model, tmp_path, "mine")
    back = lk.load_adapter(make(), tmp_path, "mine")
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert torch.equal(logits(back, ids), logits(model, ids))
    for name, layer in back.named_modules():
        if isinstance(layer, lk.LoraLinear | lk.LoraEmbedding):
            assert layer.adapters["mine"] == model.get_submodule(name).adapters["mine"]


def test_round_trip_with_modules_to_save(ids, tmp_path):
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                   init_lora_weights=False))
    perturb_saved_copies(model)
    lk.save_adapter(model, tmp_path)
    back = lk.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_with_dtype_writes_that_dtype_and_loads_back_close(dtype, ids, tmp_path):
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                   init_lora_weights=False))
    lk.save_adapter(model, tmp_path, dtype=dtype)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert set(dtypes.values()) == {"F16" if dtype == torch.float16 else "BF16"}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # saving casts a copy only

    back = lk.load_adapter(tiny_llama(), tmp_path)
    lora = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert len(lora) == 2 * (2 * 2) + 2
    for k, v in lora.items():
        assert torch.equal(back.state_dict()[k], v.to(dtype).to(v.dtype)), k
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=0.05, rtol=0.02)


def test_save_default_dtype_is_float32(tmp_path):
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_save_refuses_int_dtype_and_unknown_adapter(tmp_path):
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.AdapterError, match="dtype"):
        lk.save_adapter(model, tmp_path / "a", dtype=torch.int8)
    with pytest.raises(lk.AdapterError, match="nope"):
        lk.save_adapter(model, tmp_path / "b", "nope")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- key format -------------------------------------------------------------------------------

def expected_keys(model, leaves) -> set[str]:
    paths = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves]
    return {f"base_model.model.{p}.lora_{ab}.weight" for p in paths for ab in "AB"}


@pytest.mark.parametrize("adapter_name", ["default", "mine"])
def test_key_format_and_metadata(adapter_name, tmp_path):
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"]), adapter_name=adapter_name)
    lk.save_adapter(model, tmp_path, adapter_name)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == expected_keys(tiny_llama(), {"q_proj", "v_proj"})
    assert len(keys) == 2 * 2 * 2
    assert meta["lorakit_format_version"] == "1"
    assert meta["lorakit_base_fingerprint"]
    # The fingerprint is of the architecture (names, shapes), not of the weights.
    lk.save_adapter(lk.inject(tiny_llama(seed=5), lk.LoraConfig(target_modules=["q_proj"])), tmp_path / "other")
    with safe_open(tmp_path / "other" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata()["lorakit_base_fingerprint"] == meta["lorakit_base_fingerprint"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("adapter_name", ["layers", "self_attn", "0"])
def test_key_format_when_adapter_name_equals_a_path_component(adapter_name, tmp_path):
    """The adapter name must be dropped only where it is the adapter name, not inside module paths."""
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"]), adapter_name=adapter_name)
    lk.save_adapter(model, tmp_path, adapter_name)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == expected_keys(tiny_llama(), {"q_proj", "v_proj"})


def test_modules_to_save_key_format(tmp_path):
    """PEFT stores a modules_to_save copy under the module's own parameter name."""
    model = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    lk.save_adapter(model, tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.lm_head.weight" in keys
    assert keys - expected_keys(tiny_llama(), {"q_proj"}) == {"base_model.model.lm_head.weight"}


# ---- bad inputs -------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A valid adapter directory (q_proj, v_proj of tiny Llama, r=8) and a fresh base to load it onto."""
    src = lk.inject(tiny_llama(), lk.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = lk.save_adapter(src, tmp_path / "adapter")
    return path, tiny_llama()


def rewrite_tensors(path: Path, edit) -> None:
    file = path / "adapter_model.safetensors"
    with safe_open(file, "pt") as f:
        meta = f.metadata()
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata=meta)


def rewrite_config(path: Path, edit) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    edit(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def expect_refusal(model, path, error, match, **kw):
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match) as info:
            lk.load_adapter(model, path, **kw)
    assert unchanged(model, snap)
    return str(info.value)


def test_load_onto_model_of_different_width(saved):
    path, _ = saved
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    msg = expect_refusal(wider, path, lk.ShapeMismatchError, "shape")
    assert "model.layers.0.self_attn.q_proj.lora_A" in msg
    assert "(8, 32)" in msg and "(8, 48)" in msg  # found in the file, needed by this model


def test_keys_for_modules_that_do_not_exist(saved):
    path, model = saved

    def move(tensors):
        for ab in "AB":
            k = f"base_model.model.model.layers.1.self_attn.q_proj.lora_{ab}.weight"
            tensors[k.replace("layers.1", "layers.7")] = tensors.pop(k)

    rewrite_tensors(path, move)
    msg = expect_refusal(model, path, lk.AdapterFormatError, "does not")
    assert "model.layers.7.self_attn.q_proj" in msg


def test_missing_adapter_config(saved):
    path, model = saved
    (path / "adapter_config.json").unlink()
    expect_refusal(model, path, lk.AdapterFormatError, "adapter_config.json")


class _Payload:
    """Unpickling this creates ``marker`` (as an attacker's os.system call would run a command)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(tmp_path: Path) -> tuple[bytes, Path]:
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Payload(str(probe))))  # the payload really has a side effect
    assert probe.exists()
    marker = tmp_path / "pwned-marker"
    return pickle.dumps(_Payload(str(marker))), marker


def test_adapter_model_bin_only_is_refused_and_never_unpickled(saved, tmp_path):
    path, model = saved
    payload, marker = _evil_pickle(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(payload)
    msg = expect_refusal(model, path, lk.AdapterFormatError, "pickle")
    assert "safetensors" in msg
    expect_refusal(model, path / "adapter_model.bin", lk.AdapterFormatError, "pickle")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_pickle_path_given_directly_is_refused(saved, tmp_path, suffix):
    _, model = saved
    payload, marker = _evil_pickle(tmp_path)
    file = tmp_path / f"adapter{suffix}"
    file.write_bytes(payload)
    expect_refusal(model, file, lk.AdapterFormatError, "pickle")
    assert not marker.exists()


def test_truncated_safetensors(saved):
    path, model = saved
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        file.write_bytes(data[:cut])
        expect_refusal(model, path, lk.AdapterFormatError, "safetensors|header|truncated")


def test_header_claiming_huge_length(saved):
    path, model = saved
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    expect_refusal(model, path, lk.AdapterFormatError, "header")


def test_config_with_unknown_keys_warns_and_loads(saved, ids):
    path, model = saved
    rewrite_config(path, lambda c: c.update(brand_new_key=3, another_unknown="x"))
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="another_unknown, brand_new_key"):
        lk.load_adapter(model, path)
    assert not unchanged(model, snap)  # the check the refusal tests rely on does see a load
    assert lk.list_adapters(model) == ["default"]
    assert (logits(model, ids) - logits(tiny_llama(), ids)).abs().max() > 1e-3


@pytest.mark.parametrize(("field", "value", "match"), [
    ("r", "eight", "r must be"),
    ("lora_alpha", [1], "lora_alpha"),
    ("use_dora", True, "use_dora"),
    ("lora_bias", True, "lora_bias"),
    ("peft_type", "IA3", "peft_type"),
    ("rank_pattern", "abc", "rank_pattern"),
    ("rank_pattern", {"(": 8}, "rank_pattern"),
    ("alpha_pattern", {"q_proj[": 8}, "alpha_pattern"),
])
def test_config_with_bad_field_is_refused(saved, field, value, match):
    path, model = saved
    rewrite_config(path, lambda c: c.update({field: value}))
    expect_refusal(model, path, lk.AdapterFormatError, match)


def test_config_not_json(saved):
    path, model = saved
    (path / "adapter_config.json").write_text("{not json")
    expect_refusal(model, path, lk.AdapterFormatError, "JSON")


def test_int_tensors_refused(saved):
    path, model = saved
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite_tensors(path, lambda t: t.update({key: t[key].to(torch.int32)}))
    msg = expect_refusal(model, path, lk.AdapterFormatError, "dtype")
    assert key in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_refused(saved, bad):
    path, model = saved
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(t):
        t[key][3, 1] = bad

    rewrite_tensors(path, poison)
    msg = expect_refusal(model, path, lk.AdapterFormatError, "NaN or inf")
    assert key in msg


def test_adapter_name_already_taken(saved):
    path, model = saved
    lk.load_adapter(model, path)
    msg = expect_refusal(model, path, lk.AdapterError, "already")
    assert "'default'" in msg
    lk.load_adapter(model, path, "second")  # another name is fine
    assert lk.list_adapters(model) == ["default", "second"]


@pytest.mark.parametrize("name", ["a.b", ""])
def test_load_under_invalid_adapter_name(saved, name):
    path, model = saved
    expect_refusal(model, path, lk.AdapterError, "adapter_name|name", adapter_name=name)


def test_rank_in_config_disagrees_with_tensors(saved):
    path, model = saved
    rewrite_config(path, lambda c: c.update(r=4))
    msg = expect_refusal(model, path, lk.AdapterFormatError, "rank 8")
    assert "r=4" in msg


def test_missing_factor_refused(saved):
    path, model = saved
    rewrite_tensors(path, lambda t: t.pop("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"))
    msg = expect_refusal(model, path, lk.AdapterFormatError, "lora_B")
    assert "model.layers.0.self_attn.v_proj" in msg


def test_failed_load_leaves_existing_adapters_intact(saved, ids):
    """A second adapter that does not fit must not disturb the one already loaded."""
    path, model = saved
    lk.load_adapter(model, path, "good")
    before = logits(model, ids)
    bad = path.parent / "bad"
    shutil.copytree(path, bad)
    rewrite_tensors(bad, lambda t: t.update(
        {"base_model.model.model.layers.1.mlp.up_proj.lora_A.weight": torch.ones(8, 3),
         "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight": torch.ones(48, 8)}))
    expect_refusal(model, bad, lk.ShapeMismatchError, "up_proj")
    assert torch.equal(logits(model, ids), before)


# ---- fuzz -------------------------------------------------------------------------------------

_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "XYZ", "", 5, None]
_VALUES = [None, -1, 0, 1, 2**40, 1.5, "x", "", [], [-3], [1, 2, 3], {}, {"a": 1}, True, "(", [2**63]]


def _header(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pack(header: dict, body: bytes, rng: random.Random) -> bytes:
    raw = json.dumps(header).encode()
    n = len(raw) + rng.choice([0, 0, 0, -1, 1, 7, 1000])
    return n.to_bytes(8, "little", signed=True) + raw + body


def _mutate(data: bytes, rng: random.Random) -> bytes:
    n = int.from_bytes(data[:8], "little")
    kind = rng.choice(["truncate", "flip-header", "flip-body", "json", "json", "json", "length"])
    buf = bytearray(data)
    if kind == "truncate":
        return data[:rng.randrange(len(data))]
    if kind == "flip-header":
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(8, 8 + n)] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == "flip-body":
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(8 + n, len(buf))] = rng.randrange(256)
        return bytes(buf)
    if kind == "length":
        return rng.choice([0, 1, n - 1, n + 1, 2**31, 2**64 - 1]).to_bytes(8, "little") + data[8:]
    header, body = _header(data)
    keys = sorted(k for k in header if k != "__metadata__")
    key = rng.choice(keys)
    edit = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "metadata", "garbage", "dup-offsets"])
    if edit == "dtype":
        header[key]["dtype"] = rng.choice(_DTYPES)
    elif edit == "shape":
        shape = list(header[key]["shape"])
        shape[rng.randrange(len(shape))] = rng.choice([0, 1, 3, 7, 16, 32, 48, -1])
        header[key]["shape"] = rng.choice([shape, shape[:1], shape + [1], [], rng.choice(_VALUES)])
    elif edit == "offsets":
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice([[end, start], [start, end + 4], [start + 4, end],
                                                  [0, len(body) + 64], rng.choice(_VALUES)])
    elif edit == "drop":
        del header[key]
    elif edit == "rename":
        header[rng.choice(["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight", "lm_head.weight",
                           key.replace("lora_A", "lora_B"), key + ".x", "base_model.model.model.norm.weight",
                           key.replace("q_proj", "k_proj")])] = header.pop(key)
    elif edit == "metadata":
        meta = header.setdefault("__metadata__", {})
        meta[rng.choice(["lorakit_format_version", "lorakit_base_fingerprint", "format", "x"])] = rng.choice(
            ["2", "0", "abc", "1.0", "", "ffff", 3, None, "1"])
    elif edit == "garbage":
        header[key][rng.choice(["dtype", "shape", "data_offsets", "extra"])] = rng.choice(_VALUES)
    else:
        other = rng.choice(keys)
        header[key]["data_offsets"] = list(header[other]["data_offsets"])
    return _pack(header, body, rng)


def _fuzz(model_template, path: Path, mutate, count: int, seed: int) -> list[str]:
    snap = snapshot(model_template)
    rng = random.Random(seed)
    problems, outcomes = [], {"ok": 0, "refused": 0}
    for i in range(count):
        mutate(rng)
        model = copy.deepcopy(model_template)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lk.load_adapter(model, path)
            outcomes["ok"] += 1
        except lk.LorakitError:
            outcomes["refused"] += 1
            if not unchanged(model, snap):
                problems.append(f"mutation {i}: model changed by a failed load")
        except Exception as exc:  # noqa: BLE001 - the point of the test
            problems.append(f"mutation {i}: {type(exc).__name__}: {str(exc)[:150]}")
    assert outcomes["refused"] > count // 4, outcomes  # the mutations do reach the checks
    return problems


def test_fuzz_safetensors_bytes(saved):
    path, model = saved
    file = path / "adapter_model.safetensors"
    original = file.read_bytes()

    def mutate(rng):
        file.write_bytes(_mutate(original, rng))

    problems = _fuzz(model, path, mutate, FUZZ_BYTES, seed=1234)
    assert not problems, "\n".join(problems)


def test_fuzz_config_json(saved):
    path, model = saved
    original = json.loads((path / "adapter_config.json").read_text())
    fields = sorted(original) + ["rank_pattern", "alpha_pattern", "layers_to_transform", "unknown_field"]

    def mutate(rng):
        cfg = copy.deepcopy(original)
        for _ in range(rng.randint(1, 3)):
            cfg[rng.choice(fields)] = rng.choice(_VALUES + [{"q_proj": rng.choice(_VALUES)}])
        if rng.random() < 0.1:
            cfg = rng.choice([[], "x", 3, None])
        (path / "adapter_config.json").write_text(json.dumps(cfg))

    problems = _fuzz(model, path, mutate, FUZZ_CONFIG, seed=99)
    assert not problems, "\n".join(problems)


def test_the_base_a_model_was_loaded_from_is_recorded_and_peft_loads_it_from_there(tiny_model_dir, tmp_path):
    """As PEFT does: adapter_config.json names where transformers loaded the base from, so
    AutoPeftModelForCausalLM rebuilds base + adapter from the adapter directory alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                   task_type="CAUSAL_LM"))  # AutoPeftModel picks its class from the task
    lk.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model_dir)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = model.eval()(ids).logits
        got = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    named = lk.inject(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"], base_model_name_or_path="org/base"))
    lk.save_adapter(named, tmp_path / "b")  # a name the config gives is kept
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base"
