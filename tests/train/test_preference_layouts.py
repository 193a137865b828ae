"""Preference pairs packed into one row (``collate_pairs`` layouts "packed" and "shared") against each
sequence alone through a plain log_softmax/gather, and against the padded layout: sums, counts, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from builders import tiny_llama, tiny_qwen2

import lorakit as lk
from lorakit.data.preference import collate_pairs
from lorakit.errors import ConfigError
from lorakit.models.attention import NAME, packed_attention_for

LENGTHS = [(3, 4, 2), (5, 1, 6), (2, 7, 3), (1, 3, 3)]  # (prompt, chosen, rejected)


def make_pairs(seed: int, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(1, 80, (n,), generator=g).tolist() for n in ls) for ls in lengths]


def lora_model(make=tiny_llama):
    model = make()
    torch.manual_seed(2)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert packed_attention_for(model) == NAME
    return model


def plain_logps(model, ids, n_prompt, n_comp):
    """log_softmax/gather over one unpadded sequence's completion tokens (the first one is unscored when
    the prompt is empty: nothing predicts it)."""
    logits = model(torch.tensor([ids])).logits[0].float()
    lp = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return lp[max(n_prompt - 1, 0):n_prompt - 1 + n_comp].sum()


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "logits"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_packed_pairs_equal_each_sequence_alone(layout, fused, make, monkeypatch):
    model = lora_model(make)
    if not fused:
        monkeypatch.setattr("lorakit.train.objectives.logps.fused_head", lambda m: None)
    pairs = make_pairs(0)
    batch = collate_pairs(pairs, 0, layout)
    assert batch["input_ids"].shape[0] == 1
    n_tokens = sum(len(p) * (1 if layout == "shared" else 2) + len(c) + len(r) for p, c, r in pairs)
    assert batch["input_ids"].shape[1] == n_tokens
    out = lk.sequence_logps(model, batch)
    padded = lk.sequence_logps(model, collate_pairs(pairs, 0))
    with torch.no_grad():
        for i, (p, c, r) in enumerate(pairs):
            assert float(out.chosen[i]) == pytest.approx(float(plain_logps(model, p + c, len(p), len(c))), abs=1e-5)
            assert float(out.rejected[i]) == pytest.approx(float(plain_logps(model, p + r, len(p), len(r))),
                                                           abs=1e-5)
            assert (int(out.chosen_tokens[i]), int(out.rejected_tokens[i])) == (len(c), len(r))
    torch.testing.assert_close(out.chosen, padded.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.rejected, padded.rejected, atol=1e-5, rtol=0)
    assert torch.equal(out.chosen_tokens, padded.chosen_tokens)


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_gradients_of_packed_pairs_equal_the_sequences_alone(layout):
    model = lora_model()
    pairs = make_pairs(1)
    w = torch.tensor([0.3, -1.2, 0.7, 2.0])
    out = lk.sequence_logps(model, collate_pairs(pairs, 0, layout))
    (out.chosen @ w - out.rejected @ w.flip(0)).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total = sum(w[i] * plain_logps(model, p + c, len(p), len(c))
                - w.flip(0)[i] * plain_logps(model, p + r, len(p), len(r)) for i, (p, c, r) in enumerate(pairs))
    total.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=5e-6)  # float32 sums in another order


def test_an_empty_prompt_scores_the_same_tokens_in_every_layout():
    model = lora_model()
    pairs = make_pairs(2, [(0, 4, 3), (2, 3, 5)])
    padded = lk.sequence_logps(model, collate_pairs(pairs, 0))
    for layout in ("packed", "shared"):
        out = lk.sequence_logps(model, collate_pairs(pairs, 0, layout))
        torch.testing.assert_close(out.chosen, padded.chosen, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.rejected, padded.rejected, atol=1e-5, rtol=0)
        assert torch.equal(out.rejected_tokens, padded.rejected_tokens)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_a_width_rounded_up_scores_the_same_tokens(layout):
    """pad_to_multiple_of: the width becomes a multiple, the sums and gradients are the unrounded ones (a packed
    row's padding is a span of its own), and attention_mask still counts the pairs' tokens only."""
    model = lora_model()
    pairs = make_pairs(4)
    w = torch.tensor([0.3, -1.2, 0.7, 2.0])

    def figures(batch):
        out = lk.sequence_logps(model, batch)
        (out.chosen @ w - out.rejected @ w.flip(0)).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
        return out, grads

    plain, rounded = collate_pairs(pairs, 0, layout), collate_pairs(pairs, 0, layout, pad_to_multiple_of=16)
    width = plain["input_ids"].shape[1]
    assert width % 16 and rounded["input_ids"].shape[1] == -(-width // 16) * 16
    assert int(rounded["attention_mask"].sum()) == int(plain["attention_mask"].sum())
    if layout != "padded":
        assert rounded["position_ids"][0, width:].tolist() == list(range(rounded["input_ids"].shape[1] - width))
        assert torch.equal(rounded["score_index"], plain["score_index"])
    (a, ga), (b, gb) = figures(plain), figures(rounded)
    torch.testing.assert_close(b.chosen, a.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.rejected, a.rejected, atol=1e-5, rtol=0)
    assert torch.equal(b.chosen_tokens, a.chosen_tokens) and torch.equal(b.rejected_tokens, a.rejected_tokens)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=5e-6)
    assert collate_pairs(pairs, 0, layout, pad_to_multiple_of=width)["input_ids"].shape[1] == width  # already one
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        collate_pairs(pairs, 0, layout, pad_to_multiple_of=-1)


def test_the_shared_layout_needs_lorakits_packed_attention():
    model = tiny_llama()
    batch = collate_pairs(make_pairs(3), 0, "shared")
    with pytest.raises(ConfigError, match="packed_attention_for"):
        lk.sequence_logps(model, batch)
    lk.sequence_logps(model, collate_pairs(make_pairs(3), 0, "packed"))  # the block mask reads this one


def test_preference_batch_takes_a_layout():
    with pytest.raises(ValueError, match="padded, packed, shared"):
        collate_pairs(make_pairs(0), 0, "interleaved")


def test_a_bf16_base_shares_prompts_through_the_half_precision_kernel(monkeypatch):
    """bf16 base, fp32 LoRA: the shared layout's spans run ``_HalfSpanAttention`` and land as close to the fp32
    figures (sums and LoRA gradients) as TRL's padded rows through SDPA in bf16 do."""
    from lorakit.models import attention

    calls = []
    real = attention._HalfSpanAttention.apply
    monkeypatch.setattr(attention._HalfSpanAttention, "apply", lambda *a: calls.append(a[3]) or real(*a))
    pairs = make_pairs(3, [(6, 9, 7), (4, 5, 11), (8, 6, 6)])
    w = torch.tensor([0.5, -1.0, 1.5])

    def figures(model, layout):
        out = lk.sequence_logps(model, collate_pairs(pairs, 0, layout))
        (out.chosen @ w - out.rejected @ w.flip(0)).backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
        return torch.cat([out.chosen, out.rejected]).detach(), grads

    model = lora_model()
    want = figures(model, "padded")
    model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights stay fp32 over a bf16 base, as lorakit trains them
    shared, padded = figures(model, "shared"), figures(model, "padded")
    assert calls and 0 in calls and any(k > 0 for k in calls)  # root spans and the rejected spans after a prompt
    for ours, theirs, ref in zip(shared, padded, want, strict=True):
        scale = ref.abs().max()
        assert (ours - ref).abs().max() <= 2 * (theirs - ref).abs().max() + 0.02 * scale


def test_dpo_starts_at_log_2_on_a_bf16_base_in_every_layout():
    """B = 0: the policy pass (gradients on) and the reference pass (adapters off, no gradients) are one function,
    so every pair's policy and reference sums are equal and the first loss is ln 2 exactly."""
    from lorakit.train.losses.preference import preference_loss

    model = tiny_llama()
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))  # B = 0
    packed_attention_for(model)
    model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    pairs = make_pairs(4, [(6, 9, 7), (4, 5, 11)])
    for layout in ("padded", "packed", "shared"):
        batch = collate_pairs(pairs, 0, layout)
        pol = lk.sequence_logps(model, batch)
        with torch.no_grad(), lk.disable_adapters(model):
            ref = lk.sequence_logps(model, batch)
        assert torch.equal(pol.chosen, ref.chosen) and torch.equal(pol.rejected, ref.rejected), layout
        out = preference_loss(pol.chosen, pol.rejected, ref.chosen, ref.rejected, objective="dpo")
        torch.testing.assert_close(out.losses, torch.full((2,), math.log(2.0)), rtol=0, atol=1e-7)
