"""Autograd functions behind LoRA's fast paths. Each is tested against the plain computation.

``dropout_linear(x, weight, p)`` is ``F.linear(F.dropout(x, p), weight)`` without keeping a
dropped float copy of x for backward: it saves a boolean keep-mask (a quarter of the bytes)
and x, which autograd keeps anyway. Sibling projections that read the same input (q/k/v,
gate/up) share one mask of it, so the random draw is made once per input, not once per
adapted Linear. PEFT keeps one dropped fp32 copy of the input per adapted Linear and draws a
mask for each.
"""

from __future__ import annotations

import threading
import weakref

import torch

_last = threading.local()  # the most recent (input, p) → mask, for siblings reading the same tensor


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A Bernoulli(1 - p) boolean keep-mask for x, shared with the previous call on the same tensor.

    Each caller still sees dropout(x) with probability p (the mask is shared across siblings,
    as one dropout of their common input), drawn from torch's global generator, so runs are
    reproducible and a resumed run (which restores the generator) draws the same masks.
    """
    ref = getattr(_last, "entry", None)
    if ref is not None:
        src, version, prob, mask = ref
        if src() is x and version == x._version and prob == p:
            return mask
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)
    _last.entry = (weakref.ref(x), x._version, p, mask)
    return mask


class _DropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, mask)
        ctx.scale = scale
        return torch.nn.functional.linear(x * mask * scale, weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight).mul_(mask).mul_(ctx.scale)  # (..., in)
        if ctx.needs_input_grad[1]:
            dropped = (x * mask * ctx.scale).reshape(-1, x.shape[-1])
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped  # (r, in)
        return grad_x, grad_w, None, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``F.linear(F.dropout(x, p, training=True), weight)`` storing a boolean mask, not a float copy.

    Args:
        x: input (..., in).
        weight: (out, in), e.g. LoRA's A.
        p: dropout probability, 0 < p < 1.
    """
    return _DropoutLinear.apply(x, weight, keep_mask(x, p), 1.0 / (1 - p))
