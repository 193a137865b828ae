"""Real llama.cpp (through llama-cpp-python, built from its source package; skipped where it is absent):
the base GGUF plus the adapter GGUF and the merged GGUF give the same logits, and lorakit's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.export.gguf import export_adapter_gguf
from lorakit.export.gguf_merged import export_merged_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see docs/export.md)")


def llama_logits(model_path, ids: list[int], lora=None) -> np.ndarray:
    """Logits at every position, with f32 KV cache so only the weights' arithmetic differs."""
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=64,
                          n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)  # 0: GGML_TYPE_F32
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_adapter_and_merged_agree_in_llama_cpp(patterned, base_gguf, tmp_path):
    model, adapter = patterned
    export_adapter_gguf(adapter, tmp_path / "a.gguf", base=str(base_gguf))
    export_merged_gguf(adapter, tmp_path / "m.gguf", base=str(base_gguf), outtype="f32")
    ids = torch.randint(0, 263, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with_adapter = llama_logits(base_gguf, ids, lora=tmp_path / "a.gguf")
    merged = llama_logits(tmp_path / "m.gguf", ids)
    plain = llama_logits(base_gguf, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    print(f"llama.cpp: adapter vs merged {rel(with_adapter, merged):.2e}, merged vs lorakit {rel(merged, ours):.2e}, "
          f"base alone vs lorakit {rel(plain, ours):.2e}")
    assert rel(with_adapter, merged) <= 1e-4  # 5.6e-7 measured (llama-cpp-python 0.3.36, AMD EPYC)
    assert rel(merged, ours) <= 1e-4  # 7.8e-7 measured
    assert rel(plain, ours) > 1e-2  # the adapter is applied, not ignored
