"""examples/fish_dual_ar.py: causality over time and over codebooks, padding, the loss's two parts, and
the seed document's LoRA count for openaudio-s1-mini reconciled at full size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorakit import LoraConfig
from lorakit.models.custom import load_custom
from lorakit.plan.count import count_model

SPEC = f"{Path(__file__).resolve().parents[2]}/examples/fish_dual_ar.py"
DOC_TARGETS = ["wqkv", "wo", "w1", "w2", "w3", "embeddings", "codebook_embeddings", "fast_embeddings"]


@pytest.fixture(scope="module")
def fish():
    model, _ = load_custom(f"{SPEC}:build_tiny")
    return sys.modules[type(model).__module__]


def test_loss_is_token_plus_codebook_cross_entropy(fish):
    model = fish.build_tiny()
    batch = fish.random_batch(model)
    got = fish.loss(model, batch)
    token_logits, code_logits = model(batch["input_ids"], batch["labels"], batch["attention_mask"] == 0)
    labels = batch["labels"]
    tok = F.cross_entropy(token_logits.reshape(-1, token_logits.shape[-1]), labels[:, 0].reshape(-1))
    rows = [labels[b, 1:, t] for b in range(labels.shape[0]) for t in range(labels.shape[2])
            if model.config.semantic_begin_id <= labels[b, 0, t] <= model.config.semantic_end_id]
    code = F.cross_entropy(code_logits.reshape(-1, code_logits.shape[-1]), torch.stack(rows).reshape(-1))
    torch.testing.assert_close(got["token_loss"], tok)
    torch.testing.assert_close(got["codebook_loss"], code)
    torch.testing.assert_close(got["loss"], tok + code)
    assert code_logits.shape == (len(rows), model.config.num_codebooks, model.config.codebook_size)


def test_slow_transformer_is_causal_and_padding_is_ignored(fish):
    model = fish.build_tiny(seed=1)
    batch = fish.random_batch(model, batch=1, steps=9)
    inp, labels = batch["input_ids"], batch["labels"]
    changed = inp.clone()
    changed[:, :, 5:] = torch.flip(changed[:, :, 5:], dims=[-1])
    a, _ = model(inp, labels)
    b, _ = model(changed, labels)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    pad = torch.zeros(1, 8, dtype=torch.bool)
    pad[:, 6:] = True
    c, _ = model(changed, labels, pad)
    torch.testing.assert_close(c[:, :5], a[:, :5])


def test_fast_transformer_is_causal_over_codebooks(fish):
    model = fish.build_tiny(seed=2)
    batch = fish.random_batch(model, batch=1, steps=9)
    _, first = model(batch["input_ids"], batch["labels"])
    labels = batch["labels"].clone()
    labels[:, -1] = (labels[:, -1] + 1) % model.config.codebook_size  # the last codebook's targets
    _, second = model(batch["input_ids"], labels)
    torch.testing.assert_close(first, second)  # the last code is never an input of the fast transformer
    labels[:, 1] = (labels[:, 1] + 1) % model.config.codebook_size
    _, third = model(batch["input_ids"], labels)
    torch.testing.assert_close(third[:, 0], first[:, 0])
    assert not torch.allclose(third[:, 1:], first[:, 1:])


def test_s1_mini_count_reconciles_the_documents_8_1m(fish):
    model = fish.build_full()
    assert sum(p.numel() for p in model.parameters()) == 872_752_128  # the document says "868M"
    doc = count_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.01, target_modules=DOC_TARGETS))
    fish_default = count_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.01,
                                                 target_modules=[*DOC_TARGETS, "output", "fast_output"]))
    # fish-speech's r_8_alpha_16 config adapts "attention", "mlp", "embeddings" and "output": the token
    # head (vocab 155,776 x 1024) and fast_output too. That is the 8.1M the document quotes.
    assert fish_default.trainable == 8_169_472
    assert doc.trainable == 6_874_112  # the modules the document lists
    per_slow_layer = 8 * (1024 + 4096) + 8 * (2048 + 1024) + 3 * 8 * (1024 + 3072)
    per_fast_layer = per_slow_layer  # openaudio-s1-mini's fast blocks have the slow blocks' shapes
    embeddings = 8 * (155_776 + 1024) + 8 * (10 * 4096 + 1024) + 8 * (4096 + 1024)
    assert doc.trainable == 28 * per_slow_layer + 4 * per_fast_layer + embeddings
    assert fish_default.trainable - doc.trainable == 8 * (1024 + 155_776) + 8 * (1024 + 4096)
    assert per_slow_layer == 163_840  # the document: "~115,000" (w3 left out, wqkv taken as 1024 -> 3072)


def test_lorakit_count_takes_a_builder_spec(capsys):
    from lorakit.cli.main import main

    fish = ["wqkv", "wo", "w1", "w2", "w3", "embeddings", "codebook_embeddings", "fast_embeddings", "output",
            "fast_output"]
    assert main(["count", f"{SPEC}:build_full", "--r", "8", "--alpha", "16", "--target-modules", *fish]) == 0
    assert "trainable 8,169,472 of 880,921,600 parameters = 0.9274%" in capsys.readouterr().out
    cosy = SPEC.replace("fish_dual_ar.py", "cosyvoice_lm.py")
    assert main(["count", f"{cosy}:build_full", "--r", "24", "--target-modules", "q_proj", "k_proj", "v_proj",
                 "o_proj", "gate_proj", "up_proj", "down_proj"]) == 0
    assert "trainable 13,197,312 of 519,345,792 parameters" in capsys.readouterr().out


def test_regex_targets_pick_the_slow_transformer_only(fish):
    from lorakit import inject

    model = fish.build_tiny()
    inject(model, LoraConfig(r=2, target_modules=r"layers\.\d+\.attention\.(wqkv|wo)"))
    adapted = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert adapted == sorted(f"layers.{i}.attention.{p}" for i in (0, 1) for p in ("wqkv", "wo"))
    assert not any("fast_layers" in n for n in adapted)  # full-match regex: "fast_layers.0..." is not "layers.0..."
