"""Prefix sharing: which rows share, and a shared prefill equals prefilling each prompt alone (logits to
1e-6, and the cache it leaves: the next steps' log-probs and tokens).

The model runs in float64 here: in float32 any batched prefill, shared or not, differs from a prompt run
alone by a few ulps of the logits (about 1e-6 at logits of 3.5: padding changes the reduction order), so
float32 could not tell a wrong cache row from rounding at this tolerance."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit as lk
from lorakit.generate import Row, SamplingParams
from lorakit.generate.continuous import AdapterContext, Running
from lorakit.generate.prefix import plan_groups, prefill
from lorakit.generate.rows import special_ids

SYSTEM = "You are a terse assistant. Answer in one word.\n"


def test_plan_groups_shares_the_longest_common_blocks_per_adapter():
    a, b, c = list(range(20)), list(range(12)) + [99] * 5, [7] * 30
    # k rows sharing p tokens save (k - 1) * p: b (12 tokens in common with a) joins two copies of a
    # (2 * 12 saved > 19) but not three (3 * 12 < 2 * 19); c shares nothing; y's rows are apart
    groups = plan_groups([a, a, b, c, a, a], ["x", "x", "x", "x", "x", "y"], min_shared=8)
    assert sorted((p, sorted(rows)) for p, rows in groups) == [(0, [2]), (0, [3]), (0, [5]), (19, [0, 1, 4])]
    groups = plan_groups([a, b, a, c], [None] * 4, min_shared=8)
    assert sorted((p, sorted(rows)) for p, rows in groups) == [(0, [3]), (12, [0, 1, 2])]
    assert plan_groups([a[:9], a[:9]], [None, None], min_shared=8) == [(8, [0, 1])]  # the last token stays out
    assert plan_groups([a[:8], a[:8]], [None, None], min_shared=8) == [(0, [0]), (0, [1])]  # 7 shared: too few


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    for seed, name in enumerate(["a", "b"]):
        torch.manual_seed(20 + seed)
        lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), name)
    lk.set_active(model, [])
    prompts = [SYSTEM + "hi", SYSTEM + "hi", SYSTEM + "what is two plus two?", "zebra", SYSTEM + "hi", SYSTEM + "ok"]
    ids = [tok(p)["input_ids"] for p in prompts]
    return model, tok, ids, ["a", "a", "a", "a", "b", None]


def test_shared_prefill_logits_equal_each_prompt_alone(setup):
    model, tok, ids, names = setup
    groups = plan_groups(ids, names)
    assert any(p >= len(SYSTEM) for p, rows in groups if len(rows) > 1)  # the system prompt is shared
    ctx = AdapterContext(model)
    with torch.no_grad():
        shared, _, mask = prefill(model, ids, names, tok.pad_token_id, groups, ctx.use)
        plain, _, _ = prefill(model, ids, names, tok.pad_token_id, [(0, [i]) for i in range(len(ids))], ctx.use)
        alone = torch.cat([prefill(model, [p], [n], tok.pad_token_id, [(0, [0])], ctx.use)[0]
                           for p, n in zip(ids, names, strict=True)])
    ctx.close()
    assert (mask.sum(1) == torch.tensor([len(p) for p in ids])).all()  # every row holds its own prompt's tokens
    torch.testing.assert_close(shared, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(shared, alone, atol=1e-6, rtol=0)
    assert not torch.allclose(shared[0], shared[4])  # same prompt, other adapter: the adapters do matter


def test_rows_admitted_with_a_shared_prefix_decode_as_without(setup):
    model, tok, ids, names = setup
    eos_ids, pad_id = special_ids(model, tok)

    def run(sharing):
        params = [SamplingParams(max_tokens=10, temperature=0)] * 4 + [SamplingParams(max_tokens=10, seed=5)] * 2
        rows = [Row(p, n, s) for p, n, s in zip(ids, names, params, strict=True)]
        running = Running(model, tok, eos_ids, pad_id, prefix_sharing=sharing, logprobs=True)
        running.admit(rows)
        while len(running):
            running.drop_done()
            running.step()
        return rows, running

    shared, with_sharing = run(True)
    plain, without = run(False)
    assert [r.tokens for r in shared] == [r.tokens for r in plain]
    for a, b in zip(shared, plain, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-6, rtol=0)
    total = sum(map(len, ids))
    assert without.prefill_tokens == total and without.shared_tokens == 0
    assert with_sharing.prefill_tokens == total - with_sharing.shared_tokens
    assert with_sharing.shared_tokens == 2 * len(SYSTEM)  # adapter a's three rows share the system prompt
