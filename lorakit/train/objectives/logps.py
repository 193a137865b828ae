"""Sequence log-probs of preference pairs: one forward over the chosen and rejected rows together.

``sequence_logps(model, batch)`` sums log π(token) over each row's completion tokens (fp32). The head
runs on the completion positions only: for the architectures of ``evaluate.FUSED_CE_MODELS`` through
``head_logps`` (chunks of logits, the gradient with respect to the hidden states taken in the same
pass, the logits never kept), otherwise through transformers' ``logits_to_keep``. A batch is padded rows or
one packed row (``data.preference.collate_pairs``); both give the same sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...models.attention import NAME as ATTENTION
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
    """The completion tokens' log-probs (N,) fp32 and the sequence each belongs to (N,) (chosen i: i,
    rejected i: B + i), in either of ``collate_pairs``'s layouts."""
    if "score_index" in batch:
        return _packed_token_logps(model, batch), batch["score_rows"]
    mask = batch["completion_mask"][:, 1:].bool()  # (2B, T-1): token t+1 is predicted at position t
    targets = batch["input_ids"][:, 1:][mask]  # (N,)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (N,), row-major
    kwargs = model_inputs(batch)
    head = fused_head(model)
    if head is not None and not head.weight.requires_grad:
        hidden = _final_hidden(model, kwargs)[:, :-1]  # (2B, T-1, H)
        return head_logps(hidden[mask], head.weight, targets), rows
    keep = mask.any(dim=0).nonzero().squeeze(1)  # (K,) positions any row scores
    if _accepts_logits_to_keep(model) and len(keep) < mask.shape[1]:
        logits, sel = model(**kwargs, logits_to_keep=keep).logits, mask[:, keep]  # (2B, K, V)
    else:
        logits, sel = model(**kwargs).logits[:, :-1], mask  # (2B, T-1, V)
    return -F.cross_entropy(logits[sel].float(), targets, reduction="none"), rows


def _packed_token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probs of the scored tokens of a packed row: position ``score_index[i]`` predicts ``score_targets[i]``."""
    index, targets = batch["score_index"], batch["score_targets"]
    if _shares_prompts(batch["position_ids"]):
        impl = getattr(getattr(getattr(model, "module", model), "config", None), "_attn_implementation", None)
        if impl != ATTENTION:
            raise ConfigError(f"this batch shares each pair's prompt between chosen and rejected (layout 'shared'), "
                              f"which only lorakit's packed attention reads; the model runs {impl!r}. Call "
                              "lorakit.models.attention.packed_attention_for(model) first, or use layout 'packed'")
    kwargs = model_inputs(batch)
    head = fused_head(model)
    if head is not None and not head.weight.requires_grad:
        return head_logps(_final_hidden(model, kwargs)[0, index], head.weight, targets)
    if _accepts_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=index).logits[0]  # (N, V)
    else:
        logits = model(**kwargs).logits[0, index]
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def _shares_prompts(position_ids: torch.Tensor) -> bool:
    """Whether a packed row restarts a span at a position other than 0 (a shared prefix)."""
    pos = position_ids[0]
    restart = pos[1:] != pos[:-1] + 1
    return bool((pos[1:][restart] != 0).any())


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> SequenceLogps:
    """Summed completion log-probs of a preference batch (``lk.preference_batch``'s layouts), one forward.

        logp(y | x) = Σ_t m_t · log softmax(z_{t−1})[y_t]     m: completion_mask, z: the logits (fp32)

    Args:
        model: a causal LM (LoRA, DDP-wrapped, quantized: any). For the "shared" layout, on lorakit's packed
            attention (``lorakit.models.attention.packed_attention_for``).
        batch: padded: ``input_ids``, ``attention_mask``, ``completion_mask`` of 2B rows (chosen then
            rejected); packed or shared: one row with ``position_ids`` and ``score_*`` (``collate_pairs``).

    Returns:
        ``SequenceLogps``: chosen and rejected (B,) fp32 sums and their (B,) token counts.
    """
    tok, rows = token_logps(model, batch)
    n = len(batch["completion_tokens"]) if "completion_tokens" in batch else batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=tok.device).index_add(0, rows, tok)
    counts = torch.bincount(rows, minlength=n)
    b = n // 2
    return SequenceLogps(sums[:b], sums[b:], counts[:b], counts[b:])
