"""How a row picks its next token: sampling parameters, temperature / top-k / top-p, seeded generators,
and the log-probabilities of the chosen tokens.

Every row samples with its own ``torch.Generator``, so a seeded row draws the same tokens whichever
rows it shares a batch with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded.

    Args:
        max_tokens: most tokens to generate (an eos token counts).
        temperature: 0 is greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: keep the most likely tokens whose probabilities sum to top_p (1: off).
        seed: seed of the row's generator (None: a fresh random seed).
        stop: strings that end the generation; the text returned stops before them.
        top_k: keep the k most likely tokens before top_p (0: off).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    top_k: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.max_tokens < 1:
            raise ConfigError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"SamplingParams.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"SamplingParams.top_k must be >= 0 (0: off), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ConfigError("SamplingParams.stop: stop strings must be non-empty")


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Zero every probability below the k-th largest of ``probs`` (V,) (ties at the k-th are kept)."""
    if top_k <= 0 or top_k >= probs.shape[-1]:
        return probs
    return probs.masked_fill(probs < probs.topk(top_k).values[-1], 0.0)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of ``probs`` (V,) outside the smallest set whose mass reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    outside = sorted_p.cumsum(0) - sorted_p >= top_p  # the first token is always kept
    return probs.masked_fill(outside.scatter(0, order, outside), 0.0)


def choose_tokens(logits: torch.Tensor, rows: Sequence[Any], logprobs: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next token of each row from fp32 logits (B, V): argmax for temperature 0, else a seeded draw
    after top-k and top-p.

    A draw inverts the row's cumulative distribution at one uniform number from the row's own
    generator: one random number per row and one batched softmax and cumsum per step, where a
    ``torch.multinomial`` per row would draw over the whole vocabulary for each.

    Args:
        logits: the last position's logits, one row per entry of ``rows``.
        rows: objects with ``params`` (SamplingParams), ``generator`` and ``done``.
        logprobs: also return each chosen token's log-probability under ``log_softmax(logits / T)``
            (T = 1 for greedy rows), before top-k / top-p: what a policy-gradient loss recomputes.

    Returns:
        tokens (B,) and, when asked, their log-probabilities (B,).
    """
    tokens = logits.argmax(dim=-1)  # (B,)
    temps = torch.tensor([r.params.temperature or 1.0 for r in rows], device=logits.device)  # (B,)
    drawn = [i for i, r in enumerate(rows) if r.params.temperature > 0 and not r.done]
    if drawn:
        index = torch.tensor(drawn, device=logits.device)
        probs = torch.softmax(logits[index] / temps[index, None], dim=-1)  # (S, V)
        for k, i in enumerate(drawn):  # filters only for the rows that ask for them
            p = rows[i].params
            if p.top_k or p.top_p < 1.0:
                probs[k] = _top_p_filter(_top_k_filter(probs[k], p.top_k), p.top_p)
        cdf = probs.cumsum(dim=-1)  # (S, V)
        u = torch.cat([torch.rand(1, generator=rows[i].generator, device=logits.device) for i in drawn])  # (S,)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # first token past u
        tokens[index] = picks.clamp(max=logits.shape[-1] - 1)
    if not logprobs:
        return tokens, None
    scores = torch.log_softmax(logits / temps[:, None], dim=-1)  # (B, V)
    return tokens, scores.gather(1, tokens[:, None])[:, 0]
