"""Tests for lorakit.data.pretokenized: pre-tokenized rows from every file kind give the same batches as
a hand-written collator; bad rows are named by file:row; pickles are refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorakit.data.batching import collate
from lorakit.data.pretokenized import is_pretokenized, parse_pad_values, read_token_rows
from lorakit.errors import ConfigError, DataError

ROWS_1D = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "spk": 3, "pitch": [0.5, 0.25, 1.0, 2.0],
            "id": "utt-1"},
           {"input_ids": [9, 10], "labels": [-100, 10], "spk": 1, "pitch": [1.5, 1.5], "id": "utt-2"}]
ROWS_2D = [{"input_ids": [[1, 2, 3], [4, 5, 6]], "labels": [[-100, 2, 3], [-100, 5, 6]], "attention_mask": [1, 1, 1]},
           {"input_ids": [[7], [8]], "labels": [[7], [8]], "attention_mask": [1]}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hand_collate_1d(rows, pad_id, pitch_pad):
    """An independent collator: torch's pad_sequence per column."""
    def pad(key, value, dtype):
        return torch.nn.utils.rnn.pad_sequence([torch.tensor(r[key], dtype=dtype) for r in rows], batch_first=True,
                                               padding_value=value)
    ids = pad("input_ids", pad_id, torch.long)
    mask = pad("input_ids", 0, torch.long).clone()
    for i, r in enumerate(rows):
        mask[i, :len(r["input_ids"])] = 1
    mask[mask != 1] = 0
    return {"input_ids": ids, "labels": pad("labels", -100, torch.long), "spk": torch.tensor([r["spk"] for r in rows]),
            "pitch": pad("pitch", pitch_pad, torch.float32), "attention_mask": mask}


def hand_collate_2d(rows, pad_id):
    width = max(len(r["attention_mask"]) for r in rows)

    def pad(key, value):
        return torch.stack([F.pad(torch.tensor(r[key]), (0, width - torch.tensor(r[key]).shape[-1]), value=value)
                            for r in rows])
    return {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", -100), "attention_mask": pad("attention_mask", 0)}


def batch_of(source, pad_id=0, pad_values=None, max_seq_len=64):
    ds = read_token_rows(source).to_dataset(max_seq_len, pad_values)
    return collate([ds[i] for i in range(len(ds))], pad_id)


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def test_1d_rows_collate_like_a_hand_written_collator(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS_1D)
    assert is_pretokenized(path)
    records = read_token_rows(path)
    assert records.describe() == ("pre-tokenized, 2 rows: input_ids (time), labels (time), spk (one per row), "
                                  "pitch (time); left out (not numeric): id")
    got = batch_of(path, pad_id=2, pad_values={"pitch": -1.5})
    assert_same(got, hand_collate_1d(ROWS_1D, 2, -1.5))
    assert got["pitch"][1].tolist() == [1.5, 1.5, -1.5, -1.5]


def test_2d_rows_collate_like_a_hand_written_collator(tmp_path):
    path = write_jsonl(tmp_path / "grid.jsonl", ROWS_2D)
    got = batch_of(path, pad_id=99)
    assert got["input_ids"].shape == (2, 2, 3)
    assert_same(got, hand_collate_2d(ROWS_2D, 99))
    # --pad-value input_ids=V wins over the pad id
    assert batch_of(path, pad_id=99, pad_values={"input_ids": 4})["input_ids"][1, :, 1:].eq(4).all()


def test_every_file_kind_reads_the_same_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    want = batch_of(write_jsonl(tmp_path / "rows.jsonl", ROWS_2D), pad_id=0)
    ds = datasets.Dataset.from_list(ROWS_2D)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    lengths = np.array([3, 1])
    np.savez(tmp_path / "rows.npz", lengths=lengths,
             input_ids=np.concatenate([np.array(r["input_ids"]) for r in ROWS_2D], axis=-1),
             labels=np.concatenate([np.array(r["labels"]) for r in ROWS_2D], axis=-1),
             attention_mask=np.ones(4, dtype=np.int64))
    for source in (tmp_path / "rows.parquet", tmp_path / "saved", tmp_path / "rows.npz", ROWS_2D):
        if not isinstance(source, list):
            assert is_pretokenized(source), source
        assert_same(batch_of(source, pad_id=0), want)


def test_npz_per_row_numbers_and_own_lengths(tmp_path):
    np.savez(tmp_path / "r.npz", lengths=np.array([2, 3]), input_ids=np.arange(5), **{
        "row.spk": np.array([7, 8]), "lengths.mel": np.array([1, 2]), "mel": np.array([[0.5, 1.0, 2.0]])})
    rows = read_token_rows(tmp_path / "r.npz").rows
    assert rows[1]["input_ids"].tolist() == [2, 3, 4] and int(rows[1]["spk"]) == 8
    assert rows[0]["mel"].tolist() == [[0.5]] and rows[1]["mel"].tolist() == [[1.0, 2.0]]


def test_truncation_and_stats(tmp_path):
    ds = read_token_rows(ROWS_1D).to_dataset(3)
    assert ds[0]["input_ids"].tolist() == [5, 6, 7] and ds[0]["pitch"].tolist() == [0.5, 0.25, 1.0]
    assert ds.stats.n_truncated == 1 and ds.stats.n_tokens == 5
    assert ds.stats.n_trainable_tokens == 1 + 1  # labels at positions >= 1: [7] of row 1 (cut), [10] of row 2
    assert ds.lengths.tolist() == [3, 2]


def test_pickles_are_refused(tmp_path):
    np.save(tmp_path / "rows.npy", np.array([np.arange(3), np.arange(2)], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickle"):
        read_token_rows(tmp_path / "rows.npy")
    np.savez(tmp_path / "obj.npz", lengths=np.array([1]), input_ids=np.array([object()], dtype=object))
    with pytest.raises(DataError, match=r"obj\.npz: Object arrays cannot be loaded"):
        read_token_rows(tmp_path / "obj.npz")


@pytest.mark.parametrize("second, message", [
    ({"input_ids": [1, 2], "labels": [1]}, r"'labels' must be ints shaped like input_ids \(2,\)"),
    ({"input_ids": [[1, 2]], "labels": [[1, 2]]}, r"column 'input_ids' is 1 × time int64, but \(time\) int"),
    ({"input_ids": [1, -2], "labels": [1, 2]}, r"'input_ids' must be non-negative ints"),
    ({"input_ids": [1, 2]}, r"missing column\(s\) \['labels'\]"),
    ({"input_ids": [1, 2], "labels": [1, 2], "extra": [3]}, r"column 'extra' is not in the first row"),
    ({"text": "hello"}, r"expected a pre-tokenized row \(an 'input_ids' list"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, second, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, second])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {message}"):
        read_token_rows(path)


def test_attention_mask_is_checked(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"input_ids": [1, 2], "attention_mask": [1, 1]},
                                              {"input_ids": [1, 2], "attention_mask": [1, 2]}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: 'attention_mask' must be 0/1"):
        read_token_rows(path)


def test_pad_values_parse_and_check():
    assert parse_pad_values(["mel=-4", "input_ids=0", "f=0.5"]) == {"mel": -4, "input_ids": 0, "f": 0.5}
    assert isinstance(parse_pad_values(["mel=-4"])["mel"], int)
    for bad in ("mel", "mel=x", "=3"):
        with pytest.raises(ConfigError, match="expected COLUMN=NUMBER"):
            parse_pad_values([bad])
    rows = read_token_rows(ROWS_1D)
    with pytest.raises(ConfigError, match="no sequence column 'spk'"):
        rows.to_dataset(8, {"spk": 0})
    with pytest.raises(ConfigError, match="holds ints; give a whole number"):
        rows.to_dataset(8, {"labels": 0.5})


def test_rows_named_by_the_model_need_no_input_ids(tmp_path):
    """A model with its own loss (examples/cosyvoice_lm.py) reads text_ids and speech_ids padded with -100."""
    rows = [{"text_ids": [3, 4, 5], "speech_ids": [7, 8]}, {"text_ids": [6], "speech_ids": [9, 1, 2, 3]}]
    path = write_jsonl(tmp_path / "tts.jsonl", rows)
    assert is_pretokenized(path)
    got = batch_of(path, pad_values={"text_ids": -100, "speech_ids": -100})
    assert set(got) == {"text_ids", "speech_ids"}
    assert got["text_ids"].tolist() == [[3, 4, 5], [6, -100, -100]]
    assert got["speech_ids"].tolist() == [[7, 8, -100, -100], [9, 1, 2, 3]]
    assert read_token_rows(path).to_dataset(8).lengths.tolist() == [3, 4]


def test_text_files_are_not_pretokenized(tmp_path):
    assert not is_pretokenized(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}]))
    assert not is_pretokenized(write_jsonl(tmp_path / "e.jsonl", [{"input_ids": []}]))
