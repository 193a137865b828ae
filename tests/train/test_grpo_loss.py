"""GRPO's pure pieces (lorakit/train/losses/grpo.py) against hand-written references: advantages from the
statistics module, every loss type as explicit loops over tokens, gradients from autograd of those loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lorakit.train.losses.grpo import group_advantages, per_token_terms, policy_metrics, reduce_loss

REWARDS = [1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 1.0, 3.0]  # two groups of G = 4
MASK = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
L_MAX = 5


def ref_advantages(rewards, g, scale):
    out = []
    groups = [rewards[i:i + g] for i in range(0, len(rewards), g)]
    batch_std = statistics.stdev(rewards)
    for grp in groups:
        mean = statistics.fmean(grp)
        std = {"group": statistics.stdev(grp), "batch": batch_std, "none": None}[scale]
        out += [(r - mean) / (std + 1e-4) if std is not None else r - mean for r in grp]
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_the_formula(scale):
    adv, zero = group_advantages(torch.tensor(REWARDS), 4, scale)
    assert adv.tolist() == pytest.approx(ref_advantages(REWARDS, 4, scale), rel=1e-6)
    assert not zero.any()


def test_a_group_without_spread_has_zero_advantage_and_is_counted():
    adv, zero = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, "group")
    assert adv[:2].tolist() == [0.0, 0.0]
    assert zero.tolist() == [True, True, False, False]
    assert adv[2:].tolist() == pytest.approx([-0.5 / (math.sqrt(0.5) + 1e-4), 0.5 / (math.sqrt(0.5) + 1e-4)])


def test_unscorable_completions_leave_the_baseline_and_get_zero():
    nan = math.nan
    adv, _ = group_advantages(torch.tensor([1.0, nan, 0.0, 2.0]), 4, "group")
    std = statistics.stdev([1.0, 0.0, 2.0])
    assert adv[1] == 0.0
    assert adv[[0, 2, 3]].tolist() == pytest.approx([0.0, -1 / (std + 1e-4), 1 / (std + 1e-4)], rel=1e-6)


def fixed_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, 5, generator=g) * 3
    old = logps + (torch.rand(4, 5, generator=g) - 0.5) * 0.8  # ratios up to ~1.5 either way: some clip
    ref = logps + (torch.rand(4, 5, generator=g) - 0.5)
    adv = torch.tensor([1.5, -0.7, 0.3, -1.2])
    return logps, old, ref, adv, torch.tensor(MASK)


def ref_loss(logps, old, ref, adv, mask, loss_type, eps=0.2, eps_high=0.28, beta=0.04, bias_kl=True):
    """The objective written token by token (each term a torch scalar so autograd can differentiate it)."""
    per_seq, total, count = [], 0.0, 0
    for i in range(len(mask)):
        s, n = 0.0, 0
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            lp = logps[i, t]
            rho = torch.exp(lp - (old[i, t] if old is not None else lp.detach()))
            term = -torch.minimum(rho * adv[i], torch.clamp(rho, 1 - eps, 1 + eps_high) * adv[i])
            if beta:
                d = ref[i, t] - lp
                kl = torch.exp(d) - d - 1
                term = term + beta * (kl * rho if bias_kl else kl)
            s, n = s + term, n + 1
        per_seq.append(s / max(n, 1))
        total, count = total + s, count + n
    rows = len(mask)
    return {"grpo": sum(per_seq) / rows, "bnpo": total / count, "dapo": total / count,
            "dr_grpo": total / (rows * L_MAX)}[loss_type]


def lorakit_loss(logps, old, ref, adv, mask, loss_type, eps=0.2, eps_high=0.28, beta=0.04, bias_kl=True):
    terms = per_token_terms(logps, adv, old, ref, epsilon=eps, epsilon_high=eps_high, beta=beta,
                            bias_correction_kl=bias_kl)
    total, units = reduce_loss(terms.loss, mask, loss_type, L_MAX)
    return total / units


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("bias_kl", [True, False])
def test_every_loss_type_and_its_gradient_equal_the_reference(loss_type, beta, bias_kl):
    logps, old, ref, adv, mask = fixed_inputs()
    a = logps.clone().requires_grad_()
    b = logps.clone().requires_grad_()
    mine = lorakit_loss(a, old, ref, adv, mask, loss_type, beta=beta, bias_kl=bias_kl)
    theirs = ref_loss(b, old, ref, adv, mask.tolist(), loss_type, beta=beta, bias_kl=bias_kl)
    mine.backward()
    theirs.backward()
    assert float(mine.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert (a.grad[mask == 0] == 0).all()  # padding never moves the policy


def test_some_ratios_clip_in_the_fixed_inputs_and_the_metrics_count_them():
    logps, old, ref, adv, mask = fixed_inputs()
    terms = per_token_terms(logps, adv, old, ref, epsilon=0.2, epsilon_high=0.28, beta=0.04)
    m = policy_metrics(terms, adv, mask, 0.2, 0.28)
    low = high = 0
    n = int(mask.sum())
    for i in range(4):
        for t in range(5):
            if mask[i, t]:
                rho = math.exp(float(logps[i, t] - old[i, t]))
                low += rho < 0.8 and adv[i] < 0
                high += rho > 1.28 and adv[i] > 0
    assert low + high > 0  # the test exercises clipping
    assert m["clip_ratio/low_mean"] == (low, n) and m["clip_ratio/high_mean"] == (high, n)
    assert m["clip_ratio/region_mean"] == (low + high, n)
    # TRL logs the KL term as it enters the loss: k·ρ with its default bias correction
    kl_rho = sum((math.exp(float(ref[i, t] - logps[i, t])) - float(ref[i, t] - logps[i, t]) - 1)
                 * math.exp(float(logps[i, t] - old[i, t])) for i in range(4) for t in range(5) if mask[i, t])
    assert m["kl"][0] == pytest.approx(kl_rho, rel=1e-5) and m["kl"][1] == n


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_one_step_per_rollout_batch_clipped_equals_unclipped(loss_type):
    """ρ = 1 (old = current, detached): the clip never binds, so values and gradients match ε = ∞."""
    logps, _, ref, adv, mask = fixed_inputs(1)
    grads = []
    for eps in (0.2, 1e9):
        x = logps.clone().requires_grad_()
        loss = lorakit_loss(x, None, ref, adv, mask, loss_type, eps=eps, eps_high=eps, beta=0.0)
        loss.backward()
        grads.append((float(loss.detach()), x.grad))
    assert grads[0][0] == grads[1][0]
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
    # the value is -Σ A_i·(tokens) / normaliser and the gradient -A_i / normaliser on each counted token
    per_token = -adv.unsqueeze(1) * mask
    norm = {"grpo": mask.sum(1, keepdim=True) * 4, "dr_grpo": torch.tensor(4.0 * L_MAX),
            "bnpo": mask.sum(), "dapo": mask.sum()}[loss_type]
    torch.testing.assert_close(grads[0][1], per_token / norm, rtol=1e-6, atol=1e-7)
    assert grads[0][0] == pytest.approx(float((per_token / norm).sum()), rel=1e-5, abs=1e-7)


def test_micro_batch_sums_over_units_give_the_global_figure():
    """The loop divides summed losses by summed units: split two ways, dapo's and grpo's figure is the one of
    the whole batch (bnpo's is TRL's mean of the micro-batches' token means)."""
    logps, old, ref, adv, mask = fixed_inputs(2)
    terms = per_token_terms(logps, adv, old, ref, beta=0.04)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        whole = reduce_loss(terms.loss, mask, loss_type, L_MAX)
        parts = [reduce_loss(terms.loss[s], mask[s], loss_type, L_MAX) for s in (slice(0, 1), slice(1, 4))]
        assert float(sum(p[0] for p in parts)) / sum(p[1] for p in parts) == pytest.approx(
            float(whole[0]) / whole[1], rel=1e-6)
    parts = [reduce_loss(terms.loss[s], mask[s], "bnpo") for s in (slice(0, 2), slice(2, 4))]
    means = [float((terms.loss[s] * mask[s]).sum() / mask[s].sum()) for s in (slice(0, 2), slice(2, 4))]
    assert float(sum(p[0] for p in parts)) / sum(p[1] for p in parts) == pytest.approx(sum(means) / 2, rel=1e-6)


def test_bad_arguments_are_named():
    logps, old, ref, adv, mask = fixed_inputs()
    with pytest.raises(ValueError, match="loss_type"):
        reduce_loss(logps, mask, "ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        per_token_terms(logps, adv, beta=0.1)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.zeros(5), 2)
