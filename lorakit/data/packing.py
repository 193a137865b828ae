"""Packing: whole examples placed into rows of ``max_seq_len`` tokens, so a batch carries almost no padding.

Rows are filled best-fit decreasing: examples, longest first, each go into the open row with the
least room that still holds it (a new row when none does). A packed row carries ``position_ids``
that restart at 0 for each example; given ``position_ids`` and no 2D attention mask, attention never
crosses an example: the trainer switches the model to per-example attention
(``lorakit.models.attention``: flash-attention 2's variable-length path on CUDA where installed,
else causal SDPA per example's span), and transformers' own block-diagonal mask covers the rest. The first token of each example gets no label: it would otherwise be predicted
from the previous example's last token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .tokenize import IGNORE_INDEX, TokenizedDataset


def pack(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of example lengths into rows of ``capacity`` tokens.

    Args:
        lengths: tokens of each example (each <= capacity).
        capacity: tokens per row (max_seq_len).

    Returns:
        Rows of example indices, in the order they were opened (deterministic for given lengths).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ConfigError(f"pack: example lengths must be within [1, {capacity}], found "
                          f"[{lengths.min()}, {lengths.max()}]")
    size = 1 << int(capacity).bit_length()  # leaves: room 0..capacity
    tree = [0] * (2 * size)  # tree[node] = open rows whose room lies in the node's range
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    rows: list[list[int]] = []
    room_of: list[int] = []

    def add(room: int, delta: int) -> None:
        node = room + size
        while node:
            tree[node] += delta
            node >>= 1

    for index in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[index])
        room = _smallest_at_least(tree, size, need)
        if room is None:  # no open row holds it: open one
            rows.append([index])
            room_of.append(capacity - need)
        else:
            row = by_room[room].pop()
            add(room, -1)
            rows[row].append(index)
            room_of[row] = room - need
        row = len(rows) - 1 if room is None else row
        if room_of[row] > 0:
            by_room[room_of[row]].append(row)
            add(room_of[row], 1)
    return rows


def _smallest_at_least(tree: list[int], size: int, need: int) -> int | None:
    """The smallest room >= need that some open row has (successor search in the count tree), or None."""
    node = need + size
    if tree[node]:
        return need
    while node > 1:  # climb to the first left child whose right sibling holds an open row
        if node % 2 == 0 and tree[node + 1]:
            node += 1
            break
        node >>= 1
    else:
        return None
    while node < size:  # descend to the leftmost non-empty leaf
        node = 2 * node if tree[2 * node] else 2 * node + 1
    return node - size


def fill_rate(lengths: np.ndarray, rows: list[list[int]], capacity: int) -> float:
    """Share of the rows' ``capacity`` tokens that hold example tokens."""
    return float(np.asarray(lengths).sum()) / (len(rows) * capacity) if rows else 0.0


def collate_packed(dataset: TokenizedDataset, rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of packed rows, right-padded to its fullest row.

    Args:
        dataset: the tokenized set the indices point into.
        rows: example indices of each row.
        pad_id: token id written into the padding of ``input_ids``.

    Returns:
        ``input_ids``, ``labels`` (-100 on each example's first token and on padding),
        ``attention_mask`` (1 on example tokens: counts only; the model is given position_ids
        instead) and ``position_ids`` (0, 1, ... within each example and within the padding), (B, T).
    """
    offsets, lengths = dataset.offsets, dataset.lengths
    width = max(int(lengths[list(row)].sum()) for row in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            start, n = int(offsets[i]), int(lengths[i])
            ids = dataset.ids[start:start + n].astype(np.int64)  # uint16 ids would wrap -100
            input_ids[r, at:at + n] = ids
            labels[r, at + 1:at + n] = np.where(dataset.mask[start + 1:start + n] > 0, ids[1:], IGNORE_INDEX)
            attention_mask[r, at:at + n] = 1
            position_ids[r, at:at + n] = np.arange(n)
            at += n
        position_ids[r, at:] = np.arange(width - at)
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(attention_mask), "position_ids": torch.from_numpy(position_ids)}
