"""Autograd functions behind LoRA's fast paths. Each is tested against the plain computation.

``lora_down(x, A, p)`` is LoRA's first half, ``F.linear(F.dropout(x.to(A.dtype), p), A)``,
without the copies the plain path keeps for backward:

- dropout saves a one-byte keep-mask (a quarter of an fp32 copy's bytes), not the dropped input;
  sibling projections that read the same input (q/k/v, gate/up) share one mask of it, so the
  random draw is made once per input, not once per adapted Linear;
- a half-precision input (a bf16/fp16 frozen base) is upcast to the adapter's fp32 on the fly
  and saved as it came, so no fp32 copy of it outlives the forward.

PEFT keeps, per adapted Linear, one fp32 copy of a half input and one dropped copy, and draws a
mask for each.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F


class LastInput(threading.local):
    """A value remembered, per thread, for the most recent input tensor (its identity and version):
    what sibling projections reading that same x share (a dropout mask, their A·x slices)."""

    def get(self, x: torch.Tensor, key=None):
        entry = getattr(self, "entry", None)
        if entry is not None and entry[0]() is x and entry[1] == x._version and entry[2] == key:
            return entry[3]
        return None

    def put(self, x: torch.Tensor, value, key=None) -> None:
        self.entry = (weakref.ref(x), x._version, key, value)


_masks = LastInput()  # the latest input's keep-mask, keyed by p


def keep_probability(p: float) -> float:
    """The keep probability the masks realise: 1 - p rounded to a multiple of 2⁻¹⁶ (|error| ≤ 7.7e-6)."""
    return round((1 - p) * 65536) / 65536


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A Bernoulli(keep_probability(p)) keep-mask for x (uint8 0/1), shared with the previous call on the same tensor.

    Each caller still sees dropout(x) with probability p (the mask is shared across siblings,
    as one dropout of their common input). The draw takes 16 random bits per element, four to
    a 64-bit integer from torch's global generator: half the generator work of ``rand`` and
    ``bernoulli_`` (which draw 32 bits each); runs are reproducible, and a resumed run (which
    restores the generator) draws the same masks.
    """
    mask = _masks.get(x, p)
    if mask is not None:
        return mask
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    threshold = round(keep_probability(p) * 65536) - 32768  # int16 values are uniform on [-32768, 32767]
    # uint8, not bool: multiplying a float tensor by a uint8 one converts it vectorized, 4x faster than bool
    mask = (bits.view(torch.int16)[:n] < threshold).view(torch.uint8).view(x.shape)
    _masks.put(x, mask, p)
    return mask


class _LoraDown(torch.autograd.Function):
    """x (any float dtype) → linear(x.to(A.dtype) [* mask], [A_1; A_2; ...]) * scale, saving x as it came.

    Several A's (siblings reading the same x) run as one matmul; they are concatenated inside,
    so only the parameters themselves are kept for backward. The dropout scale 1/(1 - p) is
    applied on the rank-r side (output, and the incoming gradient in backward), where it costs
    r/in of a full-width multiply.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor | None, scale: float, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, mask, *weights)
        ctx.scale = scale
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        out = F.linear(_masked(x, weight.dtype, mask), weight)  # (..., sum of r)
        return out.mul_(scale) if scale != 1 else out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, mask, *weights = ctx.saved_tensors
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        grad_out = grad_out * ctx.scale if ctx.scale != 1 else grad_out  # (..., sum of r)
        grad_x, grad_ws = None, [None] * len(weights)
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight  # (..., in), in the weights' dtype
            grad_x = grad_x.mul_(mask).to(x.dtype) if mask is not None else grad_x.to(x.dtype)
        if any(ctx.needs_input_grad[3:]):
            masked = _masked(x, weight.dtype, mask).reshape(-1, x.shape[-1])
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ masked  # (sum of r, in)
            grad_ws = grad_w.split([w.shape[0] for w in weights])
        return grad_x, None, None, *grad_ws


def _masked(x: torch.Tensor, dtype: torch.dtype, mask: torch.Tensor | None) -> torch.Tensor:
    """x in ``dtype``, dropped elements zeroed: one new tensor at most (never x itself modified)."""
    if mask is None:
        return x.to(dtype)
    return x.to(dtype).mul_(mask) if x.dtype != dtype else x * mask


def lora_down(x: torch.Tensor, *weights: torch.Tensor, p: float = 0.0) -> torch.Tensor:
    """``F.linear(F.dropout(x.to(A.dtype), p, training=True), A)`` for A = [weights...] stacked by rows.

    Saves x as it came (a bf16 frozen base's activations stay bf16) and, with p > 0, a boolean
    mask shared with siblings reading the same x.

    Args:
        x: input (..., in).
        weights: one or more (r_i, in) matrices of one dtype, e.g. LoRA A's (fp32).
        p: dropout probability, 0 <= p < 1 (0: no dropout).

    Returns:
        (..., sum of r_i), in the weights' dtype.
    """
    if p == 0 and len(weights) == 1 and x.dtype == weights[0].dtype:
        return F.linear(x, weights[0])  # nothing to save beyond x itself: autograd's own path
    mask = keep_mask(x, p) if p > 0 else None
    return _LoraDown.apply(x, mask, 1.0 / keep_probability(p), *weights)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i·Wᵀ, y_i) with the logits made chunk by chunk and never kept.

    The loss is the end of the graph, so its gradients are taken in the same pass (softmax − onehot,
    chunk by chunk) and backward only scales them by the incoming scalar: no recomputation, and
    memory of one chunk of logits instead of the plain path's fp32 logits, log-probabilities and
    their gradient for every labelled token.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                grads: bool) -> torch.Tensor:
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(hc, weight).float()  # (c, V): the plain path's logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(yc), device=g.device), yc] -= 1
                g = g.to(weight.dtype)
                if need_h:
                    grad_h[start:start + chunk] = g @ weight
                if need_w:
                    grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk of linear_cross_entropy


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")`` in chunks of rows.

    Args:
        h: (N, hidden) final hidden states of the labelled positions.
        weight: (vocab, hidden) output head (no bias).
        targets: (N,) token ids, all valid (select labelled rows first).
        chunk_bytes: fp32 logits per chunk (rows = chunk_bytes / (4·vocab), at least 16).
    """
    chunk = max(16, chunk_bytes // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, torch.is_grad_enabled())
