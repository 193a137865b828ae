"""Batching: right-padded collation and the seeded, resumable batch sampler."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .pretokenized import TokenRow, collate_rows
from .tokenize import IGNORE_INDEX, TokenizedExample


def collate(examples: Sequence[TokenizedExample | TokenRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into LongTensors (pre-tokenized rows: every column, ``pretokenized.collate_rows``).

    Args:
        examples: the batch.
        pad_id: token id written into the padding of ``input_ids`` (labels pad with -100).

    Returns:
        ``input_ids``, ``labels`` and ``attention_mask`` (1 on real tokens), each (B, T_max).
    """
    if not examples:
        raise DataError("collate: the batch is empty")
    if isinstance(examples[0], TokenRow):
        return collate_rows(list(examples), pad_id)
    if not isinstance(pad_id, int):
        raise ConfigError(f"collate: pad_id must be an int, found {pad_id!r} (does the tokenizer have a pad "
                          "or eos token?)")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class BatchSampler:
    """Endless, deterministic, resumable batches of example indices.

    Epoch e visits a permutation of range(n_examples) drawn from a generator seeded by
    (seed, epoch) alone, so the batches depend on nothing but these numbers and the position;
    ``state_dict()`` saves the position and ``load_state_dict()`` restores it exactly.

    Args:
        n_examples: dataset size.
        batch_size: indices per batch.
        seed: shuffling seed.
        drop_last: skip an epoch's last, smaller batch (default: keep it).
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int = 0, drop_last: bool = False) -> None:
        for name, value in (("n_examples", n_examples), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"BatchSampler: {name} must be an int >= 1, found {value!r}")
        if drop_last and n_examples < batch_size:
            raise ConfigError(f"BatchSampler: drop_last with {n_examples} examples < batch_size {batch_size} "
                              "would yield no batch")
        self.n_examples, self.batch_size, self.seed, self.drop_last = n_examples, batch_size, seed, drop_last
        self.epoch, self.index = 0, 0  # next batch starts at permutation(epoch)[index]
        self._order: list[int] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.n_examples, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        end = self.index + self.batch_size
        if self.index >= self.n_examples or (self.drop_last and end > self.n_examples):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
            end = self.batch_size
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        batch = self._order[self.index:end]
        self.index += len(batch)
        return batch

    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which epoch ``epoch`` visits the examples (batches are consecutive slices)."""
        order = list(range(self.n_examples))
        # A str seed is hashed with SHA-512: independent streams per (seed, epoch), same on every run.
        random.Random(f"lorakit:{self.seed}:{epoch}").shuffle(order)
        return order

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of epoch ``epoch``, as ``__next__`` yields them."""
        order, n = self.epoch_order(epoch), self.n_examples
        end = n - n % self.batch_size if self.drop_last else n
        return [order[i:i + self.batch_size] for i in range(0, end, self.batch_size)]

    def state_dict(self) -> dict[str, int]:
        """The position (epoch, index into that epoch's order) and the settings that fix the order."""
        return {"epoch": self.epoch, "index": self.index, "n_examples": self.n_examples,
                "batch_size": self.batch_size, "seed": self.seed, "drop_last": int(self.drop_last)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; the settings must match the ones it was saved with.

        Args:
            state: a dict from ``state_dict()``.
        """
        mine = self.state_dict()
        for key in sorted((set(mine) | set(state)) - {"epoch", "index"}):  # grouped_window: a grouped sampler's
            if state.get(key) != mine.get(key):
                raise DataError(f"BatchSampler state was saved with {key}={state.get(key)} but this sampler has "
                                f"{key}={mine.get(key)}; resuming would replay different batches")
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and isinstance(index, int) and epoch >= 0 and 0 <= index <= self.n_examples):
            raise DataError(f"BatchSampler state has epoch={epoch!r}, index={index!r}; expected ints with "
                            f"epoch >= 0 and 0 <= index <= {self.n_examples}")
        self.epoch, self.index, self._order = epoch, index, None


class LengthGroupedSampler(BatchSampler):
    """Batches of similar lengths (less padding), order still seeded by (seed, epoch) and resumable.

    Each epoch shuffles the examples, cuts the order into windows of ``window`` batches, sorts each
    window by length (longest first) so neighbours have similar lengths, cuts it into batches and
    shuffles the batches: the lengths inside a batch are alike, the order of batches stays random.

    Args:
        lengths: tokens of each example.
        batch_size, seed, drop_last: as for ``BatchSampler``.
        window: batches per sorted window (more: less padding, less randomness).
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, drop_last: bool = False, window: int = 50) -> None:
        self.lengths = [int(n) for n in lengths]
        super().__init__(len(self.lengths), batch_size, seed, drop_last)
        self.window = window

    def epoch_order(self, epoch: int) -> list[int]:
        order = super().epoch_order(epoch)
        size = self.batch_size * self.window
        grouped = [sorted(order[i:i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(order), size)]
        flat = [j for window in grouped for j in window]
        batches = [flat[i:i + self.batch_size] for i in range(0, len(flat), self.batch_size)]
        last = batches.pop() if len(batches[-1]) < self.batch_size else None  # a short batch stays last
        random.Random(f"lorakit:grouped:{self.seed}:{epoch}").shuffle(batches)
        return [j for batch in [*batches, *([last] if last else [])] for j in batch]

    def state_dict(self) -> dict[str, int]:
        return {**super().state_dict(), "grouped_window": self.window}


def padding_fraction(lengths, batches: Sequence[Sequence[int]]) -> float:
    """Share of the tokens of right-padded ``batches`` that are padding."""
    lengths = np.asarray(lengths)
    total = real = 0
    for batch in batches:
        sizes = lengths[list(batch)]
        total += len(batch) * int(sizes.max())
        real += int(sizes.sum())
    return 1 - real / total if total else 0.0
