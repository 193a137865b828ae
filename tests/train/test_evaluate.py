"""lorakit's training loss (evaluate.loss_sum) against the plain cross-entropy over full logits."""

import pytest
import torch
import torch.nn.functional as F
from builders import tiny_gpt2, tiny_llama, tiny_qwen2

import lorakit as lk
from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.lora.ops import linear_cross_entropy
from lorakit.train.evaluate import fused_head, loss_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_the_plain_loss_and_gradients(dtype):
    torch.manual_seed(0)
    h = torch.randn(37, 16).to(dtype).requires_grad_()
    w = (torch.randn(50, 16) / 4).to(dtype).requires_grad_()
    y = torch.randint(0, 50, (37,))
    loss = linear_cross_entropy(h, w, y, chunk_bytes=4 * 50 * 16)  # 16-row chunks: 3 of them
    loss.backward(torch.tensor(0.5))
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h2, w2).float(), y, reduction="sum")
    ref.backward(torch.tensor(0.5))
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(h.grad, h2.grad, **tol)
    torch.testing.assert_close(w.grad, w2.grad, **tol)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y), ref.detach(), **tol)


def _batch(vocab):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[2, 8:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _plain(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_gpt2])
@pytest.mark.parametrize("full", [False, True])
def test_loss_sum_equals_plain_cross_entropy(make, full):
    model = make()
    if full:
        model.requires_grad_(True)  # every weight, the (tied) head included
    else:
        lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert fused_head(model) is model.get_output_embeddings()
    batch = _batch(model.config.vocab_size)
    loss, n = loss_sum(model, batch)
    assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = _plain(model, batch)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[k], p.grad, msg=k)


def test_other_heads_take_the_plain_path():
    model = lk.inject(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert fused_head(model) is None  # an adapted head is not a plain Linear
    batch = _batch(model.config.vocab_size)
    torch.testing.assert_close(loss_sum(model, batch)[0], _plain(model, batch))
    other = tiny_llama()
    other.config.model_type = "gemma2"  # soft-capped logits: not lm_head(h) alone
    assert fused_head(other) is None
