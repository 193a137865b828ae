"""Fixtures shared by the tests; the tiny-model builders they use live in builders.py."""

from __future__ import annotations

import os

import pytest
import torch
from builders import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tts, write_tiny_model  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def _lorakit_home_in_tmp(tmp_path_factory):
    """The suite's LORAKIT_HOME is a temporary directory, so the token caches its runs write stay out of
    the user's ~/.cache; its models/ links to the real one, where the embedded model is converted once
    per machine (tests that need a fresh one set their own LORAKIT_HOME)."""
    from lorakit.models.load import lorakit_home

    models = lorakit_home() / "models"
    models.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("lorakit-home")
    (home / "models").symlink_to(models, target_is_directory=True)
    before = os.environ.get("LORAKIT_HOME")
    os.environ["LORAKIT_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("LORAKIT_HOME", None)
    else:
        os.environ["LORAKIT_HOME"] = before


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(0, 64, (2, 9))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + char tokenizer saved as a transformers directory (safetensors)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread, and the suite shares 2 cores; the real model gets all."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
