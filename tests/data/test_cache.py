"""Tests for lorakit.data.cache: a hit gives the same arrays without tokenizing, every key input
invalidates, a corrupt entry is rebuilt."""

import json

import numpy as np
import pytest
from test_data import CHATML, make_tokenizer

import lorakit.data.cache as cache
from lorakit.data.readers import read_records

ROWS = [{"prompt": "what is 2", "completion": "two", "q": "what is a"},
        {"prompt": "hi", "completion": "there", "q": "bye"}]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def count_tokenizations(monkeypatch):
    calls = []
    real = cache.tokenize_examples
    monkeypatch.setattr(cache, "tokenize_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def same(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in cache.ARRAYS) and a.stats == b.stats


def test_second_run_hits_the_cache_memory_mapped(tmp_path, data, monkeypatch):
    calls = count_tokenizations(monkeypatch)
    first, how = cache.cached_tokenize(read_records(data), make_tokenizer(), 16, tmp_path / "c")
    assert how == "built" and len(calls) == 1
    second, how = cache.cached_tokenize(read_records(data), make_tokenizer(), 16, tmp_path / "c")  # a new tokenizer
    assert how == "hit" and len(calls) == 1 and same(first, second)
    assert isinstance(second.ids, np.memmap)


@pytest.mark.parametrize("change", ["data", "columns", "max_seq_len", "template", "tokenizer"])
def test_each_key_input_invalidates(tmp_path, data, monkeypatch, change):
    cache.cached_tokenize(read_records(data), make_tokenizer(), 16, tmp_path / "c")
    calls = count_tokenizations(monkeypatch)
    tok, max_len, columns = make_tokenizer(), 16, None
    if change == "data":
        data.write_text(data.read_text().replace("two", "2"))
    elif change == "columns":
        columns = {"prompt": "q"}  # the same file read another way
    elif change == "max_seq_len":
        max_len = 8
    elif change == "template":
        tok = make_tokenizer(CHATML.replace("<|im_start|>", "<|im_start|> "))
    else:
        tok.add_tokens(["zebra"])
    _, how = cache.cached_tokenize(read_records(data, columns), tok, max_len, tmp_path / "c")
    assert how == "built" and len(calls) == 1


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "meta", "remove"])
def test_corrupt_entry_is_rebuilt_not_trusted(tmp_path, data, damage):
    good, _ = cache.cached_tokenize(read_records(data), make_tokenizer(), 16, tmp_path / "c")
    (entry,) = (tmp_path / "c").iterdir()
    ids = entry / "ids.npy"
    if damage == "flip a byte":
        raw = bytearray(ids.read_bytes())
        raw[-1] ^= 1
        ids.write_bytes(bytes(raw))
    elif damage == "truncate":
        ids.write_bytes(ids.read_bytes()[:-2])
    elif damage == "meta":
        (entry / "meta.json").write_text("{")
    else:
        (entry / "mask.npy").unlink()
    again, how = cache.cached_tokenize(read_records(data), make_tokenizer(), 16, tmp_path / "c")
    assert how.startswith("rebuilt (") and same(good, again)
    assert cache.cached_tokenize(read_records(data), make_tokenizer(), 16, tmp_path / "c")[1] == "hit"
    assert [p.name for p in (tmp_path / "c").iterdir()] == [entry.name]  # no temporary left behind
