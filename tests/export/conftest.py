"""Tiny GGUF fixtures for the export tests: a byte-level BPE Llama written as a transformers directory and
as a GGUF file (by lorakit's writer, checked against transformers' GGUF loader in test_gguf_merged.py), and
adapters with per-module scales trained on nothing (random B) so that every ΔW is non-zero."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, inject, save_adapter
from lorakit.testing import write_tiny_bpe_model

# rsLoRA plus a rank pattern and an alpha pattern: three ways a module's scale differs from alpha / r
PATTERNED = dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 4},
                 alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3.0})
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def gguf_home(tmp_path_factory):
    """LORAKIT_HOME for the session's GGUF loads (lorakit caches each converted GGUF there)."""
    home = tmp_path_factory.mktemp("lorakit-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    return write_tiny_bpe_model(tmp_path_factory.mktemp("bpe-llama"))


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory):
    return write_tiny_bpe_model(tmp_path_factory.mktemp("bpe-llama-tied"), tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="session")
def base_gguf(bpe_dir, gguf_home, tmp_path_factory):
    from lorakit.export.gguf_hf import model_to_gguf

    out = tmp_path_factory.mktemp("gguf") / "base.gguf"
    model_to_gguf(str(bpe_dir), out, "f32")
    return out


def make_adapter(base: str, out, *, seed: int = 0, **lora) -> tuple:
    """Inject a LoRA into ``base`` (loaded by lorakit), give B random values, save; returns (model, path)."""
    from lorakit.models.load import load_model

    model, _ = load_model(str(base))
    cfg = LoraConfig(**{"target_modules": ALL, "init_lora_weights": False, **lora})
    inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, out)
    return model, out


@pytest.fixture(scope="session")
def patterned(bpe_dir, gguf_home, tmp_path_factory):
    """(lorakit model with the adapter, adapter dir): every linear of the tiny Llama plus its embeddings."""
    return make_adapter(bpe_dir, tmp_path_factory.mktemp("adapter") / "patterned",
                        **{**PATTERNED, "target_modules": ALL + ["embed_tokens"]})


@pytest.fixture
def ids():
    return torch.randint(0, 263, (2, 12), generator=torch.Generator().manual_seed(0))
