"""GGUF LoRA adapters: read back with gguf's reader, they hold what llama.cpp's loader checks, and the
ΔW llama.cpp computes from them (alpha / r per pair, rows un-permuted) equals PEFT's own merge."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf_helpers import make_adapter

from lorakit.errors import LorakitError
from lorakit.export.gguf import export_adapter_gguf
from lorakit.export.gguf_format import GgufExportError, permute_rows, unpermute_rows


def read_pairs(path) -> tuple[dict, dict]:
    """({key: value}, {base tensor name: (a, b, type names)}), a and b as torch in numpy order."""
    r = gguf.GGUFReader(path)
    keys = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    pairs: dict = {}
    for t in r.tensors:
        base, _, part = t.name.rpartition(".")
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        pairs.setdefault(base, {})[part] = (data, t.tensor_type.name, [int(n) for n in t.shape])
    return keys, pairs


def llama_cpp_delta(name: str, pair: dict, alpha: float, n_head: int | None, n_kv: int | None) -> torch.Tensor:
    """ΔW as llama.cpp applies it (scale alpha / b.ne[0]), mapped back to transformers' layout."""
    a, b = pair["lora_a"][0], pair["lora_b"][0]
    scale = alpha / pair["lora_b"][2][0]
    if name == "token_embd.weight":  # rows of A^T (num, r) times B^T: ΔW (num, dim)
        return scale * (a @ b.T)
    delta = scale * (b @ a)
    if n_head is None:  # a family llama.cpp's converter does not permute
        return delta
    if ".attn_q." in name:
        return unpermute_rows(delta, n_head)
    if ".attn_k." in name:
        return unpermute_rows(delta, n_kv)
    return delta


def test_permutation_is_llama_cpps_and_inverted_exactly():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of 8 rows
    p = permute_rows(w, 2)
    # within a head, rows (i, i + 4) become neighbours (2i, 2i + 1)
    assert p[:, 0].tolist()[:8] == [0, 12, 3, 15, 6, 18, 9, 21]
    assert torch.equal(unpermute_rows(p, 2), w)


def test_keys_names_shapes_as_llama_cpp_checks(patterned, base_gguf, tmp_path):
    _, adapter = patterned
    report = export_adapter_gguf(adapter, tmp_path / "a.gguf", base=str(base_gguf))
    keys, pairs = read_pairs(tmp_path / "a.gguf")
    assert keys["general.architecture"] == "llama" and keys["general.type"] == "adapter"
    assert keys["adapter.type"] == "lora" and keys["adapter.lora.alpha"] == pytest.approx(16.0)
    base = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(base_gguf).tensors}
    assert len(pairs) == report["pairs"] == 2 * 7 + 1
    for name, pair in pairs.items():
        assert set(pair) == {"lora_a", "lora_b"} and name in base
        (_, ta, a_ne), (_, tb, b_ne) = pair["lora_a"], pair["lora_b"]
        assert ta == tb == "F32"
        if name == "token_embd.weight":  # llama-adapter.cpp: B not transposed, A and B flipped
            assert base[name][0] == b_ne[1] and base[name][1] == a_ne[1]
        else:
            assert base[name][0] == a_ne[0] and base[name][1] == b_ne[1] and a_ne[1] == b_ne[0]


HF = {"token_embd": "model.embed_tokens", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
      "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
      "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def assert_gguf_delta_is_peft(adapter, hf_dir, adapter_gguf, permuted: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    keys, pairs = read_pairs(adapter_gguf)
    base = AutoModelForCausalLM.from_pretrained(hf_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    heads = (4, 2) if permuted else (None, None)
    for name, pair in pairs.items():
        parts = name.split(".")
        key = (f"{HF[parts[0]]}.weight" if parts[0] == "token_embd"
               else f"model.layers.{parts[1]}.{HF[parts[2]]}.weight")
        want = merged[key] - before[key]
        got = llama_cpp_delta(name, pair, keys["adapter.lora.alpha"], *heads)
        assert want.abs().max() > 1e-3  # a real ΔW, not zero
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6), name


def test_rebuilt_delta_equals_peft_merge(patterned, base_gguf, bpe_dir, tmp_path):
    """rsLoRA, rank_pattern and alpha_pattern come out right through llama.cpp's single alpha/r."""
    _, adapter = patterned
    export_adapter_gguf(adapter, tmp_path / "a.gguf", base=str(base_gguf))
    assert_gguf_delta_is_peft(adapter, bpe_dir, tmp_path / "a.gguf", permuted=True)


def test_qwen2_adapter_is_not_permuted(gguf_home, tmp_path):
    from gguf_helpers import ALL, PATTERNED

    from lorakit.testing import write_tiny_bpe_model

    folder = write_tiny_bpe_model(tmp_path / "q", model_type="qwen2")
    _, adapter = make_adapter(str(folder), tmp_path / "a", **{**PATTERNED, "target_modules": ALL})
    report = export_adapter_gguf(adapter, tmp_path / "a.gguf", base=str(folder))
    assert report["architecture"] == "qwen2"
    assert_gguf_delta_is_peft(adapter, folder, tmp_path / "a.gguf", permuted=False)


def test_q8_0_falls_back_to_f16_for_short_rows(patterned, base_gguf, tmp_path):
    _, adapter = patterned
    export_adapter_gguf(adapter, tmp_path / "q.gguf", base=str(base_gguf), outtype="q8_0")
    _, pairs = read_pairs(tmp_path / "q.gguf")
    a_type, b_type = pairs["blk.0.attn_v.weight"]["lora_a"][1], pairs["blk.0.attn_v.weight"]["lora_b"][1]
    assert (a_type, b_type) == ("Q8_0", "F16")  # A's rows are 32 values (hidden), B's are r = 8
    export_adapter_gguf(adapter, tmp_path / "h.gguf", base=str(base_gguf), outtype="bf16")
    assert {p["lora_a"][1] for p in read_pairs(tmp_path / "h.gguf")[1].values()} == {"BF16"}


def test_refusals_name_the_part_and_the_way_out(tied_dir, base_gguf, gguf_home, tmp_path):
    _, head = make_adapter(tied_dir, tmp_path / "head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(GgufExportError, match="output head.*ties.*--merged-gguf"):
        export_adapter_gguf(head, tmp_path / "x.gguf", base=str(tied_dir))
    _, emb = make_adapter(tied_dir, tmp_path / "emb", target_modules=["embed_tokens"])
    with pytest.raises(GgufExportError, match="token embeddings.*--merged-gguf"):
        export_adapter_gguf(emb, tmp_path / "x.gguf", base=str(tied_dir))
    _, saved = make_adapter(tied_dir, tmp_path / "saved", target_modules=["q_proj"], modules_to_save=["norm"])
    with pytest.raises(GgufExportError, match="modules_to_save.*--merged-gguf"):
        export_adapter_gguf(saved, tmp_path / "x.gguf", base=str(tied_dir))
    cfg = json.loads((head / "adapter_config.json").read_text())
    (head / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(GgufExportError, match="DoRA.*--merged-gguf"):
        export_adapter_gguf(head, tmp_path / "x.gguf", base=str(tied_dir))
    assert not (tmp_path / "x.gguf").exists()


def test_wrong_base_and_unsupported_arch_are_refused(patterned, tmp_path, gguf_home):
    from transformers import GPT2Config, LlamaConfig

    _, adapter = patterned
    other = tmp_path / "wide"
    other.mkdir()
    LlamaConfig(vocab_size=263, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(other)
    with pytest.raises(GgufExportError, match="do not fit.*another base model"):
        export_adapter_gguf(adapter, tmp_path / "x.gguf", base=str(other))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    GPT2Config(n_embd=32, n_layer=2, n_head=4).save_pretrained(gpt2)
    with pytest.raises(GgufExportError, match="'gpt2' is not one lorakit writes as GGUF"):
        export_adapter_gguf(adapter, tmp_path / "x.gguf", base=str(gpt2))
    with pytest.raises(LorakitError, match="must end in .gguf"):
        export_adapter_gguf(adapter, tmp_path / "x.bin", base=str(other.parent / "wide"))
    assert not list(tmp_path.glob("*.gguf")) and np is not None
