"""The loop runs any Objective: units-weighted means over micro-batches, metrics, eval figures, state on
resume; an unknown objective fails before any data is read."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.data.batching import BatchSampler
from lorakit.data.tokenize import IGNORE_INDEX, tokenize_examples
from lorakit.models.load import load_model
from lorakit.train import objectives
from lorakit.train.loop import train
from lorakit.train.objectives import Objective, StepLoss
from lorakit.train.recipe import TrainConfig


def _rows(n=12):
    # answers of 1 and of 3 words: a per-row mean differs from a per-token mean
    return [{"prompt": f"{i} is a number, say ", "completion": "yes" if i % 2 else "no no no"} for i in range(n)]


def _write(tmp_path, rows):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class RowMean(Objective):
    """Mean over rows of each row's mean token cross-entropy (units = rows), with a metric and a counter
    that a resumed run must get back."""

    name = "row-mean"
    seen_states: list[dict] = []

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        per_tok = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX,
                                  reduction="none")  # (B, T-1)
        n = (labels != IGNORE_INDEX).sum(1)  # (B,)
        per_row = per_tok.sum(1) / n
        long = float((n > 5).sum())
        return StepLoss(per_row.sum(), len(per_row), int(batch["attention_mask"].sum()),
                        {"rows/long": (long, len(per_row))})

    def evaluate(self, model, eval_ds, cfg, pad_id, info):
        return {**super().evaluate(model, eval_ds, cfg, pad_id, info), "eval_calls": float(self.calls)}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        RowMean.seen_states.append(state)
        self.calls = state["calls"]


@pytest.fixture
def row_mean(monkeypatch):
    monkeypatch.setitem(objectives.OBJECTIVES, "row-mean", RowMean)
    RowMean.seen_states = []
    return RowMean


def _cfg(model_dir, tmp_path, **kw):
    data = str(_write(tmp_path, _rows()))
    base = dict(model=str(model_dir), data=data, eval_data=data, out=str(tmp_path / "run"), objective="row-mean",
                max_steps=1, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=0, eval_every=0, log_every=1,
                max_seq_len=32, r=4, alpha=8, seed=5, dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def test_the_logged_loss_is_the_units_weighted_mean_over_micro_batches(tiny_model_dir, tmp_path, row_mean):
    cfg = _cfg(tiny_model_dir, tmp_path)
    train(cfg, progress=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    # reference: the base model (B = 0 at step 1) on the 4 rows the sampler deals for step 1
    sampler = BatchSampler(12, 2, seed=cfg.seed)
    rows = next(sampler) + next(sampler)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()
    _, tokenizer = load_model(str(tiny_model_dir))
    ds = tokenize_examples(_rows(), tokenizer, 32)
    per_row, long = [], 0
    with torch.no_grad():
        for i in rows:
            ex = ds[i]
            ids = torch.tensor(ex.input_ids)[None]
            labels = torch.tensor(ex.labels)[1:]
            logits = model(ids).logits[0, :-1]
            keep = labels != IGNORE_INDEX
            per_row.append(float(F.cross_entropy(logits[keep], labels[keep])))
            long += int(keep.sum()) > 5
    assert first["loss"] == pytest.approx(sum(per_row) / 4, rel=1e-5)
    assert 0 < long < 4 and first["rows/long"] == pytest.approx(long / 4)


def test_eval_figures_and_objective_state_survive_a_resume(tiny_model_dir, tmp_path, row_mean):
    cfg = _cfg(tiny_model_dir, tmp_path, max_steps=4, stop_after=2, eval_every=2, save_every=2)
    train(cfg, progress=False)  # pauses after step 2 with a checkpoint
    train(TrainConfig(**{**cfg.to_dict(), "resume": True, "stop_after": 0}), progress=False)
    assert RowMean.seen_states == [{"calls": 4}]  # 2 steps × 2 micro-batches before the pause
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and [r["eval_calls"] for r in evals] == [4.0, 8.0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["objective"] == "row-mean"


def test_an_unknown_objective_fails_before_the_data_is_read(tmp_path):
    cfg = TrainConfig(data=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "run"), objective="dpp")
    with pytest.raises(lk.ConfigError, match=r"objective must be one of .*sft.*got 'dpp'"):
        train(cfg, progress=False)
