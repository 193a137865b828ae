"""Batch sources: what the loop trains on, one optimizer step at a time.

A batch source gives this rank's micro-batches for the next optimizer step (``next_step``) and can
save and restore its position exactly (``state_dict`` / ``load_state_dict``), so a resumed run
sees the batches the straight run would have seen. ``make_batches`` picks the source for a recipe.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.batching import BatchSampler, collate
from ..data.tokenize import TokenizedDataset


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


def make_batches(train_ds: TokenizedDataset, cfg, pad_id: int, info) -> PaddedBatches:
    """The batch source a recipe asks for."""
    return PaddedBatches(train_ds, cfg.batch_size, cfg.grad_accum, pad_id, cfg.seed, info.rank, info.world)
