"""GRPO's per-token log-probs: log_softmax(logits / T)[token] of every completion token of a micro-batch.

A micro-batch (``GRPO.collate``) holds the G completions of each prompt as padded rows ``[prompt, completion]``,
so a plain forward computes each prompt G times; with a 60-token prompt and 12-token completions that is most
of the work. ``completion_logps`` instead packs each prompt once, followed by k of its completions:

    row = [prompt (P tokens), completion 1 (n1), completion 2 (n2), ...]     positions 0…P−1, P…P+n1−1, P…P+n2−1
    mask: a prompt token sees the prompt up to itself; a completion token sees the whole prompt and its own
          completion up to itself (never another completion)

which gives every completion token the keys, values and positions of its padded row: the same log-probs, to
rounding. The last prompt token predicts each completion's first token. A dense (L, L) mask pays every pair of
the packed row in attention, so k (completions per packed row, 1 = the padded rows) is the cheapest by a cost
model of tokens + pairs / hidden size; long completions pack fewer per row or none.

The head runs on the scored positions only: for the architectures of ``evaluate.FUSED_CE_MODELS`` with a frozen
head through ``head_logps`` (chunks of logits, never all kept); otherwise on ``logits_to_keep`` of the padded rows.
The packed layout needs transformers' SDPA attention (which takes a boolean 4-D mask as given); models on other
attention take the padded rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..evaluate import _final_hidden, fused_head
from .logps import head_logps

PROMPT = -1  # segment id of prompt tokens in a packed row (completions count from 0, padding is -2)
PAD = -2


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float,
                     share_prompts: bool = True, per_row: int | None = None) -> torch.Tensor:
    """(b, C) fp32 log π(token) of each completion token of ``batch`` under log_softmax(logits / temperature);
    0 on padding.

    Args:
        model: the policy (LoRA, DDP-wrapped: any causal LM).
        batch: ``input_ids``, ``attention_mask``, ``position_ids`` (b, P + C): prompts left-padded to P, completions
            right-padded to C; ``completion_mask`` (b, C).
        temperature: the sampling temperature.
        share_prompts: pack each prompt once where the cost model says it pays (False: the padded rows).
        per_row: completions packed after each prompt (None: the cost model's k; 1: the padded rows).
    """
    head = fused_head(model)
    if head is None or head.weight.requires_grad:
        return _padded_logits(model, batch, temperature)
    if share_prompts and _takes_4d_mask(model):
        packed = shared_rows(batch, _hidden_size(model), _window(model), per_row)
        if packed is not None:
            hidden = _final_hidden(model, packed["inputs"])  # (R, L, H)
            tok = head_logps(hidden[packed["rows"], packed["at"]], head.weight, packed["targets"],
                             temperature=temperature)
            return _scatter(tok, packed["dest"], batch)
    c = batch["completion_mask"].shape[1]
    hidden = _final_hidden(model, _padded_inputs(batch))[:, -c - 1:-1]  # (b, C, H): position t predicts t + 1
    real = batch["attention_mask"][:, -c:].bool()
    tok = head_logps(hidden[real], head.weight, batch["input_ids"][:, -c:][real], temperature=temperature)
    return torch.zeros(real.shape, dtype=torch.float32, device=tok.device).masked_scatter(real, tok)


def _padded_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """The padded rows through the model's own head, logits on the completion positions only (as TRL)."""
    c = batch["completion_mask"].shape[1]
    out = model(**_padded_inputs(batch), logits_to_keep=c + 1)
    logits = out.logits[:, :-1].float() / temperature  # (b, C, V): position t predicts token t + 1
    targets = batch["input_ids"][:, -c:]
    tok = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="none").view_as(targets)
    return tok * batch["attention_mask"][:, -c:]


def _padded_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "position_ids": batch["position_ids"], "use_cache": False}


def _scatter(tok: torch.Tensor, dest: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) log-probs into the (b, C) grid at ``dest`` (N, 2) = (row, column)."""
    out = torch.zeros(batch["completion_mask"].shape, dtype=torch.float32, device=tok.device)
    return out.index_put((dest[:, 0], dest[:, 1]), tok)


def shared_rows(batch: dict[str, torch.Tensor], hidden_size: int, window: int | None = None,
                per_row: int | None = None) -> dict[str, Any] | None:
    """The packed layout of a padded GRPO micro-batch (module docstring), or None where the padded rows cost
    less (k = 1) or a sliding attention window would bind.

    Returns:
        ``inputs``: the model's keyword arguments (``input_ids`` (R, L), a (R, 1, L, L) boolean ``attention_mask``,
        ``position_ids``); ``rows``, ``at`` (N,): where each scored token's predicting position is; ``targets``
        (N,); ``dest`` (N, 2): its (row, column) in the (b, C) grid.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()
    c = batch["completion_mask"].shape[1]
    p = ids.shape[1] - c
    prompts = [ids[i, :p][attn[i, :p]] for i in range(len(ids))]
    comps = [ids[i, p:][attn[i, p:]] for i in range(len(ids))]
    groups: list[list[int]] = []  # consecutive rows with the same prompt
    for i, pr in enumerate(prompts):
        if groups and torch.equal(prompts[groups[-1][0]], pr):
            groups[-1].append(i)
        else:
            groups.append([i])
    if any(len(prompts[g[0]]) == 0 for g in groups):
        return None  # nothing predicts a completion's first token: the padded path's own (b, C) rule applies
    k = per_row or completions_per_row(groups, [len(x) for x in prompts], c, hidden_size)
    if k == 1:
        return None
    units = [(g[0], g[s:s + k]) for g in groups for s in range(0, len(g), k)]  # (prompt row, its completions)
    width = max(len(prompts[pr]) + sum(len(comps[i]) for i in members) for pr, members in units)
    if window and width > window:
        return None
    return _pack(units, prompts, comps, width, ids.device)


def completions_per_row(groups: list[list[int]], prompt_lens: list[int], c: int, hidden_size: int) -> int:
    """The k (completions packed after each prompt) of least cost = R·(L + L²/hidden): R rows padded to L
    tokens, the linear layers' work per token against the dense attention's per (query, key) pair (weighted
    above its FLOPs: on CPU attention runs far below matmul speed). k = 1 is the padded rows themselves."""
    best, best_cost = 1, math.inf
    for k in range(1, max(len(g) for g in groups) + 1):
        rows = sum(math.ceil(len(g) / k) for g in groups)
        width = max(prompt_lens[g[0]] + min(k, len(g)) * c for g in groups) if k > 1 else max(prompt_lens) + c
        cost = rows * (width + width * width / hidden_size)
        if cost < best_cost:
            best, best_cost = k, cost
    return best


def _pack(units: list[tuple[int, list[int]]], prompts: list[torch.Tensor], comps: list[torch.Tensor], width: int,
          device: torch.device) -> dict[str, Any]:
    r = len(units)
    ids = torch.zeros((r, width), dtype=torch.long)
    pos = torch.zeros((r, width), dtype=torch.long)
    seg = torch.full((r, width), PAD, dtype=torch.long)
    rows, at, targets, dest = [], [], [], []
    for u, (pr, members) in enumerate(units):
        prompt = prompts[pr].cpu()
        n = len(prompt)
        ids[u, :n], pos[u, :n], seg[u, :n] = prompt, torch.arange(n), PROMPT
        start = n
        for j, i in enumerate(members):
            comp = comps[i].cpu()
            m = len(comp)
            ids[u, start:start + m] = comp
            pos[u, start:start + m] = torch.arange(n, n + m)
            seg[u, start:start + m] = j
            rows += [u] * m
            at += [n - 1, *range(start, start + m - 1)]  # the last prompt token predicts the first
            targets += comp.tolist()
            dest += [(i, t) for t in range(m)]
            start += m
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]  # (L, L): key <= query
    same = (seg[:, None, :] == seg[:, :, None]) | (seg[:, None, :] == PROMPT)  # (R, L query, L key)
    mask = (causal[None] & same)[:, None]  # (R, 1, L, L)
    return {"inputs": {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                       "position_ids": pos.to(device), "use_cache": False},
            "rows": torch.tensor(rows, device=device), "at": torch.tensor(at, device=device),
            "targets": torch.tensor(targets, dtype=torch.long, device=device),
            "dest": torch.tensor(dest, dtype=torch.long, device=device).view(-1, 2)}


def _config(model: torch.nn.Module) -> Any:
    return getattr(getattr(model, "module", model), "config", None)


def _takes_4d_mask(model: torch.nn.Module) -> bool:
    """transformers' SDPA attention uses a boolean 4-D mask as given (``masking_utils``); eager attention would
    add it (it wants an additive one), flash-attention and lorakit's packed attention read none."""
    return getattr(_config(model), "_attn_implementation", None) == "sdpa"


def _hidden_size(model: torch.nn.Module) -> int:
    cfg = _config(model)
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 1024)


def _window(model: torch.nn.Module) -> int | None:
    """A sliding attention window the dense mask would not apply (None: full attention everywhere)."""
    cfg = _config(model)
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(window)
