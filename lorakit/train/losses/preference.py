"""Preference losses (DPO and its reference-free relatives) as pure functions over sequence log-probs.

Inputs per pair i: the policy's log-probs of the chosen and rejected completions, summed over their
tokens (``π_c``, ``π_r``), the reference model's (``ρ_c``, ``ρ_r``; DPO only) and the completions' token
counts (``n_c``, ``n_r``; ipo, ORPO and SimPO average per token). β is ``beta``, ε ``label_smoothing``.

DPO (Rafailov et al. 2023; TRL's ``DPOTrainer``), with the log-ratio margin Δ = (π_c − ρ_c) − (π_r − ρ_r):

    sigmoid   −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)        (ε > 0: conservative DPO, torchtune's and
                                                           TRL 0.x's label smoothing; TRL 1.x: ε = 0)
    hinge     max(0, 1 − β·Δ)                             (SLiC)
    ipo       ((π_c − ρ_c)/n_c − (π_r − ρ_r)/n_r − 1/(2β))²   (IPO, per-token log-ratios as TRL)
    rewards   β·(π_c − ρ_c) and β·(π_r − ρ_r)             defaults: β = 0.1

ORPO (Hong et al. 2024; TRL's ``ORPOTrainer``), reference-free, on the per-token means a_c = π_c/n_c,
a_r = π_r/n_r:

    log odds  L = (a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r}))
    loss      −a_c − β·log σ(L)                           (the chosen completion's NLL plus λ = β times
                                                           the odds-ratio term; β = 0.1)
    rewards   β·a_c and β·a_r

SimPO (Meng et al. 2024; TRL ``CPOTrainer``'s ``loss_type="simpo"``), reference-free:

    loss      −(1 − ε)·log σ(β·(a_c − a_r) − γ) − ε·log σ(−(β·(a_c − a_r) − γ))
    rewards   β·a_c and β·a_r                             defaults: β = 2.0, γ = 1.0 (γ/β = 0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ConfigError

OBJECTIVES = ("dpo", "orpo", "simpo")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}
DEFAULT_SIMPO_GAMMA = 1.0  # SimPO's γ/β = 0.5 at β = 2


@dataclass
class PreferenceLosses:
    """Per-pair figures, each (B,): ``losses`` carries the gradient; the rest are detached, for logging.

    ``chosen_logps``/``rejected_logps`` are the policy log-probs the loss compares: summed over the
    completion for DPO, per-token means for ORPO and SimPO (what TRL logs as ``logps/*``).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def check_preference_args(objective: str, loss_type: str, beta: float, label_smoothing: float) -> None:
    """Raise ConfigError naming the bad setting (called by the recipe before anything loads)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"preference objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if objective != "dpo" and loss_type != "sigmoid":
        raise ConfigError(f"loss_type {loss_type!r} is a DPO loss; {objective} has its own (leave loss_type sigmoid)")
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ConfigError(f"beta must be > 0, got {beta!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and (objective == "orpo" or loss_type != "sigmoid"):
        raise ConfigError(f"label_smoothing applies to the sigmoid losses of dpo and simpo, not {objective} "
                          f"{loss_type}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, without cancellation on either side of −ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    loss = -F.logsigmoid(logits)
    return (1 - eps) * loss - eps * F.logsigmoid(-logits) if eps else loss


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None, *,
                    objective: str = "dpo", loss_type: str = "sigmoid", beta: float | None = None,
                    label_smoothing: float = 0.0, simpo_gamma: float = DEFAULT_SIMPO_GAMMA,
                    chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None) -> PreferenceLosses:
    """Per-pair preference losses and rewards (formulas in this module's docstring).

    Args:
        policy_chosen, policy_rejected: (B,) the policy's summed completion log-probs.
        ref_chosen, ref_rejected: (B,) the reference's (DPO; ignored by the reference-free objectives).
        objective: "dpo", "orpo" or "simpo".
        loss_type: DPO's "sigmoid", "ipo" or "hinge".
        beta: β (None: 0.1 for dpo and orpo, 2.0 for simpo).
        label_smoothing: ε of the sigmoid losses, in [0, 0.5).
        simpo_gamma: SimPO's target margin γ.
        chosen_tokens, rejected_tokens: (B,) completion token counts (ipo, orpo, simpo).

    Returns:
        ``PreferenceLosses``: per-pair losses (mean them for the batch loss) and detached rewards and logps.
    """
    beta = DEFAULT_BETA.get(objective, 0.1) if beta is None else beta
    check_preference_args(objective, loss_type, beta, label_smoothing)
    pc, pr = policy_chosen.float(), policy_rejected.float()
    needs_counts = objective != "dpo" or loss_type == "ipo"
    if needs_counts and (chosen_tokens is None or rejected_tokens is None):
        raise ConfigError(f"{objective} {loss_type} averages per token: pass chosen_tokens and rejected_tokens")
    if needs_counts:
        nc, nr = chosen_tokens.to(pc).clamp(min=1), rejected_tokens.to(pc).clamp(min=1)
    if objective == "dpo":
        if ref_chosen is None or ref_rejected is None:
            raise ConfigError("dpo compares with a reference: pass ref_chosen and ref_rejected")
        chosen_ratio, rejected_ratio = pc - ref_chosen.float(), pr - ref_rejected.float()
        margin = chosen_ratio - rejected_ratio
        if loss_type == "sigmoid":
            losses = _smoothed_sigmoid(beta * margin, label_smoothing)
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * margin)
        else:
            losses = (chosen_ratio / nc - rejected_ratio / nr - 1 / (2 * beta)) ** 2
        return PreferenceLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), pc.detach(),
                                pr.detach())
    ac, ar = pc / nc, pr / nr
    if objective == "orpo":
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        losses = -ac - beta * F.logsigmoid(log_odds)
    else:
        losses = _smoothed_sigmoid(beta * (ac - ar) - simpo_gamma, label_smoothing)
    return PreferenceLosses(losses, beta * ac.detach(), beta * ar.detach(), ac.detach(), ar.detach())
