"""The decoding state of one row (one completion of one prompt): its tokens, text, stop and finish.

A row's ``sink``, when it has one, receives :class:`Event` pieces of text as they become safe to show
(nothing that may still turn out to start a stop string); the serving layer streams them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import SamplingParams
from .stops import find_stop, held_back


@dataclass
class Event:
    """A piece of a row's output: new text, and on the last event its finish reason and usage."""

    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Row:
    """The decoding state of one row.

    Args:
        prompt_ids: the prompt's token ids.
        adapter: the row's adapter in a mixed-adapter batch (None: the base model alone).
        params: its sampling settings.
        sink: called with each :class:`Event` (None: no streaming; the text is decoded once, at the end,
            unless stop strings need it sooner).
        index: the index put on its Events.
    """

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[Event], None] | None = None
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already sent
    finish_reason: str | None = None
    logprobs: list[float] | None = None  # a list when the batch records log-probs of the chosen tokens
    generator: torch.Generator | None = None
    on_finish: Callable[[], None] | None = None  # called once, before the final Event is sent
    position: int = 0  # position id of the next token fed to the model
    admitted_at: float | None = None  # prefill started
    first_token_at: float | None = None

    def is_cancelled(self) -> bool:
        """Whoever asked for the row no longer wants it (a server's client went away); never, here."""
        return False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.is_cancelled()

    def push(self, token: int, tokenizer: Any, eos_ids: set[int], logprob: float | None = None) -> None:
        """Append a generated token, detect eos / stop strings / max_tokens, send the text that is safe."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        streaming = self.sink is not None or bool(self.params.stop)
        if token in eos_ids:
            if not streaming:
                self.text = tokenizer.decode(self.tokens[:-1], skip_special_tokens=True)
            return self.finish("stop")
        if streaming or len(self.tokens) >= self.params.max_tokens:
            self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = find_stop(self.text, self.params.stop)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.finish("stop")
        if len(self.tokens) >= self.params.max_tokens:
            return self.finish("length")
        safe = len(self.text) - held_back(self.text, self.params.stop)
        if self.sink is not None and safe > self.emitted:
            self.sink(Event(self.index, self.text[self.emitted:safe]))
            self.emitted = safe

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the row; send the rest of the text with the finish reason and token counts."""
        if self.done:
            return
        self.finish_reason = reason
        if self.on_finish is not None:  # e.g. a server unpins the adapter: a DELETE after the answer succeeds
            self.on_finish()
            self.on_finish = None
        rest = self.text[self.emitted:] if error is None else ""
        self.emitted = len(self.text)
        if self.sink is not None:
            self.sink(Event(self.index, rest, reason, len(self.prompt_ids), len(self.tokens), error))


def special_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[set[int], int]:
    """The token ids that end a row (the generation config's and the tokenizer's eos), and the id used
    for padding (masked out wherever it appears)."""
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    eos = eos if isinstance(eos, list) else [eos]
    eos_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return eos_ids, pad if pad is not None else 0


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-aligned in a (B, T) tensor, and the (B, T) mask of real positions."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)
