"""Merged GGUF models: transformers' GGUF loader (the one lorakit loads its embedded model with) gives the
logits of the unmerged lorakit model; the base's metadata and untouched tensors are carried over as they were."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_helpers import ALL, PATTERNED, make_adapter

from lorakit.export.gguf_hf import model_to_gguf
from lorakit.export.gguf_merged import export_merged_gguf
from lorakit.testing import write_tiny_bpe_model


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_base_gguf_written_from_transformers_loads_back_exactly(bpe_dir, base_gguf, ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(bpe_dir).eval()
    assert torch.equal(logits(load_gguf(base_gguf), ids), logits(hf, ids))  # q/k permuted and un-permuted
    tok = AutoTokenizer.from_pretrained(str(base_gguf.parent), gguf_file=base_gguf.name)
    want = AutoTokenizer.from_pretrained(bpe_dir)
    assert tok("the cat in a hat").input_ids == want("the cat in a hat").input_ids
    assert tok.chat_template == want.chat_template


@pytest.mark.parametrize("source", ["gguf", "dir"])
def test_merged_f32_logits_equal_unmerged_lorakit(patterned, base_gguf, bpe_dir, source, ids, tmp_path,
                                                  monkeypatch):
    model, adapter = patterned
    base = str(base_gguf if source == "gguf" else bpe_dir)
    if source == "gguf":  # a plain LoRA on a GGUF base: ΔW added tensor by tensor, no model loaded
        def no_model(*args, **kwargs):
            raise AssertionError("the base model was loaded")

        monkeypatch.setattr("lorakit.models.load.load_model", no_model)
    report = export_merged_gguf(adapter, tmp_path / "m.gguf", base=base, outtype="f32")
    assert report["adapted"] == 2 * 7 + 1 and set(report["types"].values()) == {"F32"}
    want = logits(model, ids)
    got = logits(load_gguf(tmp_path / "m.gguf"), ids)
    assert rel(got, want) <= 1e-4
    assert rel(logits(load_gguf(base_gguf), ids), want) > 1e-2  # the adapter matters


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_families_round_trip_and_merge(model_type, gguf_home, ids, tmp_path):
    """No q/k permutation for Qwen; q/k/v biases (Qwen2) and q/k norms (Qwen3) find their GGUF names."""
    from transformers import AutoModelForCausalLM

    folder = write_tiny_bpe_model(tmp_path / model_type, model_type=model_type)
    base = tmp_path / "base.gguf"
    model_to_gguf(str(folder), base, "f32")
    assert torch.equal(logits(load_gguf(base), ids), logits(AutoModelForCausalLM.from_pretrained(folder).eval(), ids))
    model, adapter = make_adapter(str(base), tmp_path / "a", **PATTERNED)
    export_merged_gguf(adapter, tmp_path / "m.gguf", base=str(base), outtype="f32")
    assert rel(logits(load_gguf(tmp_path / "m.gguf"), ids), logits(model, ids)) <= 1e-4


def test_merged_keeps_every_key_and_untouched_tensor(patterned, base_gguf, tmp_path):
    _, adapter = patterned
    export_merged_gguf(adapter, tmp_path / "m.gguf", base=str(base_gguf), outtype="f32")
    old, new = gguf.GGUFReader(base_gguf), gguf.GGUFReader(tmp_path / "m.gguf")
    assert list(old.fields) == list(new.fields)
    for key, field in old.fields.items():
        if not key.startswith("GGUF."):
            assert new.fields[key].contents() == field.contents(), key
    new_t = {t.name: t for t in new.tensors}
    assert [t.name for t in old.tensors] == list(new_t)
    untouched = [t for t in old.tensors if "norm" in t.name]
    assert untouched and all(np.array_equal(t.data, new_t[t.name].data) for t in untouched)


def test_q8_0_is_within_q8_0s_own_error(patterned, base_gguf, ids, tmp_path):
    """The q8_0 file equals the lorakit model whose merged weights went through gguf's q8_0 round trip."""
    from lorakit.export.gguf_merged import merged_weights
    from lorakit.models.load import load_model

    model, adapter = patterned
    export_merged_gguf(adapter, tmp_path / "q.gguf", base=str(base_gguf), outtype="q8_0")
    got = logits(load_gguf(tmp_path / "q.gguf"), ids)
    ref, _ = load_model(str(base_gguf))
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name, w in merged_weights(model).items():
            roundtrip = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8)
            params[name].copy_(torch.from_numpy(roundtrip))
    assert rel(got, logits(ref, ids)) <= 1e-4
    assert 1e-4 < rel(got, logits(model, ids)) < 0.05


def test_quantized_base_keeps_its_bytes_and_adapted_tensors_are_not_requantized(patterned, bpe_dir, ids, tmp_path):
    q8 = tmp_path / "base-q8.gguf"
    model_to_gguf(str(bpe_dir), q8, "q8_0")
    model, adapter = patterned
    report = export_merged_gguf(adapter, tmp_path / "m.gguf", base=str(q8))  # default type
    assert set(report["types"].values()) == {"F16"}
    old = {t.name: t for t in gguf.GGUFReader(q8).tensors}
    new = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert old["output.weight"].tensor_type.name == new["output.weight"].tensor_type.name == "Q8_0"
    assert np.array_equal(old["output.weight"].data, new["output.weight"].data)
    from lorakit import load_adapter
    from lorakit.models.load import load_model

    unmerged, _ = load_model(str(q8))
    load_adapter(unmerged, adapter)
    assert rel(logits(load_gguf(tmp_path / "m.gguf"), ids), logits(unmerged, ids)) < 2e-3  # f16 rounding


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_tied_head_is_untied_in_the_merged_file(tied_dir, gguf_home, target, ids, tmp_path):
    """A LoRA on a tied head (or on the embeddings it shares) gets its own output.weight."""
    from lorakit.models.load import load_model

    base_file = tmp_path / "tied.gguf"
    model_to_gguf(str(tied_dir), base_file, "f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(base_file).tensors}
    model, adapter = make_adapter(str(base_file), tmp_path / "a", target_modules=["q_proj", target])
    report = export_merged_gguf(adapter, tmp_path / "m.gguf", base=str(base_file), outtype="f32")
    assert report["added"] == ["output.weight"]
    assert rel(logits(load_gguf(tmp_path / "m.gguf"), ids), logits(model, ids)) <= 1e-4
    plain, _ = load_model(str(tied_dir))
    assert rel(logits(plain, ids), logits(model, ids)) > 1e-3


def test_modules_to_save_are_written(bpe_dir, base_gguf, gguf_home, ids, tmp_path):
    model, adapter = make_adapter(str(base_gguf), tmp_path / "a", target_modules=ALL[:2], modules_to_save=["lm_head"])
    with torch.no_grad():  # a trained head copy differs from the base head
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    from lorakit import save_adapter

    save_adapter(model, adapter)
    export_merged_gguf(adapter, tmp_path / "m.gguf", base=str(base_gguf), outtype="f32")
    assert rel(logits(load_gguf(tmp_path / "m.gguf"), ids), logits(model, ids)) <= 1e-4


@pytest.mark.real_model
@pytest.mark.slow
def test_embedded_smollm2_merged_and_adapter(tmp_path):
    """The embedded Q4_1 SmolLM2: merged f32 logits equal lorakit's; every other tensor keeps its Q4_1 bytes;
    the adapter file names tensors the base GGUF has, in the shapes llama.cpp checks."""
    from lorakit.export.gguf import export_adapter_gguf
    from lorakit.models.load import resolve_embedded_gguf

    source = resolve_embedded_gguf()
    model, adapter = make_adapter("default", tmp_path / "a", target_modules=["q_proj", "k_proj", "v_proj"],
                                  layers_to_transform=[0, 1], r=4, lora_alpha=8, use_rslora=True)
    export_merged_gguf(adapter, tmp_path / "m.gguf", base="default", outtype="f32")
    ids = torch.randint(0, 49152, (1, 10), generator=torch.Generator().manual_seed(0))
    assert rel(logits(load_gguf(tmp_path / "m.gguf"), ids), logits(model, ids)) <= 1e-4
    old = {t.name: t for t in gguf.GGUFReader(source).tensors}
    new = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert new["blk.0.attn_q.weight"].tensor_type.name == "F32" and old["blk.0.attn_q.weight"].tensor_type.name == "Q4_1"
    assert np.array_equal(old["blk.5.attn_q.weight"].data, new["blk.5.attn_q.weight"].data)
    export_adapter_gguf(adapter, tmp_path / "a.gguf", base="default")
    for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors:
        base, _, part = t.name.rpartition(".")
        ne = [int(n) for n in old[base].shape]
        assert (ne[0] == int(t.shape[0])) if part == "lora_a" else (ne[1] == int(t.shape[1]))


def test_directory_dtype_is_the_default_outtype(gguf_home, tmp_path):
    import json

    folder = write_tiny_bpe_model(tmp_path / "bf")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    model_to_gguf(str(folder), tmp_path / "bf.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "bf.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["output_norm.weight"] == "F32"


@pytest.mark.parametrize("variant", ["dora", "bias"])
def test_dora_and_trained_biases_merge_into_gguf(variant, gguf_home, ids, tmp_path):
    """What a llama.cpp adapter cannot hold (refused there) merges exactly: DoRA's magnitude, trained biases."""
    from lorakit.export.gguf import export_adapter_gguf
    from lorakit.export.gguf_format import GgufExportError

    folder = write_tiny_bpe_model(tmp_path / "q", model_type="qwen2")  # q/k/v have biases
    base = tmp_path / "base.gguf"
    model_to_gguf(str(folder), base, "f32")
    extra = {"use_dora": True} if variant == "dora" else {"bias": "lora_only"}
    model, adapter = make_adapter(str(base), tmp_path / "a", target_modules=["q_proj", "k_proj", "v_proj"], **extra)
    with torch.no_grad():  # trained magnitudes / biases differ from the base's
        for name, p in model.named_parameters():
            if ("magnitude" if variant == "dora" else "base_layer.bias") in name:
                p.mul_(1.3)
    from lorakit import save_adapter

    save_adapter(model, adapter)
    with pytest.raises(GgufExportError, match="--merged-gguf"):
        export_adapter_gguf(adapter, tmp_path / "x.gguf", base=str(base))
    export_merged_gguf(adapter, tmp_path / "m.gguf", base=str(base), outtype="f32")
    assert rel(logits(load_gguf(tmp_path / "m.gguf"), ids), logits(model, ids)) <= 1e-4
