"""Batch sources: what the loop trains on, one optimizer step at a time.

A batch source gives this rank's micro-batches for the next optimizer step (``next_step``) and can
save and restore its position exactly (``state_dict`` / ``load_state_dict``), so a resumed run
sees the batches the straight run would have seen. ``make_batches`` picks the source for a recipe.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.batching import BatchSampler, LengthGroupedSampler, collate, padding_fraction
from ..data.packing import collate_packed, fill_rate, pack
from ..data.tokenize import TokenizedDataset
from ..errors import DataError


class PaddedBatches:
    """Seeded shuffled batches of whole examples, right-padded to the longest in each micro-batch.

    Every rank draws the same global batch of ``batch_size`` examples and keeps rows
    ``rank::world`` of it, so 1 process and N processes train on the same examples.
    """

    def __init__(self, dataset: TokenizedDataset, batch_size: int, grad_accum: int, pad_id: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.dataset, self.grad_accum, self.pad_id = dataset, grad_accum, pad_id
        self.rank, self.world = rank, world
        self.sampler = BatchSampler(len(dataset), batch_size, seed=seed)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the data (the last may hold fewer micro-batches' worth)."""
        return -(-len(self.sampler) // self.grad_accum)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's share of one global batch: ``grad_accum`` micro-batches, each (rows, T)."""
        out = []
        for _ in range(self.grad_accum):
            rows = next(self.sampler)[self.rank::self.world]
            out.append(collate([self.dataset[i] for i in rows], self.pad_id))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        """The start-of-run figures: the padding share of the first epoch's batches."""
        return {"padding_fraction": padding_fraction(self.dataset.lengths, self.sampler.epoch_batches(0))}


class GroupedBatches(PaddedBatches):
    """PaddedBatches whose micro-batches hold examples of similar lengths (``LengthGroupedSampler``)."""

    def __init__(self, dataset: TokenizedDataset, batch_size: int, grad_accum: int, pad_id: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__(dataset, batch_size, grad_accum, pad_id, seed, rank, world)
        self.sampler = LengthGroupedSampler(dataset.lengths, batch_size, seed=seed)


class PackedBatches:
    """Seeded shuffled batches of packed rows: whole examples placed best-fit decreasing into rows of
    ``max_seq_len`` tokens (``data.packing``), ``position_ids`` restarting at each example.

    ``batch_size`` counts rows; every rank draws the same global batch of rows and keeps rows
    ``rank::world`` of it, as PaddedBatches does with examples.
    """

    def __init__(self, dataset: TokenizedDataset, max_seq_len: int, batch_size: int, grad_accum: int, pad_id: int,
                 seed: int, rank: int = 0, world: int = 1) -> None:
        self.dataset, self.grad_accum, self.pad_id = dataset, grad_accum, pad_id
        self.rank, self.world, self.max_seq_len = rank, world, max_seq_len
        self.rows = pack(dataset.lengths, max_seq_len)
        self.sampler = BatchSampler(len(self.rows), batch_size, seed=seed)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.sampler) // self.grad_accum)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.grad_accum):
            rows = next(self.sampler)[self.rank::self.world]
            out.append(collate_packed(self.dataset, [self.rows[i] for i in rows], self.pad_id))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "packed_max_seq_len": self.max_seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if state.pop("packed_max_seq_len", None) != self.max_seq_len:
            raise DataError("the checkpoint's batches were not packed into rows of "
                            f"{self.max_seq_len} tokens; resume with the recipe that wrote it (same --packing, "
                            "--max-seq-len)")
        self.sampler.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        lengths = self.dataset.lengths
        widths = [sum(int(lengths[i]) for i in self.rows[r]) for r in range(len(self.rows))]
        return {"packed_rows": len(self.rows), "fill_rate": fill_rate(lengths, self.rows, self.max_seq_len),
                "padding_fraction": padding_fraction(widths, self.sampler.epoch_batches(0))}


def make_batches(train_ds: TokenizedDataset, cfg, pad_id: int, info) -> PaddedBatches | PackedBatches:
    """The batch source a recipe asks for: packed rows, length-grouped or plain padded batches."""
    if cfg.packing:
        return PackedBatches(train_ds, cfg.max_seq_len, cfg.batch_size, cfg.grad_accum, pad_id, cfg.seed,
                             info.rank, info.world)
    kind = GroupedBatches if cfg.group_by_length else PaddedBatches
    return kind(train_ds, cfg.batch_size, cfg.grad_accum, pad_id, cfg.seed, info.rank, info.world)
