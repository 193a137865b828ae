"""Packed rows against examples run alone: same loss and gradients, and no attention across examples.

The references are independent: each example in its own batch through the model's plain padded
path (its own positions, its own causal mask)."""

import numpy as np
import pytest
import torch
from builders import tiny_gpt2, tiny_llama, tiny_qwen2

import lorakit as lk
from lorakit.data.batching import collate
from lorakit.data.packing import collate_packed
from lorakit.data.tokenize import DataStats, TokenizedDataset
from lorakit.train.evaluate import loss_sum, model_inputs

LENGTHS = [5, 9, 4, 7, 3]


def dataset(vocab: int, seed: int = 0) -> TokenizedDataset:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=sum(LENGTHS)).astype(np.uint16)  # as tokenize stores a small vocabulary
    mask = np.ones(len(ids), dtype=np.uint8)
    mask[:3] = 0  # the first example has a 3-token prompt
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)])
    return TokenizedDataset(ids, mask, offsets, DataStats(len(LENGTHS), 0, 0, len(ids), 0))


def lora_model(make):
    model = make()
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


def grads(model):
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_gpt2])
def test_packed_loss_and_gradients_equal_the_sum_over_examples_alone(make):
    model = lora_model(make)
    ds = dataset(model.config.vocab_size)
    rows = [[1, 0, 2], [3, 4]]  # widths 18 and 10: the second row is padded
    loss, n = loss_sum(model, collate_packed(ds, rows, pad_id=0))
    loss.backward()
    packed = grads(model)
    ref, ref_n = torch.zeros(()), 0
    for i in range(len(LENGTHS)):
        one, k = loss_sum(model, collate([ds[i]], pad_id=0))
        one.backward()
        ref, ref_n = ref + one.detach(), ref_n + k
    alone = grads(model)
    assert n == ref_n == sum(LENGTHS) - len(LENGTHS) - 2  # each first token and the prompt are unlabelled
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)
    for k in packed:
        torch.testing.assert_close(packed[k], alone[k], rtol=1e-5, atol=1e-5, msg=k)


def logits(model, batch, packed=True):
    """The row's logits, given the model as the trainer gives it (model_inputs); packed=False: plain ids."""
    kwargs = model_inputs(batch) if packed else {"input_ids": batch["input_ids"]}
    with torch.no_grad():
        return model(**kwargs).logits[0]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_gpt2])
def test_one_examples_tokens_change_no_other_examples_logits(make):
    model = lora_model(make)
    vocab = model.config.vocab_size
    a, b = dataset(vocab, seed=0), dataset(vocab, seed=0)
    b.ids[LENGTHS[0]:LENGTHS[0] + LENGTHS[1]] = (b.ids[LENGTHS[0]:LENGTHS[0] + LENGTHS[1]] + 1) % vocab  # example 1
    rows = [[0, 1, 2]]  # tokens 0-4, 5-13, 14-17
    ba, bb = collate_packed(a, rows, 0), collate_packed(b, rows, 0)
    la, lb = logits(model, ba), logits(model, bb)
    torch.testing.assert_close(la[:5], lb[:5], rtol=0, atol=0)
    torch.testing.assert_close(la[14:], lb[14:], rtol=0, atol=0)
    assert not torch.allclose(la[5:14], lb[5:14])  # the changed example itself does change
    # the check can fail: without position_ids the row is one sequence and example 2 sees example 1; with
    # them but an (empty, default) KV cache, transformers 5.23 skips its packed-sequence detection too
    assert not torch.allclose(logits(model, ba, packed=False)[14:], logits(model, bb, packed=False)[14:])
    with torch.no_grad():
        cached = [model(input_ids=x["input_ids"], position_ids=x["position_ids"]).logits[0, 14:] for x in (ba, bb)]
    assert not torch.allclose(*cached)


def test_collate_packed_layout():
    ds = dataset(50)
    batch = collate_packed(ds, [[2, 0], [4]], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1] * 9, [1, 1, 1] + [0] * 6]
    first = ds.ids[14:18].tolist() + ds.ids[:5].tolist()
    assert batch["input_ids"][0].tolist() == first and batch["input_ids"][1, 3:].tolist() == [0] * 6
    # no label on each example's first token, nor on example 0's 3-token prompt, nor on padding
    assert batch["labels"][0].tolist() == [-100, *first[1:4], -100, -100, -100, *first[7:]]
    assert batch["labels"][1].tolist() == [-100, *ds.ids[26:28].tolist()] + [-100] * 6
