"""GRPO's completion log-probs against a plain computation: the chunked head with a temperature equals
log_softmax(logits / T) and its autograd gradient (fp32 and bf16); the packed layout (each prompt once, its
completions after it) and the padded rows equal each completion scored alone, values and LoRA gradients, on
llama, qwen2 and gpt2; the cost model packs short completions and not long ones."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_gpt2, tiny_llama, tiny_qwen2

import lorakit as lk
from lorakit.generate import Completion
from lorakit.train.objectives.grpo import GRPO
from lorakit.train.objectives.grpo_logps import completion_logps, completions_per_row, shared_rows
from lorakit.train.objectives.logps import head_logps
from lorakit.train.recipe import TrainConfig

T = 0.7


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_head_logps_with_a_temperature_equals_log_softmax_and_autograd(dtype, tol, temperature):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g).to(dtype)
    w = torch.randn(50, 16, generator=g).to(dtype)
    y = torch.randint(0, 50, (37,), generator=g)
    up = torch.randn(37, generator=g)
    h1 = h.clone().requires_grad_()
    got = head_logps(h1, w, y, chunk_bytes=16 * 4 * 50, temperature=temperature)  # 16 rows a chunk: 3 chunks
    (got * up).sum().backward()
    h2 = h.clone().requires_grad_()
    ref = torch.log_softmax((h2 @ w.T).float() / temperature, dim=-1).gather(1, y[:, None]).squeeze(1)
    (ref * up).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), rtol=tol, atol=tol)
    with torch.no_grad():  # no gradient pass: the same values
        torch.testing.assert_close(head_logps(h, w, y, temperature=temperature), got.detach())


def _adapted(builder, targets="all-linear"):
    model = builder()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # gpt2's dropout would make train-mode forwards differ
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)  # a trained adapter
    return model.train()


def _batch(vocab: int):
    """Two groups of 3 completions (prompts of 5 and 3 tokens), one group of 2 split off the end, ragged
    completions (one of a single token), collated as GRPO does."""
    g = torch.Generator().manual_seed(2)

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    prompts = [ids(5), ids(3), ids(4)]
    comps = []
    for p, lens in zip(prompts, ([4, 1, 6], [3, 5, 2], [2, 6]), strict=True):
        comps += [Completion(p, ids(n), "", "stop", None) for n in lens]
    cfg = TrainConfig(objective="grpo", reward="math:fsum", num_generations=2, batch_size=8,
                      max_completion_length=6, temperature=T)
    objective = GRPO(cfg)
    objective.pad = 0
    return comps, objective.collate(comps, torch.linspace(-1, 1, len(comps)), torch.zeros(len(comps), dtype=bool))


def _alone(model, comps):
    """Each completion scored alone: one unpadded row, full logits, log_softmax(logits / T)."""
    out = []
    for c in comps:
        row = torch.tensor([c.prompt_ids + c.token_ids])
        logits = model(input_ids=row).logits[0, len(c.prompt_ids) - 1:-1].float() / T
        out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1))
    return out


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2, tiny_gpt2])
@pytest.mark.parametrize("per_row", [1, 2, 3])
def test_packed_and_padded_rows_equal_each_completion_alone(builder, per_row):
    model = _adapted(builder)
    comps, batch = _batch(model.config.vocab_size)
    assert (shared_rows(batch, 32, None, per_row) is None) == (per_row == 1)
    _check_against_alone(model, comps, batch, per_row)


def test_an_adapted_head_takes_the_model_logits():
    """LoRA on lm_head: the head is no plain frozen Linear, so the model's own logits score the tokens."""
    model = _adapted(tiny_llama, ["q_proj", "v_proj", "lm_head"])
    comps, batch = _batch(model.config.vocab_size)
    _check_against_alone(model, comps, batch, None)
    assert any("lm_head" in n for n in _lora_grads(model))


def _check_against_alone(model, comps, batch, per_row):
    weights = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(3))
    got = completion_logps(model, batch, T, per_row=per_row)
    (got * weights).sum().backward()
    mine = _lora_grads(model)
    model.zero_grad()
    ref = _alone(model, comps)
    sum((r * weights[i, :len(r)]).sum() for i, r in enumerate(ref)).backward()
    theirs = _lora_grads(model)
    for i, r in enumerate(ref):
        torch.testing.assert_close(got[i, :len(r)], r, rtol=1e-5, atol=1e-5)
        assert not got[i, len(r):].any()  # padding scores 0
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_packed_layout_holds_each_prompt_once_per_row():
    _, batch = _batch(50)
    packed = shared_rows(batch, hidden_size=1024, per_row=3)
    ids = packed["inputs"]["input_ids"]
    assert ids.shape == (3, 5 + 4 + 1 + 6)  # a row per prompt: prompt and its completions, no prompt repeated
    assert int(packed["inputs"]["attention_mask"][0, 0].sum()) > 0
    assert len(packed["targets"]) == int(batch["attention_mask"][:, -6:].sum())
    assert shared_rows(batch, hidden_size=1024, per_row=1) is None  # k = 1: the padded rows
    assert shared_rows(batch, hidden_size=1024, window=8, per_row=3) is None  # a sliding window would bind


def test_the_cost_model_packs_short_completions_and_not_long_ones():
    groups = [list(range(8)), list(range(8, 16))]  # 2 prompts x 8 completions (the demo's micro-batch)
    assert completions_per_row(groups, [60] * 16, 12, hidden_size=576) == 8
    assert completions_per_row(groups, [200] * 16, 1024, hidden_size=576) == 1
    assert 1 < completions_per_row(groups, [400] * 16, 128, hidden_size=576) < 8
