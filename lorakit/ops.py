"""Autograd functions behind LoRA's fast paths. Each is tested against the plain computation.

``dropout_linear(x, weight, p)`` is ``F.linear(F.dropout(x, p), weight)`` without keeping the
dropped copy of x for backward: the mask is drawn from a seed and drawn again in backward.
PEFT keeps one dropped copy of the input per adapted Linear, which for seven adapted
projections per block costs as much memory as the activations themselves.
"""

from __future__ import annotations

import torch


def _keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The same Bernoulli(1 - p) keep-mask, scaled by 1/(1 - p), for the same seed."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    mask = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=gen)
    return mask.mul_(1.0 / (1 - p))


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return torch.nn.functional.linear(x * _keep_mask(x, p, seed), weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        mask = _keep_mask(x, ctx.p, ctx.seed)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight) * mask  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ (x * mask).reshape(-1, x.shape[-1])  # (r, in)
        return grad_x, grad_w, None, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``F.linear(F.dropout(x, p, training=True), weight)`` storing no dropped copy of x.

    The seed comes from torch's global generator, so runs are reproducible and a resumed run
    (which restores that generator) draws the same masks.

    Args:
        x: input (..., in).
        weight: (out, in), e.g. LoRA's A.
        p: dropout probability, 0 < p < 1.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return _DropoutLinear.apply(x, weight, p, seed)
