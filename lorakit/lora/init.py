"""Initialisations that move part of the base weight into the adapter (PEFT's semantics).

PiSSA (Meng et al. 2024): with W = U·S·Vᵀ (out, in), the adapter starts as the top-r singular part

    B = U_r·√(S_r/s),   A = √(S_r/s)·V_rᵀ,   so s·B·A = U_r·S_r·V_rᵀ,   W_res = W − s·B·A

("pissa_niter_K": the same from torch.svd_lowrank with K subspace iterations). OLoRA (Büyükakyüz
2024): W = Q·R, B = Q[:, :r], A = R[:r], W_res = W − s·B·A. In both the layer's output is unchanged
at creation, and the base weight becomes the residual W_res: an adapter trained this way applies to
that residual, which is why saving offers the conversion to a plain LoRA on the original W
(``convert_to_lora``): s·B·A − s·B₀·A₀ = s·[B | −B₀]·[A; A₀], a rank-2r LoRA.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def factors(init: str, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in fp32 for a base-moving initialisation of an (out, in) weight.

    Args:
        init: "pissa", "pissa_niter_K" or "olora".
        weight: the base weight, (out, in), any float dtype (computed in fp32).
        r: rank.
        scaling: the adapter's alpha / r (or alpha / sqrt(r)).
    """
    w = weight.detach().float()
    if init == "olora":
        q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    elif init.startswith("pissa_niter_"):
        u, s, v = torch.svd_lowrank(w, r, niter=int(init.removeprefix("pissa_niter_")))
        vh = v.T
    else:
        raise ConfigError(f"init_lora_weights={init!r} does not move the base weight")
    root = (s / scaling).sqrt()  # (r,)
    return (root[:, None] * vh).contiguous(), (u * root).contiguous()


def convert_factors(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-2r plain LoRA on the original W equal to a trained (A, B) that started at (A₀, B₀).

    [A; A₀] (2r, in) and [B | −B₀] (out, 2r): s'·B'·A' = s·(B·A − B₀·A₀) when s' = s (alpha doubles
    with r, as PEFT writes it).
    """
    return torch.cat([a, a0.to(a)]), torch.cat([b, -b0.to(b)], dim=1)
