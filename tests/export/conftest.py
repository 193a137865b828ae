"""Tiny GGUF fixtures for the export tests: a byte-level BPE Llama written as a transformers directory and
as a GGUF file (by lorakit's writer, checked against transformers' GGUF loader in test_gguf_merged.py), and
adapters with per-module scales trained on nothing (random B) so that every ΔW is non-zero."""

from __future__ import annotations

import pytest
import torch
from gguf_helpers import ALL, PATTERNED, make_adapter

from lorakit.testing import write_tiny_bpe_model


@pytest.fixture(scope="session")
def gguf_home(tmp_path_factory):
    """LORAKIT_CACHE for the session's GGUF loads (lorakit caches each converted GGUF there)."""
    home = tmp_path_factory.mktemp("lorakit-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE", str(home))
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


@pytest.fixture(scope="session")
def patterned(bpe_dir, gguf_home, tmp_path_factory):
    """(lorakit model with the adapter, adapter dir): every linear of the tiny Llama plus its embeddings."""
    return make_adapter(bpe_dir, tmp_path_factory.mktemp("adapter") / "patterned",
                        **{**PATTERNED, "target_modules": ALL + ["embed_tokens"]})


@pytest.fixture
def ids():
    return torch.randint(0, 263, (2, 12), generator=torch.Generator().manual_seed(0))
