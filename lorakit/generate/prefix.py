"""Prefix sharing: rows whose prompts begin with the same block of tokens (the n completions of one
prompt, or prompts under one system prompt) prefill that block once.

A prefill with shared prefixes runs in two forwards:

1. every shared prefix once, one cache row per group (left-padded against each other);
2. each row's cache starts as a copy of its group's prefix rows (``index_select`` on the batch axis);
   then the rest of every prompt is prefilled on top of it, left-padded to the longest rest, with
   position ids that continue after the row's prefix.

The padding between a row's prefix and its rest is masked out, so every row attends to exactly its
own prompt's tokens at their own positions: the logits equal those of prefilling each prompt alone.
Only rows running with the same adapter share a prefix (the keys and values depend on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .rows import left_pad

MIN_SHARED = 8  # tokens: a shorter common prefix is not worth the copy of its cache rows


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n, most = 0, min(len(a), len(b))
    while n < most and a[n] == b[n]:
        n += 1
    return n


def plan_groups(prompts: list[list[int]], adapters: Sequence[str | None],
                min_shared: int = MIN_SHARED) -> list[tuple[int, list[int]]]:
    """Which rows prefill a prefix together: ``(prefix length, row indices)`` per group; a row that
    shares nothing is a group of its own with prefix length 0. Every row keeps at least its last
    prompt token out of the prefix, since its logits come from that token.

    Rows of one adapter are sorted by prompt, so prompts with the longest common prefixes are
    neighbours; a row joins the group before it when that keeps the tokens saved from dropping
    (k rows sharing p tokens save (k - 1) * p).
    """
    by_adapter: dict[str | None, list[int]] = {}
    for i, name in enumerate(adapters):
        by_adapter.setdefault(name, []).append(i)
    groups: list[tuple[int, list[int]]] = []
    for indices in by_adapter.values():
        indices.sort(key=lambda i: prompts[i])
        current, shared = [indices[0]], len(prompts[indices[0]]) - 1
        for i in indices[1:]:
            p = min(shared, _common(prompts[current[0]], prompts[i]), len(prompts[i]) - 1)
            if p >= min_shared and len(current) * p >= (len(current) - 1) * shared:
                current.append(i)
                shared = p
            else:
                groups.append((shared if len(current) > 1 else 0, current))
                current, shared = [i], len(prompts[i]) - 1
        groups.append((shared if len(current) > 1 else 0, current))
    return groups


def prefill(model: torch.nn.Module, prompts: list[list[int]], adapters: Sequence[str | None], pad_id: int,
            groups: list[tuple[int, list[int]]], use: Callable[[list[str | None]], None]
            ) -> tuple[torch.Tensor, object, torch.Tensor]:
    """Prefill ``prompts`` (each with its adapter), sharing the prefixes ``groups`` name.

    Args:
        model: a causal LM in eval mode.
        prompts: token ids per row.
        adapters: adapter name (or None) per row.
        pad_id: id used for padding (masked out).
        groups: from :func:`plan_groups`; all prefix lengths 0 (or one group per row) shares nothing.
        use: points the model at per-row adapters before a forward (a no-op without mixed adapters).

    Returns:
        the last prompt position's fp32 logits (B, V), the DynamicCache of every row, and its (B, T)
        mask of real positions.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    shared = [(p, rows) for p, rows in groups if p > 0]
    cache = DynamicCache(config=model.config)
    start = torch.zeros(len(prompts), dtype=torch.long, device=device)  # (B,) prefix length of each row
    head_mask = None
    if shared:
        ids, mask = left_pad([prompts[rows[0]][:p] for p, rows in shared], pad_id, device)
        use([adapters[rows[0]] for _, rows in shared])
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              past_key_values=cache, use_cache=True, logits_to_keep=1)
        group_of = torch.zeros(len(prompts), dtype=torch.long, device=device)  # rows alone copy group 0, masked
        for g, (p, rows) in enumerate(shared):
            group_of[rows] = g
            start[rows] = p
        cache.batch_select_indices(group_of)
        head_mask = mask[group_of] * (start > 0)[:, None]  # (B, Tp)
    ids, mask = left_pad([prompt[s:] for prompt, s in zip(prompts, start.tolist(), strict=True)], pad_id, device)
    positions = start[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)  # (B, S): each row continues its prefix
    if head_mask is not None:
        mask = torch.cat([head_mask, mask], dim=1)  # (B, Tp + S)
    use(list(adapters))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.past_key_values, mask
