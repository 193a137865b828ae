"""Decoding state of one request (Row), token choice, and window batching: a batch generated to completion.

Prompts are left-padded; ``attention_mask`` hides the padding and ``position_ids`` count only real
tokens, so a row's logits do not depend on its batch-mates (batched == single, greedy). Every row
samples with its own ``torch.Generator``, so a seeded request draws the same tokens in any batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..lora.mixed import mixed_batch


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Args:
        max_tokens: most tokens to generate.
        temperature: 0 is greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: keep the most likely tokens whose probabilities sum to top_p.
        seed: seed of the row's generator (None: a fresh random seed).
        stop: strings that end the generation; the text returned stops before them.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """A piece of a request's output: new text, and on the last event its finish reason and usage."""

    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Row:
    """The decoding state of one request; ``sink`` receives its Events (called from the engine thread)."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[Event], None]
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already sent
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    on_finish: Callable[[], None] | None = None  # called once, before the final Event is sent
    unpinned: bool = False  # the engine's bookkeeping: this row no longer holds its adapter
    position: int = 0  # position id of the next token fed to the model (continuous batching)
    arrival_step: int = 0  # the engine's decoding step when the row reached the scheduler (admission order)
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # prefill started
    first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled.is_set()

    def push(self, token: int, tokenizer: Any, eos_ids: set[int]) -> None:
        """Append a generated token, detect eos / stop strings / max_tokens, send the text that is safe."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in eos_ids:
            self.tokens.append(token)
            return self.finish("stop")
        self.tokens.append(token)
        self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.finish("stop")
        if len(self.tokens) >= self.params.max_tokens:
            return self.finish("length")
        safe = len(self.text) - _held_back(self.text, self.params.stop)
        if safe > self.emitted:
            self.sink(Event(self.index, self.text[self.emitted:safe]))
            self.emitted = safe

    def finish(self, reason: str, error: str | None = None) -> None:
        """Send the rest of the text with the finish reason and token counts."""
        if self.done:
            return
        self.finish_reason = reason
        if self.on_finish is not None:  # e.g. the engine unpins the adapter: a DELETE after the answer succeeds
            self.on_finish()
            self.on_finish = None
        rest = self.text[self.emitted:] if error is None else ""
        self.emitted = len(self.text)
        self.sink(Event(self.index, rest, reason, len(self.prompt_ids), len(self.tokens), error))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` not to send yet: a possible start of a stop string, or a partial
    UTF-8 character (decoded as U+FFFD) that the next token may complete."""
    hold = max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
    return max(hold, len(text) - len(text.rstrip("\ufffd")))


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of ``probs`` (V,) outside the smallest set whose mass reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    outside = sorted_p.cumsum(0) - sorted_p >= top_p  # the first token is always kept
    return probs.masked_fill(outside.scatter(0, order, outside), 0.0)


def choose_tokens(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Next token of each row from fp32 logits (B, V): argmax for temperature 0, else a seeded draw."""
    tokens = logits.argmax(dim=-1)  # (B,)
    for i, row in enumerate(rows):  # a loop over rows, not adapters: each row has its own generator
        p = row.params
        if p.temperature > 0 and not row.done:
            probs = _top_p_filter(torch.softmax(logits[i] / p.temperature, dim=-1), p.top_p)
            tokens[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
    return tokens


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@torch.no_grad()
def run_batch(model: torch.nn.Module, tokenizer: Any, rows: list[Row], eos_ids: set[int], pad_id: int) -> None:
    """Generate for ``rows`` together (each with its own adapter) until every row is done (window batching:
    ``Limits(scheduler="window")``; continuous batching is in :mod:`lorakit.generate.continuous`).

    Args:
        model: a causal LM in eval mode holding the rows' adapters (none merged).
        tokenizer: decodes generated tokens for stop strings and streaming.
        rows: the requests; their sinks receive the output as it is produced.
        eos_ids: token ids that end a row.
        pad_id: id used for left padding (masked out).
    """
    device = next(model.parameters()).device
    for row in rows:
        row.generator = new_generator(row.params.seed, device)
    ids, mask = left_pad([r.prompt_ids for r in rows], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0 in every row
    past = None
    with mixed_batch(model, [r.adapter for r in rows]):
        for _ in range(max(r.params.max_tokens for r in rows)):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            tokens = choose_tokens(out.logits[:, -1].float(), rows)  # (B,)
            for row, token in zip(rows, tokens.tolist(), strict=True):
                if not row.done:
                    row.push(token, tokenizer, eos_ids)
            if all(r.done for r in rows):
                break
            ids = tokens[:, None]  # (B, 1): finished rows keep decoding, their tokens are ignored
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
