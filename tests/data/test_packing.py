"""Tests for lorakit.data.packing (best-fit decreasing, against a brute-force reference) and the
length-grouped sampler."""

import numpy as np
import pytest

from lorakit.data.batching import BatchSampler, LengthGroupedSampler, padding_fraction
from lorakit.data.packing import fill_rate, pack
from lorakit.errors import ConfigError, DataError


def best_fit_decreasing(lengths, capacity):
    """The textbook algorithm, quadratic: each item, longest first, into the fullest row that holds it."""
    rows, rooms = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if rooms[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: rooms[r])
            rows[r].append(i)
            rooms[r] -= lengths[i]
        else:
            rows.append([i])
            rooms.append(capacity - lengths[i])
    return rows


@pytest.mark.parametrize("capacity", [8, 64, 300])
def test_pack_is_best_fit_decreasing(capacity):
    rng = np.random.default_rng(capacity)
    lengths = np.minimum(rng.lognormal(np.log(capacity / 6), 1.0, size=400).astype(int) + 1, capacity)
    rows = pack(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each example once, whole
    assert all(lengths[row].sum() <= capacity for row in rows)
    reference = best_fit_decreasing(lengths.tolist(), capacity)
    # the same row contents (ties between equal rooms may pick other rows: compare the multisets of loads)
    assert sorted(int(lengths[r].sum()) for r in rows) == sorted(int(lengths[r].sum()) for r in reference)
    assert fill_rate(lengths, rows, capacity) == lengths.sum() / (len(rows) * capacity)


def test_pack_refuses_examples_longer_than_a_row():
    with pytest.raises(ConfigError, match=r"within \[1, 4\]"):
        pack([3, 5], 4)


def test_grouped_batches_have_similar_lengths_and_resume():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=1000)
    grouped = LengthGroupedSampler(lengths, 8, seed=3, window=20)
    plain = BatchSampler(1000, 8, seed=3)
    epoch = grouped.epoch_batches(0)
    assert sorted(i for b in epoch for i in b) == list(range(1000))
    assert padding_fraction(lengths, epoch) < padding_fraction(lengths, plain.epoch_batches(0)) / 4
    assert epoch != grouped.epoch_batches(1)  # reshuffled per epoch
    straight = [next(grouped) for _ in range(300)]  # crosses into epoch 3
    again = LengthGroupedSampler(lengths, 8, seed=3, window=20)
    for _ in range(137):
        next(again)
    resumed = LengthGroupedSampler(lengths, 8, seed=3, window=20)
    resumed.load_state_dict(again.state_dict())
    assert [next(resumed) for _ in range(163)] == straight[137:]
    assert straight[:125] == epoch
    with pytest.raises(DataError, match="grouped_window"):
        plain.load_state_dict(again.state_dict())


def test_padding_fraction():
    assert padding_fraction([2, 4, 4], [[0, 1], [2]]) == pytest.approx(1 - 10 / 12)
