"""Preference losses against hand-written formulas (numbers, not the code under test), their gradients
against autograd of those formulas, and sequence log-probs against a plain log_softmax/gather."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from builders import tiny_llama

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.train.objectives.logps import head_logps

PC, PR, RC, RR = -12.0, -15.0, -13.0, -14.0  # summed log-probs of one pair
NC, NR = 4, 6  # completion tokens


def sig(x):
    return 1 / (1 + math.exp(-x))


def one(**kw):
    t = torch.tensor
    out = lk.preference_loss(t([PC]), t([PR]), t([RC]), t([RR]), chosen_tokens=t([NC]), rejected_tokens=t([NR]), **kw)
    return float(out.losses[0]), float(out.chosen_rewards[0]), float(out.rejected_rewards[0]), out


def test_dpo_sigmoid_with_and_without_label_smoothing():
    delta = (PC - RC) - (PR - RR)  # 2.0
    loss, rc, rr, _ = one()
    assert loss == pytest.approx(-math.log(sig(0.1 * delta)), rel=1e-6)
    assert (rc, rr) == pytest.approx((0.1 * (PC - RC), 0.1 * (PR - RR)), rel=1e-6)
    loss, *_ = one(beta=0.5, label_smoothing=0.2)
    assert loss == pytest.approx(-0.8 * math.log(sig(0.5 * delta)) - 0.2 * math.log(sig(-0.5 * delta)), rel=1e-6)


def test_dpo_hinge_and_ipo():
    assert one(loss_type="hinge", beta=0.2)[0] == pytest.approx(max(0.0, 1 - 0.2 * 2.0), rel=1e-6)
    assert one(loss_type="hinge", beta=1.0)[0] == 0.0
    ipo = ((PC - RC) / NC - (PR - RR) / NR - 1 / (2 * 0.1)) ** 2
    assert one(loss_type="ipo")[0] == pytest.approx(ipo, rel=1e-6)


def test_orpo_and_simpo_use_per_token_means_and_no_reference():
    ac, ar = PC / NC, PR / NR
    log_odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
    loss, rc, rr, out = one(objective="orpo")
    assert loss == pytest.approx(-ac - 0.1 * math.log(sig(log_odds)), rel=1e-6)
    assert (rc, rr) == pytest.approx((0.1 * ac, 0.1 * ar), rel=1e-6)
    assert float(out.chosen_logps[0]) == pytest.approx(ac)
    loss, rc, rr, _ = one(objective="simpo")  # beta 2, gamma 1
    assert loss == pytest.approx(-math.log(sig(2.0 * (ac - ar) - 1.0)), rel=1e-6)
    assert (rc, rr) == pytest.approx((2 * ac, 2 * ar), rel=1e-6)
    loss, *_ = one(objective="simpo", beta=2.5, simpo_gamma=0.3, label_smoothing=0.1)
    z = 2.5 * (ac - ar) - 0.3
    assert loss == pytest.approx(-0.9 * math.log(sig(z)) - 0.1 * math.log(sig(-z)), rel=1e-6)
    t = torch.tensor([0.0])
    assert one(objective="simpo")[0] == float(lk.preference_loss(
        torch.tensor([PC]), torch.tensor([PR]), t + 99, t - 99, objective="simpo", chosen_tokens=torch.tensor([NC]),
        rejected_tokens=torch.tensor([NR])).losses[0])  # the reference plays no part


def test_orpo_log_odds_stay_finite_near_probability_one():
    t = torch.tensor
    out = lk.preference_loss(t([-1e-7]), t([-30.0]), objective="orpo", chosen_tokens=t([1]), rejected_tokens=t([1]))
    assert torch.isfinite(out.losses).all()


@pytest.mark.parametrize("kw", [{}, {"loss_type": "ipo"}, {"loss_type": "hinge", "beta": 0.05},
                                {"label_smoothing": 0.1}, {"objective": "orpo"}, {"objective": "simpo"}])
def test_gradients_equal_autograd_of_the_reference_formula(kw):
    g = torch.Generator().manual_seed(0)
    pc, pr = (-torch.rand(5, generator=g, dtype=torch.float64) * 20 for _ in range(2))
    rc, rr = pc.detach() + torch.randn(5, generator=g, dtype=torch.float64), pr.detach() + 1
    nc, nr = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([7, 2, 5, 9, 1])
    pc.requires_grad_(True), pr.requires_grad_(True)
    lk.preference_loss(pc, pr, rc, rr, chosen_tokens=nc, rejected_tokens=nr, **kw).losses.sum().backward()
    ours = (pc.grad.clone(), pr.grad.clone())
    pc.grad = pr.grad = None
    objective, loss_type = kw.get("objective", "dpo"), kw.get("loss_type", "sigmoid")
    beta, eps = kw.get("beta", {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}[objective]), kw.get("label_smoothing", 0.0)
    ls = torch.nn.functional.logsigmoid
    if objective == "dpo" and loss_type == "sigmoid":
        d = beta * ((pc - rc) - (pr - rr))
        ref = -(1 - eps) * ls(d) - eps * ls(-d)
    elif loss_type == "ipo":
        ref = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        ref = (1 - beta * ((pc - rc) - (pr - rr))).clamp(min=0)
    elif objective == "orpo":
        ac, ar = pc / nc, pr / nr
        ref = -ac - beta * ls((ac - ar) - (torch.log(1 - ac.exp()) - torch.log(1 - ar.exp())))
    else:
        ref = -ls(beta * (pc / nc - pr / nr) - 1.0)
    ref.sum().backward()
    torch.testing.assert_close(ours[0], pc.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[1], pr.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("kw", "message"), [
    ({"loss_type": "kto"}, "loss_type must be one of"), ({"beta": 0.0}, "beta must be > 0"),
    ({"label_smoothing": 0.5}, r"\[0, 0.5\)"), ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid losses"),
    ({"objective": "orpo", "loss_type": "hinge"}, "DPO loss"),
])
def test_bad_settings_are_named(kw, message):
    t = torch.tensor([-1.0])
    with pytest.raises(ConfigError, match=message):
        lk.preference_loss(t, t - 1, t, t, chosen_tokens=t, rejected_tokens=t, **kw)


# ---- sequence log-probs ---------------------------------------------------------------------------------

def pairs_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [(3, 4, 2), (5, 1, 6), (2, 7, 3)]  # (prompt, chosen, rejected)
    pairs = [tuple(torch.randint(1, 96, (n,), generator=g).tolist() for n in ls) for ls in lengths]
    from lorakit.data.preference import collate_pairs

    return collate_pairs(pairs, 0), pairs


def plain_logps(model, ids, n_prompt, n_comp):
    """log_softmax/gather over one unpadded sequence's completion tokens."""
    logits = model(torch.tensor([ids])).logits[0].float()
    lp = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return lp[n_prompt - 1:n_prompt - 1 + n_comp].sum()


def lora_model(dtype=torch.float32):
    model = tiny_llama().to(dtype)
    torch.manual_seed(2)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "logits"])
def test_sequence_logps_equal_a_plain_log_softmax_gather_row_by_row(fused, monkeypatch):
    model = lora_model()
    if not fused:
        monkeypatch.setattr("lorakit.train.objectives.logps.fused_head", lambda m: None)
    batch, pairs = pairs_batch()
    out = lk.sequence_logps(model, batch)
    for i, (p, c, r) in enumerate(pairs):
        with torch.no_grad():
            assert float(out.chosen[i]) == pytest.approx(float(plain_logps(model, p + c, len(p), len(c))), abs=1e-5)
            assert float(out.rejected[i]) == pytest.approx(float(plain_logps(model, p + r, len(p), len(r))),
                                                           abs=1e-5)
        assert (int(out.chosen_tokens[i]), int(out.rejected_tokens[i])) == (len(c), len(r))
    assert out.chosen.dtype == torch.float32


def test_gradients_of_the_fused_head_equal_the_plain_path():
    model = lora_model()
    batch, pairs = pairs_batch(1)
    w = torch.tensor([0.3, -1.2, 0.7])
    out = lk.sequence_logps(model, batch)
    (out.chosen @ w - out.rejected @ w.flip(0)).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total = sum(w[i] * plain_logps(model, p + c, len(p), len(c)) - w.flip(0)[i] * plain_logps(model, p + r, len(p),
                                                                                              len(r))
                for i, (p, c, r) in enumerate(pairs))
    total.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6)


def test_head_logps_in_chunks_equal_one_chunk():
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (50,), generator=g)
    ref = torch.log_softmax(h @ w.T, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(head_logps(h, w, y, chunk_bytes=16 * 4 * 30), ref)


def test_chosen_and_rejected_together_equal_them_apart():
    model = lora_model()
    batch, pairs = pairs_batch(2)
    from lorakit.data.preference import collate_pairs

    with torch.no_grad():
        together = lk.sequence_logps(model, batch)
        alone_all = [lk.sequence_logps(model, collate_pairs([pair], 0)) for pair in pairs]
    for i, alone in enumerate(alone_all):
        assert float(alone.chosen[0]) == pytest.approx(float(together.chosen[i]), abs=1e-5)
        assert float(alone.rejected[0]) == pytest.approx(float(together.rejected[i]), abs=1e-5)


def test_the_reference_under_disable_adapters_is_the_base_without_lora():
    base = tiny_llama()
    model = copy.deepcopy(base)
    torch.manual_seed(2)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    batch, _ = pairs_batch(3)
    with torch.no_grad():
        plain = lk.sequence_logps(base, batch)
        with lk.disable_adapters(model):
            ref = lk.sequence_logps(model, batch)
        policy = lk.sequence_logps(model, batch)
    assert (ref.chosen - plain.chosen).abs().max() <= 1e-6 and (ref.rejected - plain.rejected).abs().max() <= 1e-6
    assert (policy.chosen - plain.chosen).abs().max() > 1e-3
