"""Iteration-level scheduling (continuous batching): rows join and leave the batch at every decoding step.

A :class:`Running` batch holds the rows in flight, their shared :class:`SlotCache` and the
mixed-adapter context their order implies. Its driver (:func:`lorakit.generate.generate`, or a
server's worker) calls, once per iteration:

    running.admit(new_rows)   # prefill the newcomers together (their own adapters, shared prefixes
                              # once), first token each
    running.step()            # one decoding step for every row in flight
    running.drop_done()       # finished or cancelled rows leave; their slots are freed

Each row keeps its own adapter, sampling settings, stop strings and generator, and its own position
ids, so what it generates does not depend on which rows it shares a step with.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from ..lora.adapters import list_adapters, lora_layers
from ..lora.mixed import mixed_batch, set_rows
from .kvcache import SlotCache
from .prefix import plan_groups, prefill
from .rows import Row
from .sampling import choose_tokens, new_generator


class AdapterContext:
    """A mixed_batch context kept open across steps; when the rows change only the per-row factors are
    re-gathered (``set_rows``), without the checks and module walk of entering the block again."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.names: tuple | None = None
        self._layers: list | None = None  # the model's LoRA layers while the block is open
        self._known: set[str] = set()  # the model's adapters when the block was entered
        self._stack = contextlib.ExitStack()

    def use(self, names: list[str | None]) -> None:
        key = tuple(names)
        if key == self.names:
            return
        if self._layers is not None and not set(names) - {None} <= self._known:
            self.close()  # re-entering checks the names (and raises for an unknown one)
        if self._layers is None:
            self._stack.enter_context(mixed_batch(self.model, names))
            self._layers = [layer for _, layer in lora_layers(self.model)]
            self._known = set(list_adapters(self.model))
        else:  # the adapters are the ones checked on entry: loads and unloads close the block first
            set_rows(self._layers, names)
        self.names = key

    def close(self) -> None:
        """Leave the block (before the model's adapters change, or when no row runs)."""
        self._stack.close()
        self.names = self._layers = None


class Running:
    """The rows in flight and their cache.

    Args:
        model: a causal LM in eval mode holding the rows' adapters (none merged when ``mixed``).
        tokenizer: decodes generated tokens for stop strings and streaming.
        eos_ids: token ids that end a row.
        pad_id: id used for left padding in prefill (masked out).
        mixed: run each row with its own ``Row.adapter`` (a mixed-adapter batch); False runs every row
            with the model as it is (its active adapters, merged or not).
        prefix_sharing: rows admitted together whose prompts share a leading block prefill it once
            (:mod:`lorakit.generate.prefix`).
        logprobs: record each row's log-probabilities of its chosen tokens in ``Row.logprobs``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, eos_ids: set[int], pad_id: int, *,
                 mixed: bool = True, prefix_sharing: bool = True, logprobs: bool = False):
        self.model, self.tokenizer, self.eos_ids, self.pad_id = model, tokenizer, eos_ids, pad_id
        self.mixed, self.prefix_sharing, self.logprobs = mixed, prefix_sharing, logprobs
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []  # in cache order
        self.kv = SlotCache()
        self.adapters = AdapterContext(model)
        self.prefill_tokens = 0  # prompt tokens run through the model in prefills
        self.shared_tokens = 0  # prompt tokens a shared prefix saved from being run again

    def __len__(self) -> int:
        return len(self.rows)

    def _use(self, names: list[str | None]) -> None:
        if self.mixed:
            self.adapters.use(names)

    @torch.no_grad()
    def admit(self, rows: list[Row]) -> None:
        """Prefill ``rows`` together, pick each one's first token, and add the unfinished ones to the batch."""
        now = time.monotonic()
        for row in rows:
            row.generator = new_generator(row.params.seed, self.device)
            row.admitted_at = now
            if self.logprobs:
                row.logprobs = []
        prompts, names = [r.prompt_ids for r in rows], [r.adapter for r in rows]
        groups = plan_groups(prompts, names) if self.prefix_sharing else [(0, [i]) for i in range(len(rows))]
        saved = sum((len(members) - 1) * p for p, members in groups)
        self.prefill_tokens += sum(map(len, prompts)) - saved
        self.shared_tokens += saved
        logits, cache, mask = prefill(self.model, prompts, names, self.pad_id, groups, self._use)
        self._push(rows, logits)
        for row in rows:
            row.position = len(row.prompt_ids)
        keep = [i for i, r in enumerate(rows) if not r.done]
        if keep:
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask = mask.index_select(0, index)
            self.kv.add(cache, mask)
            self.rows += [rows[i] for i in keep]

    @torch.no_grad()
    def step(self) -> None:
        """One decoding step for every row in flight (call :meth:`drop_done` first)."""
        if not self.rows:
            return
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)  # (B, 1)
        mask = self.kv.grow()  # (B, T+1)
        self._use([r.adapter for r in self.rows])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.kv.cache,
                         use_cache=True, logits_to_keep=1)
        for row in self.rows:
            row.position += 1
        self._push(self.rows, out.logits[:, -1].float())

    def drop_done(self) -> list[Row]:
        """Remove finished and cancelled rows from the batch and the cache; returns them."""
        gone = [r for r in self.rows if r.done]
        if gone:
            keep = [i for i, r in enumerate(self.rows) if not r.done]
            self.kv.keep(keep)
            self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.adapters.close()
        return gone

    def fail(self, message: str) -> list[Row]:
        """End every row with an error (after an exception), empty the batch; returns the rows."""
        rows, self.rows = self.rows, []
        for row in rows:
            row.finish("error", message)
        self.kv.keep([])
        self.adapters.close()
        return rows

    def _push(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Choose each row's next token from its (B, V) fp32 logits and append it."""
        tokens, logprobs = choose_tokens(logits, rows, self.logprobs)
        scores = logprobs.tolist() if logprobs is not None else [None] * len(rows)
        for row, token, score in zip(rows, tokens.tolist(), scores, strict=True):
            if not row.done:
                row.push(token, self.tokenizer, self.eos_ids, score)
