"""GRPO (Group Relative Policy Optimization) as pure functions over per-token log-probs, exactly TRL's
``GRPOTrainer._compute_loss`` and its advantages (DeepSeekMath; DAPO; Dr. GRPO).

For each prompt, G completions o_1..o_G are sampled and scored; with r_i the reward of o_i:

    advantage        A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-4)     mean/std over the prompt's group
                     (scale_rewards "group"; "batch": std over the whole batch; "none": no division)
    ratio            ρ_{i,t} = exp(log π_θ(o_{i,t}) - log π_old(o_{i,t}))   (π_old: the policy that sampled;
                     with one optimisation step per rollout batch π_old = π_θ detached, so ρ = 1)
    policy term      ℓ_{i,t} = -min(ρ A_i, clip(ρ, 1 - ε, 1 + ε_high) A_i)
    KL (k3)          k_{i,t} = exp(ref - logp) - (ref - logp) - 1,  ref = log π_ref(o_{i,t}); ℓ += β · k
                     (times ρ with ``bias_correction_kl``, TRL's default: the unbiased reverse-KL gradient)

and the per-token terms (mask m: the completion's real tokens) are reduced by ``loss_type``:

    grpo     mean over sequences of (Σ_t m ℓ / Σ_t m)          per-sequence token mean
    bnpo     Σ m ℓ / Σ m over the micro-batch                    token mean of each micro-batch
    dr_grpo  Σ m ℓ / (rows × max_completion_length)              a constant denominator
    dapo     Σ m ℓ / Σ m over the whole global batch            token mean of the global batch

``reduce_loss`` returns each as (a sum, the units it sums over), the loop's contract: the training loop
divides the summed losses of all micro-batches by their summed units, which gives TRL's figure for any
split of the batch into micro-batches (for bnpo, TRL's mean over micro-batches of their token means).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN where fewer than 2 values)."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim)
    corr = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * corr)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of a batch's rewards, and which groups had no spread.

    Args:
        rewards: (N,) the summed reward of each completion, the G completions of a prompt consecutive;
            NaN for an unscorable completion (every reward function returned None): it is left out of its
            group's mean and std, and gets advantage 0.
        num_generations: G, completions per prompt (N a multiple of G).
        scale_rewards: "group" (divide by the group's std + 1e-4), "batch" (by the batch's std + 1e-4) or
            "none" (mean-centred only: Dr. GRPO).

    Returns:
        (advantages (N,), is_std_zero (N,) bool: the std used, group or batch, is 0 — for the
        ``frac_reward_zero_std`` metric).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of num_generations={num_generations}")
    grouped = rewards.view(-1, num_generations)  # (prompts, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


@dataclass
class PolicyTerms:
    """The per-token pieces of the GRPO objective, (B, T) each (``kl`` None when β = 0)."""

    loss: torch.Tensor  # ℓ_{i,t}: the clipped policy term, plus β·k
    ratio: torch.Tensor  # ρ_{i,t}
    kl: torch.Tensor | None  # k_{i,t}, the k3 estimate of KL(π_θ ‖ π_ref)


def per_token_terms(logps: torch.Tensor, advantages: torch.Tensor, old_logps: torch.Tensor | None = None,
                    ref_logps: torch.Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
                    beta: float = 0.0, bias_correction_kl: bool = True) -> PolicyTerms:
    """ℓ_{i,t}, ρ_{i,t} and k_{i,t} (module docstring).

    Args:
        logps: (B, T) log π_θ of each completion token, with gradient (the training forward's).
        advantages: (B,) one per completion.
        old_logps: (B, T) log π_old, the policy that sampled the batch (needed when a rollout batch is used for
            several optimisation steps); None: ``logps`` detached (ρ = 1, gradient A·∇log π).
        ref_logps: (B, T) log π_ref (the base model: adapters disabled); needed when beta != 0.
        epsilon: lower clipping range (ρ ≥ 1 - ε).
        epsilon_high: upper clipping range (ρ ≤ 1 + ε_high; DAPO's clip-higher); None: epsilon.
        beta: KL coefficient (0: no KL term, ``ref_logps`` unused).
        bias_correction_kl: multiply k by ρ (TRL's ``use_bias_correction_kl``, default True).
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps (the reference model's log-probs)")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if bias_correction_kl:
            kl = kl * ratio
        loss = loss + beta * kl
    return PolicyTerms(loss, ratio, kl)


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
                max_completion_length: int | None = None) -> tuple[torch.Tensor, float]:
    """(loss summed over units, units) of one micro-batch (module docstring's reductions).

    Args:
        per_token: (B, T) ℓ_{i,t}.
        mask: (B, T) 1 on the completion tokens that count, 0 on padding (and on masked truncated completions).
        loss_type: grpo, bnpo, dr_grpo or dapo.
        max_completion_length: dr_grpo's constant denominator per sequence.

    Units: sequences (grpo, dr_grpo), the micro-batch (bnpo: 1), tokens (dapo).
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    rows = float(per_token.shape[0])
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), rows
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0), 1.0
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        return masked.sum() / max_completion_length, rows
    if loss_type == "dapo":
        return masked.sum(), float(mask.sum())
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def policy_metrics(terms: PolicyTerms, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.2,
                   epsilon_high: float | None = None) -> dict[str, tuple[float, float]]:
    """TRL's clipping (and KL) figures as (sum, count) over the micro-batch's counted tokens.

    ``clip_ratio/low_mean``: share of tokens with ρ < 1 - ε and A < 0 (the clip binds from below);
    ``clip_ratio/high_mean``: ρ > 1 + ε_high and A > 0; ``clip_ratio/region_mean``: either; ``kl``: mean k.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    m = mask.bool()
    n = float(m.sum())
    adv = advantages.unsqueeze(1)
    ratio = terms.ratio.detach()
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    out = {"clip_ratio/low_mean": (float(low[m].sum()), n), "clip_ratio/high_mean": (float(high[m].sum()), n),
           "clip_ratio/region_mean": (float((low | high)[m].sum()), n)}
    if terms.kl is not None:
        out["kl"] = (float(terms.kl.detach()[m].sum()), n)
    return out
