"""Training runs on the data side: packed and length-grouped runs resume exactly, --epochs counts
packed rows, the token cache serves a second run, table inputs with --columns train."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from lorakit.data.packing import pack
from lorakit.data.readers import read_records
from lorakit.data.tokenize import tokenize_examples
from lorakit.errors import DataError
from lorakit.testing import char_tokenizer
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig


def _data(tmp_path, n=30):
    # lengths from 8 to ~45 characters: rows of 64 hold several examples
    rows = [{"prompt": f"{i} " + "ab" * (i % 7) * 3, "completion": "yes" if i % 2 else "no"} for i in range(n)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, tmp_path, out="run", **kw):
    base = dict(model=str(model_dir), data=str(_data(tmp_path)), eval_data=str(_data(tmp_path)),
                out=str(tmp_path / out), max_steps=12, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1,
                eval_every=0, save_every=4, log_every=1, max_seq_len=64, r=4, alpha=8, seed=3, dtype="float32",
                data_cache=str(tmp_path / "cache"))
    base.update(kw)
    return TrainConfig(**base)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("mode", [{"packing": True}, {"group_by_length": True}])
def test_packed_and_grouped_runs_resume_to_the_straight_run(tiny_model_dir, tmp_path, monkeypatch, mode):
    train(_cfg(tiny_model_dir, tmp_path, out="straight", **mode), progress=False)
    import lorakit.train.loop as loop

    real_save = loop.save_checkpoint

    def save_then_die(ckpt_dir, step, *args, **kwargs):
        path = real_save(ckpt_dir, step, *args, **kwargs)
        if step == 8:
            raise _Killed
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(_cfg(tiny_model_dir, tmp_path, out="resumed", **mode), progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    summary = train(_cfg(tiny_model_dir, tmp_path, out="resumed", resume=True, **mode), progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    assert summary["data"]["train"]["token_cache"] == "hit"  # the resumed run did not tokenize again
    with pytest.raises(DataError, match="resum"):  # a packed position is refused by a padded run, and back
        other = {"packing": not mode.get("packing", False)}
        train(_cfg(tiny_model_dir, tmp_path, out="resumed", resume=True, max_steps=16, **other), progress=False)


def test_packed_epoch_counts_rows_and_reports_fill(tiny_model_dir, tmp_path, capsys):
    cfg = _cfg(tiny_model_dir, tmp_path, max_steps=0, epochs=1, packing=True, save_every=0)
    summary = train(cfg, progress=False)
    ds = tokenize_examples(read_records(cfg.data), char_tokenizer(), 64)
    rows = pack(ds.lengths, 64)
    assert len(rows) < len(ds) / 2  # several examples per row
    assert summary["steps"] == math.ceil(math.ceil(len(rows) / 2) / 2)
    data = summary["data"]["train"]
    assert data["packed_rows"] == len(rows) and data["fill_rate"] == pytest.approx(ds.lengths.sum() / (len(rows) * 64))
    assert data["format"] == "prompt/completion, 30 rows" and data["token_cache"] == "built"
    out = capsys.readouterr().out
    assert f"packed into {len(rows)} rows of 64 tokens" in out and "prompt/completion, 30 rows" in out


def test_padded_report_suggests_packing(tiny_model_dir, tmp_path, capsys):
    summary = train(_cfg(tiny_model_dir, tmp_path, max_steps=1, batch_size=8, grad_accum=1, data_cache="off"),
                    progress=False)
    padding = summary["data"]["train"]["padding_fraction"]
    assert 0.3 < padding < 1 and summary["data"]["train"]["token_cache"] == "off"
    assert f"batches {padding:.1%} padding (variable lengths: --packing" in capsys.readouterr().out


def test_parquet_with_columns_trains_like_the_jsonl(tiny_model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in _data(tmp_path).read_text().splitlines()]
    table = tmp_path / "qa.parquet"
    datasets.Dataset.from_list([{"question": r["prompt"], "answer": r["completion"]} for r in rows]).to_parquet(
        str(table))
    train(_cfg(tiny_model_dir, tmp_path, out="jsonl", max_steps=3, eval_data=None), progress=False)
    summary = train(_cfg(tiny_model_dir, tmp_path, out="parquet", max_steps=3, eval_data=None, data=str(table),
                         columns=["prompt=question", "completion=answer"]), progress=False)
    a = load_file(tmp_path / "jsonl" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "parquet" / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert summary["data"]["train"]["format"] == "prompt/completion, 30 rows"
