"""export_native on the two example models: the adapter lorakit saves loads in PEFT (modules_to_save
included) with equal outputs and PEFT's trainable count; the merged native checkpoint loads strictly into a
fresh build and gives PEFT's outputs; ties stay tied; what cannot be merged is refused and nothing is written."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.cli import main as cli_main
from lorakit.errors import AdapterError, ModelLoadError
from lorakit.export.native import export_native
from lorakit.models.custom import load_custom

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[2]
COSY, FISH = f"{ROOT}/examples/cosyvoice_lm.py", f"{ROOT}/examples/fish_dual_ar.py"
CASES = {
    "cosyvoice": (f"{COSY}:build_tiny", dict(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["speech_embedding", "llm_decoder"])),
    "fish": (f"{FISH}:build_tiny", dict(r=4, lora_alpha=8, lora_dropout=0.01, target_modules=[
        "wqkv", "wo", "w1", "w2", "w3", "embeddings", "codebook_embeddings", "fast_embeddings", "output"],
        modules_to_save=["fast_output"])),
}


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, tuple) else (out,)


def assert_same(a, b, atol=1e-5):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def pretrained(spec: str, path: Path, seed: int = 5) -> Path:
    """Base weights a fresh build does not have, saved once (the tied head left out, as HF saves it)."""
    model, _ = load_custom(spec)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "llm.model.lm_head.weight"}
    save_file(state, path)
    return path


def trained_adapter(spec: str, weights: Path, cfg: dict, out: Path) -> Path:
    model, _ = load_custom(spec, weights)
    lk.inject(model, lk.LoraConfig(init_lora_weights=False, **cfg))  # B != 0: the adapter changes outputs
    if "modules_to_save" in cfg:
        with torch.no_grad():
            for name in cfg["modules_to_save"]:
                for p in model.get_submodule(name).modules_to_save["default"].parameters():
                    p.add_(torch.randn_like(p) * 0.1)  # a trained head / embedding copy
    return lk.save_adapter(model, out)


def example_inputs(spec: str, model):
    import sys

    return sys.modules[type(model).__module__].example_inputs(model)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_loads_in_peft_and_native_export_matches(case, tmp_path):
    spec, cfg = CASES[case]
    weights = pretrained(spec, tmp_path / "base.safetensors")
    adapter = trained_adapter(spec, weights, cfg, tmp_path / "adapter")
    ours, _ = load_custom(spec, weights)
    lk.load_adapter(ours, adapter, is_trainable=True)
    inputs = example_inputs(spec, ours)
    base, _ = load_custom(spec, weights)
    theirs = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True).eval()  # PEFT turns on dropout
    want = outputs(theirs, inputs)
    base_out = outputs(load_custom(spec, weights)[0], inputs)
    assert max(float((a - b).abs().max()) for a, b in zip(want, base_out, strict=True)) > 1e-3
    assert_same(outputs(ours, inputs), want)
    trainable, _ = theirs.get_nb_trainable_parameters()
    assert lk.trainable_report(ours).trainable == trainable

    for suffix in (".safetensors", ".pt"):
        out = tmp_path / f"merged{suffix}"
        report = export_native(adapter, spec, out, weights=weights)
        state = load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
        assert type(state) is dict and all(isinstance(v, torch.Tensor) for v in state.values())
        fresh, _ = load_custom(spec)
        assert set(state) == set(fresh.state_dict())  # the model's own key names, nothing of LoRA
        fresh.load_state_dict(state, strict=True)
        assert_same(outputs(fresh, inputs), want)
        assert report["max_diff"] <= 1e-5 and report["keys"] == len(state)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp file left


def test_tied_inner_head_stays_tied(tmp_path):
    spec, cfg = CASES["cosyvoice"]
    weights = pretrained(spec, tmp_path / "base.safetensors")
    adapter = trained_adapter(spec, weights, cfg, tmp_path / "adapter")
    report = export_native(adapter, spec, tmp_path / "m.pt", weights=weights)
    assert report["tied"] == [["llm.model.lm_head.weight", "llm.model.model.embed_tokens.weight"]]
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state["llm.model.lm_head.weight"].data_ptr() == state["llm.model.model.embed_tokens.weight"].data_ptr()
    fresh, _ = load_custom(spec)
    fresh.load_state_dict(state, strict=True)
    assert fresh.llm.model.lm_head.weight is fresh.llm.model.model.embed_tokens.weight


def test_lora_on_a_shared_tied_embedding_is_refused_and_nothing_written(tmp_path):
    spec = f"{COSY}:build_tiny"
    model, _ = load_custom(spec)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
    adapter = lk.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(AdapterError, match="shared with.*lm_head.*Untie"):
        export_native(adapter, spec, out)
    assert out.read_bytes() == b"old"


def test_lora_on_an_embedding_a_head_reads_directly_is_refused(tmp_path):
    spec = f"{FISH}:build_tiny_tied"  # token head = F.linear(h, embeddings.weight), as fish-speech ties it
    model, _ = load_custom(spec)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["embeddings", "wqkv"], init_lora_weights=False))
    adapter = lk.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="nothing was written. A module reads an adapted weight directly"):
        export_native(adapter, spec, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    lk.delete_adapter(model, "default")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["wqkv", "w2"], init_lora_weights=False))
    adapter = lk.save_adapter(model, tmp_path / "adapter2")
    assert export_native(adapter, spec, tmp_path / "m.safetensors")["max_diff"] <= 1e-5


def test_check_inputs_are_required_and_may_come_from_a_file(tmp_path, monkeypatch):
    (tmp_path / "plainnet.py").write_text(
        "import torch\nfrom torch import nn\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))\n")
    spec = f"{tmp_path / 'plainnet.py'}:build"
    model, _ = load_custom(spec)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    adapter = lk.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="--inputs FILE.*example_inputs"):
        export_native(adapter, spec, tmp_path / "m.safetensors")
    save_file({"input": torch.randn(5, 4)}, tmp_path / "inputs.safetensors")
    # --model defaults to the adapter's base_model_name_or_path: load_custom recorded the spec there
    rc = cli_main(["export", "native", str(adapter), "--inputs", str(tmp_path / "inputs.safetensors"),
                   "--out", str(tmp_path / "m.safetensors")])
    assert rc == 0
    fresh, _ = load_custom(spec)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), lk.merge_and_unload(copy.deepcopy(model))(x), atol=1e-6, rtol=0)


def test_bad_output_suffix_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="must end in .safetensors, .pt, .pth"):
        export_native(tmp_path, f"{COSY}:build_tiny", tmp_path / "m.bin")


def test_a_trained_copy_of_one_side_of_a_tie_is_refused(tmp_path):
    spec = f"{COSY}:build_tiny"
    model, _ = load_custom(spec)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    with torch.no_grad():
        model.llm.model.model.embed_tokens.modules_to_save["default"].weight.add_(1.0)
    adapter = lk.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="lm_head.weight and llm.model.model.embed_tokens.weight are one tied"):
        export_native(adapter, spec, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
