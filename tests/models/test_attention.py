"""Per-example attention in packed rows (lorakit.models.attention) against transformers' own paths:
each example alone through the padded path, and the packed row through SDPA's block-diagonal mask."""

import numpy as np
import pytest
import torch
from builders import tiny_gpt2, tiny_llama, tiny_qwen2

import lorakit as lk
from lorakit.data.batching import collate
from lorakit.data.packing import collate_packed
from lorakit.data.tokenize import DataStats, TokenizedDataset
from lorakit.models.attention import NAME, packed_attention_for, shared_prefixes, spans
from lorakit.train.evaluate import loss_sum, model_inputs

LENGTHS = [5, 9, 4, 7, 3, 6]
ROWS = [[1, 0, 2], [3, 4], [5]]  # widths 18, 10 and 6: rows 2 and 3 end in padding


def dataset(vocab: int) -> TokenizedDataset:
    ids = np.random.default_rng(0).integers(1, vocab, size=sum(LENGTHS)).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)])
    return TokenizedDataset(ids, np.ones(len(ids), dtype=np.uint8), offsets, DataStats(len(LENGTHS), 0, 0, len(ids), 0))


def lora_model(make):
    model = make()
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


def loss_and_grads(model, batch):
    loss, n = loss_sum(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), n, grads


def test_spans_split_rows_where_positions_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert spans(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert spans(torch.arange(6).repeat(2, 1)) is None  # no row holds two examples: plain SDPA


def test_a_span_starting_at_position_k_shares_the_first_k_tokens_of_the_last_root():
    # [0..4] root, [2, 3] shares its first 2 tokens; [0, 1] a new root; [5, 6] longer than that root: none;
    # a row starting at 3 (a continuation without a root in the row): none
    pos = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 0, 1, 5, 6], [3, 4, 5, 0, 1, 2, 3, 1, 2, 0, 1]])
    assert shared_prefixes(pos, spans(pos)) == [
        [(0, 5, 0, 0), (5, 7, 0, 2), (7, 9, 7, 0), (9, 11, 9, 0)],
        [(0, 3, 0, 0), (3, 7, 3, 0), (7, 9, 3, 1), (9, 11, 9, 0)]]


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_packed_attention_equals_examples_alone_and_the_block_mask(make):
    model = lora_model(make)
    ds = dataset(model.config.vocab_size)
    batch = collate_packed(ds, ROWS, pad_id=0)
    masked = loss_and_grads(model, batch)  # transformers' SDPA with its block-diagonal mask
    assert packed_attention_for(model) == NAME and model.config._attn_implementation == NAME
    ours = loss_and_grads(model, batch)
    alone_loss, alone_n, alone = torch.zeros(()), 0, None
    for i in range(len(LENGTHS)):
        loss, n, grads = loss_and_grads(model, collate([ds[i]], pad_id=0))
        alone_loss, alone_n = alone_loss + loss, alone_n + n
        alone = grads if alone is None else {k: alone[k] + g for k, g in grads.items()}
    assert ours[1] == masked[1] == alone_n
    for ref in (alone_loss, masked[0]):
        torch.testing.assert_close(ours[0], ref, rtol=1e-5, atol=1e-5)
    for k, g in ours[2].items():
        torch.testing.assert_close(g, alone[k], rtol=1e-5, atol=1e-5, msg=k)
        torch.testing.assert_close(g, masked[2][k], rtol=1e-5, atol=1e-5, msg=k)


def test_one_examples_tokens_change_no_other_examples_logits():
    model = lora_model(tiny_llama).eval()
    packed_attention_for(model)
    ds = dataset(model.config.vocab_size)
    batch = collate_packed(ds, ROWS, pad_id=0)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 5:14] = (changed["input_ids"][0, 5:14] + 1) % model.config.vocab_size  # example 0 (9 tokens)
    with torch.no_grad():
        a, b = (model(**model_inputs(x)).logits for x in (batch, changed))
    assert not torch.allclose(a[0, 5:14], b[0, 5:14])
    torch.testing.assert_close(a[0, :5], b[0, :5])  # example 1, before it in the row
    torch.testing.assert_close(a[0, 14:], b[0, 14:])  # example 2, after it
    torch.testing.assert_close(a[1:], b[1:])


def test_padded_batches_and_generation_are_unchanged():
    model = lora_model(tiny_llama).eval()
    ds = dataset(model.config.vocab_size)
    padded = collate([ds[i] for i in range(4)], pad_id=0)
    prompt = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        want = model(**model_inputs(padded)).logits
        want_gen = model.generate(prompt, max_new_tokens=6, do_sample=False)
        packed_attention_for(model)
        torch.testing.assert_close(model(**model_inputs(padded)).logits, want)
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), want_gen)


def test_a_model_that_keeps_position_ids_from_attention_keeps_the_block_mask():
    """GPT-2's blocks do not pass position_ids down to attention: the call falls back to SDPA with the
    mask transformers built, which is still exact."""
    model = lora_model(tiny_gpt2)
    ds = dataset(model.config.vocab_size)
    batch = collate_packed(ds, ROWS, pad_id=0)
    want = loss_and_grads(model, batch)
    assert packed_attention_for(model) == NAME
    got = loss_and_grads(model, batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_models_on_other_attention_are_left_alone():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert packed_attention_for(model) == NAME  # eager builds the same block mask: switched too
    assert packed_attention_for(torch.nn.Linear(2, 2)) is None


def _span_reference(q, k, v, prefix):
    """fp64 SDPA of one span's queries over [prefix keys, own keys] with the shifted causal mask, k/v repeated."""
    n, groups = q.shape[2], q.shape[1] // k.shape[1]
    mask = torch.arange(k.shape[2])[None, :] <= torch.arange(n)[:, None] + prefix
    return torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1), attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix", [0, 23])
def test_half_precision_spans_take_the_matmul_kernel_and_are_no_less_exact_than_sdpa(dtype, prefix):
    """bf16/fp16 spans that need gradients run as batched matrix products (``_HalfSpanAttention``): output and
    q/k/v gradients against fp64 SDPA, each no further off than PyTorch's own kernel on the same inputs."""
    from lorakit.models.attention import _span_attention

    gen = torch.Generator().manual_seed(prefix)
    heads, kv_heads, n, d = 6, 2, 37, 16
    row = torch.randn(1, heads, prefix + n + 5, d, generator=gen)  # the span sits inside a longer row
    keys, values = (torch.randn(1, kv_heads, prefix + n + 5, d, generator=gen) for _ in range(2))
    grad_out = torch.randn(1, heads, n, d, generator=gen)
    q, k, v = (t.to(dtype).requires_grad_() for t in (row, keys, values))
    s, e = prefix + 5, prefix + 5 + n
    span_k = torch.cat([k[:, :, 3:3 + prefix], k[:, :, s:e]], 2)  # the prefix starts at 3, the span at s
    span_v = torch.cat([v[:, :, 3:3 + prefix], v[:, :, s:e]], 2)
    want = _span_reference(q[:, :, s:e].detach(), span_k.detach(), span_v.detach(), prefix)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q[:, :, s:e], span_k, span_v))
    _span_reference(q64, k64, v64, prefix).backward(grad_out.double())

    def run(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(grad_out.to(dtype))
        return out, q.grad[:, :, s:e], k.grad, v.grad

    ours = run(lambda: _span_attention(q, k, v, 0, s, e, 3, prefix, 0.0, None))
    assert ours[0].grad_fn.name() == "_HalfSpanAttentionBackward"
    sdpa = run(lambda: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, s:e], span_k.repeat_interleave(3, 1), span_v.repeat_interleave(3, 1),
        attn_mask=torch.arange(prefix + n)[None, :] <= torch.arange(n)[:, None] + prefix))
    kg = (k64.grad[:, :, :prefix], k64.grad[:, :, prefix:])  # the prefix's and the span's key gradients
    vg = (v64.grad[:, :, :prefix], v64.grad[:, :, prefix:])
    for got in (ours, sdpa):  # the reference's k/v gradients land at rows 3.. and s.. of the whole row
        got_k = (got[2][:, :, 3:3 + prefix], got[2][:, :, s:e])
        got_v = (got[3][:, :, 3:3 + prefix], got[3][:, :, s:e])
        errs = [(got[0].double() - want).abs().max(), (got[1].double() - q64.grad).abs().max(),
                *((a.double() - b).abs().max() for a, b in zip(got_k + got_v, kg + vg, strict=True) if b.numel())]
        if got is ours:
            mine = errs
        else:
            for a, b in zip(mine, errs, strict=True):
                assert a <= 1.5 * b + 2e-3, (mine, errs)
    assert max(mine) < 0.1
    assert torch.isfinite(torch.stack(mine)).all()


def test_half_spans_without_gradients_equal_those_with_and_fp32_keeps_sdpa():
    """A reference pass (no gradients) must give the policy pass's very numbers: the same kernel, bit for bit."""
    from lorakit.models.attention import _span_attention

    q, k, v = (torch.randn(1, 4, 12, 8) for _ in range(3))
    assert _span_attention(q.requires_grad_(), k, v, 0, 4, 12, 0, 4, 0.0, None).grad_fn.name() != \
        "_HalfSpanAttentionBackward"  # fp32: PyTorch's kernel
    half = [t.detach().bfloat16() for t in (q, k, v)]
    with_grads = _span_attention(half[0].requires_grad_(), *half[1:], 0, 4, 12, 0, 4, 0.0, None)
    with torch.no_grad():
        assert torch.equal(_span_attention(*half, 0, 4, 12, 0, 4, 0.0, None), with_grads)
