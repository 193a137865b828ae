"""Sequence log-probs of preference pairs: one forward over the chosen and rejected rows together.

``sequence_logps(model, batch)`` sums log π(token) over each row's completion tokens (fp32). The head
runs on the completion positions only: for the architectures of ``evaluate.FUSED_CE_MODELS`` through
``head_logps`` (chunks of logits, the gradient with respect to the hidden states taken in the same
pass, the logits never kept), otherwise through transformers' ``logits_to_keep``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..evaluate import _accepts_logits_to_keep, _final_hidden, fused_head, model_inputs

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk of head_logps


@dataclass
class SequenceLogps:
    """Per-pair figures, each (B,): summed completion log-probs (fp32) and completion token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


class _HeadLogps(torch.autograd.Function):
    """log softmax(h·Wᵀ / T)[y] per row, chunk by chunk; d/dh (onehot − softmax)·W / T is made in the same pass,
    so backward only scales each row by its incoming gradient. The head weight gets no gradient (frozen)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                grads: bool, temperature: float = 1.0) -> torch.Tensor:
        need_h = grads and ctx.needs_input_grad[0]
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(hc, weight).float()  # (c, V)
            if temperature != 1.0:
                logits.div_(temperature)  # the sampled distribution, as log_softmax(logits / T)
            lse = torch.logsumexp(logits, dim=-1)
            out[start:start + chunk] = logits.gather(1, yc[:, None]).squeeze(1) - lse
            if need_h:
                g = logits.sub_(lse[:, None]).exp_().neg_()  # −softmax, in place of the logits
                g[torch.arange(len(yc), device=g.device), yc] += 1
                if temperature != 1.0:
                    g.div_(temperature)  # d(z / T)/dz
                grad_h[start:start + chunk] = g.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        gh = grad_h * grad_out[:, None].to(grad_h.dtype) if grad_h is not None else None
        return gh, None, None, None, None, None


def head_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               chunk_bytes: int = CHUNK_BYTES, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(F.linear(h, weight).float() / temperature)[i, targets[i]]`` for each row i, (N,) fp32, in
    chunks.

    Args:
        h: (N, hidden) final hidden states of the scored positions.
        weight: (vocab, hidden) a frozen output head (no bias).
        targets: (N,) the next tokens.
        chunk_bytes: fp32 logits per chunk.
        temperature: the logits are divided by it (GRPO scores under the sampling temperature).
    """
    chunk = max(16, chunk_bytes // (4 * weight.shape[0]))
    return _HeadLogps.apply(h, weight, targets, chunk, torch.is_grad_enabled(), float(temperature))


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the completion tokens in row-major order (N,) fp32, the (rows, T-1) mask they fill)."""
    mask = batch["completion_mask"][:, 1:].bool()  # (2B, T-1): token t+1 is predicted at position t
    targets = batch["input_ids"][:, 1:][mask]  # (N,)
    kwargs = model_inputs(batch)
    head = fused_head(model)
    if head is not None and not head.weight.requires_grad:
        hidden = _final_hidden(model, kwargs)[:, :-1]  # (2B, T-1, H)
        return head_logps(hidden[mask], head.weight, targets), mask
    keep = mask.any(dim=0).nonzero().squeeze(1)  # (K,) positions any row scores
    if _accepts_logits_to_keep(model) and len(keep) < mask.shape[1]:
        logits, sel = model(**kwargs, logits_to_keep=keep).logits, mask[:, keep]  # (2B, K, V)
    else:
        logits, sel = model(**kwargs).logits[:, :-1], mask  # (2B, T-1, V)
    return -F.cross_entropy(logits[sel].float(), targets, reduction="none"), mask


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> SequenceLogps:
    """Summed completion log-probs of a preference batch (``lk.preference_batch``'s layout), one forward.

        logp(y | x) = Σ_t m_t · log softmax(z_{t−1})[y_t]     m: completion_mask, z: the logits (fp32)

    Args:
        model: a causal LM (LoRA, DDP-wrapped, quantized: any).
        batch: ``input_ids``, ``attention_mask``, ``completion_mask`` of 2B rows (chosen then rejected).

    Returns:
        ``SequenceLogps``: chosen and rejected (B,) fp32 sums and their (B,) token counts.
    """
    tok, mask = token_logps(model, batch)
    sums = torch.zeros(mask.shape, dtype=torch.float32, device=tok.device).masked_scatter(mask, tok).sum(dim=1)
    counts = mask.sum(dim=1)
    b = mask.shape[0] // 2
    return SequenceLogps(sums[:b], sums[b:], counts[:b], counts[b:])
