"""examples/cosyvoice_lm.py against a hand-built reference: CosyVoice's input layout and loss, greedy
decoding with the KV cache against full recomputation, and the published LoRA count at full size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from builders import tiny_llama

from lorakit import LoraConfig
from lorakit.plan.count import count_model

ROOT = Path(__file__).resolve().parents[2]
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cv():
    return example("cosyvoice_lm")


def test_loss_is_cross_entropy_on_speech_tokens_of_cosyvoice_layout(cv):
    model = cv.build_tiny()
    text = torch.tensor([[5, 6, 7, -100], [8, 9, 10, 11]])
    speech = torch.tensor([[1, 2, -100], [3, 4, 5]])
    got = cv.loss(model, {"text_ids": text, "speech_ids": speech})
    S = model.speech_vocab_size
    total, n = 0.0, 0
    for t, s in (([5, 6, 7], [1, 2]), ([8, 9, 10, 11], [3, 4, 5])):  # one row at a time, no padding
        qwen = model.llm.model
        emb = torch.cat([model.speech_embedding.weight[S:S + 1], qwen.model.embed_tokens.weight[t],
                         model.speech_embedding.weight[S + 2:S + 3], model.speech_embedding.weight[s]])
        hidden = qwen(inputs_embeds=emb[None], output_hidden_states=True).hidden_states[-1]
        logits = model.llm_decoder(hidden)[0]
        target = torch.tensor([-100] * (1 + len(t)) + s + [S + 1])
        total = total + F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        n += len(s) + 1
    torch.testing.assert_close(got["loss"], total / n, rtol=1e-5, atol=1e-5)
    assert 0.0 <= float(got["acc"]) <= 1.0


def test_padding_rows_do_not_change_a_row(cv):
    model = cv.build_tiny()
    alone = model(torch.tensor([[5, 6]]), torch.tensor([[1, 2, 3]]))
    padded = model(torch.tensor([[5, 6, -100, -100], [1, 2, 3, 4]]), torch.tensor([[1, 2, 3, -100], [4, 4, 4, 4]]))
    torch.testing.assert_close(padded[0, :alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)


def test_inference_with_cache_equals_full_recomputation(cv):
    model = cv.build_tiny(seed=3)
    text = [5, 6, 7]
    got = model.inference(text, max_len=6)
    want: list[int] = []
    for _ in range(6):
        logits = model(torch.tensor([text]), torch.tensor([want], dtype=torch.long).reshape(1, -1))
        token = int(logits[0, len(text) + 1 + len(want)].argmax())
        if token >= model.speech_vocab_size:
            break
        want.append(token)
    assert got == want and len(got) > 0


def test_full_size_count_is_the_published_13_197_312(cv):
    model = cv.build_full()
    report = count_model(model, LoraConfig(r=24, lora_alpha=24, target_modules=SEVEN))
    assert report.trainable == 13_197_312
    assert len(report.targets) == 24 * 7
    assert 490e6 < report.base < 510e6  # "~500 million parameters"


def test_wrap_keeps_the_inner_llm_and_cosyvoice_key_names(cv):
    llm = tiny_llama()
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    model = cv.wrap(llm, speech_vocab_size=10)
    keys = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(keys[f"llm.model.{k}"], v)
    assert keys["speech_embedding.weight"].shape == (14, 32) and keys["llm_decoder.weight"].shape == (14, 32)
