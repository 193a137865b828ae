"""Tests for lorakit.data.readers and the alpaca / sharegpt / --columns formats: every input kind
gives the same tokens as the equivalent JSONL, errors name file:row, datasets is optional."""

from __future__ import annotations

import builtins
import json
import re

import numpy as np
import pytest
from test_data import make_tokenizer

from lorakit.data.formats import parse_columns
from lorakit.data.readers import read_records
from lorakit.data.tokenize import tokenize_examples
from lorakit.errors import ConfigError, DataError

ROWS = [{"question": "what is 2", "answer": "two"}, {"question": "hi", "answer": "there"}]


@pytest.fixture
def tok():
    return make_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def same_tokens(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a[i] == b[i]


def test_alpaca_is_a_user_turn_and_the_answer(tmp_path, tok):
    rows = [{"instruction": "what is", "input": "2", "output": "two"}, {"instruction": "hi", "output": "there"},
            {"instruction": "hi", "input": "", "output": "bye", "system": "be nice"}]
    records = read_records(write_jsonl(tmp_path / "a.jsonl", rows))
    assert records.describe() == "alpaca, 3 rows"
    expected = [{"messages": [{"role": "user", "content": "what is\n\n2"}, {"role": "assistant", "content": "two"}]},
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]},
                {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "bye"}]}]
    assert list(records) == expected
    same_tokens(tokenize_examples(records, tok, 64), tokenize_examples(expected, tok, 64))


def test_sharegpt_roles_map_to_messages(tmp_path, tok):
    conv = [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "there"}, {"from": "human", "value": "bye"}, {"from": "gpt", "value": "bye"}]
    records = read_records(write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}]))
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert list(records) == [{"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in conv]}]
    assert records.describe() == "sharegpt, 1 rows"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": conv}, {"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}:2: conversations\[0\] is from 'bot'; expected one of human"):
        read_records(bad)


def test_columns_map_other_names(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    with pytest.raises(DataError, match=r"qa.jsonl:1: expected a 'text'.*found keys \['answer', 'question'\] \(map other names with --columns"):
        read_records(path)
    records = read_records(path, parse_columns(["prompt=question", "completion=answer"]))
    assert list(records) == [{"prompt": r["question"], "completion": r["answer"]} for r in ROWS]
    with pytest.raises(DataError, match=r"qa.jsonl:1: column 'q' \(mapped to 'prompt' by --columns\) not found"):
        read_records(path, {"prompt": "q", "completion": "answer"})
    for bad in (["prompt"], ["nope=question"], ["prompt=a", "prompt=b"]):
        with pytest.raises(ConfigError, match="--columns"):
            parse_columns(bad)


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "save_to_disk"])
def test_table_inputs_equal_jsonl(tmp_path, tok, kind):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"data.{kind}"
    if kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    columns = parse_columns(["prompt=question", "completion=answer"])
    records = read_records(path, columns)
    reference = read_records(write_jsonl(tmp_path / "ref.jsonl", ROWS), columns)
    assert list(records) == list(reference) and records.describe() == "prompt/completion, 2 rows"
    same_tokens(tokenize_examples(records, tok, 64), tokenize_examples(reference, tok, 64))


def test_table_errors_name_file_and_row(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nhi,there\nhi,\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:row 2: 'completion' must be a string, found null"):
        read_records(path)
    saved = tmp_path / "dd"
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(saved))
    with pytest.raises(DataError, match=r"holds the splits \['train'\]; pass one split's directory"):
        read_records(saved)


def test_without_datasets_jsonl_works_and_tables_name_the_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    assert len(read_records(write_jsonl(tmp_path / "ok.jsonl", [{"text": "hi"}]))) == 1
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=re.escape("needs the datasets library: pip install 'lorakit[data]'")):
        read_records(tmp_path / "d.parquet")


def test_token_ids_live_in_compact_arrays(tok):
    ds = tokenize_examples([{"text": "hello world"}, {"prompt": "hi", "completion": "there"}], tok, 64)
    assert ds.ids.dtype == np.uint16 and ds.mask.dtype == np.uint8 and ds.offsets.tolist() == [0, 3, 6]
    assert ds.lengths.tolist() == [3, 3] and ds.nbytes == 6 * 2 + 6 + 3 * 8


@pytest.mark.slow  # spawned workers import torch and transformers: ~30 s on 2 loaded cores
def test_num_proc_gives_the_same_tokens(tok):
    records = [{"text": "hello world"}, {"prompt": "what is 2", "completion": "two"},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]}] * 700
    one = tokenize_examples(records, tok, 64)
    two = tokenize_examples(records, tok, 64, num_proc=2)
    assert np.array_equal(one.ids, two.ids) and np.array_equal(one.mask, two.mask)
    assert np.array_equal(one.offsets, two.offsets) and one.stats == two.stats
