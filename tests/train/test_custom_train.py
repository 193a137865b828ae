"""Training a model of your own: --model FILE.py:FUNCTION, --weights, --loss, pre-tokenized 2-D rows.

References: transformers' own causal-LM loss, a hand-computed row-weighted mean of the user's loss over
the micro-batches the sampler draws, the state dict written to --weights."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch
import torch.nn.functional as F
from builders import tiny_llama
from safetensors.torch import load_file, save_file

from lorakit.data.batching import BatchSampler, collate
from lorakit.data.pretokenized import read_token_rows
from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.errors import ConfigError, ModelLoadError, TrainingError
from lorakit.train.loop import train
from lorakit.train.objectives import OwnLoss, make_objective
from lorakit.train.objectives.custom import default_loss_sum
from lorakit.train.recipe import TrainConfig
from lorakit.train.setup import build_model

GRID = '''
import torch
import torch.nn.functional as F
from torch import nn

STREAMS, VOCAB, HIDDEN = 2, 16, 24


class Grid(nn.Module):
    """Two token streams over time: summed embeddings, one causal attention, one head for both streams."""

    def __init__(self):
        super().__init__()
        self.embed = nn.ModuleList(nn.Embedding(VOCAB, HIDDEN) for _ in range(STREAMS))
        self.wqkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.wo = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, STREAMS * VOCAB)

    def forward(self, input_ids, attention_mask):
        x = sum(e(input_ids[:, i]) for i, e in enumerate(self.embed))  # (B, T, H)
        q, k, v = self.wqkv(x).chunk(3, -1)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        x = x + self.wo(F.scaled_dot_product_attention(q, k, v, attn_mask=causal[None] & attention_mask[:, None].bool()))
        return self.head(x).view(*x.shape[:2], STREAMS, VOCAB).transpose(1, 2)  # (B, S, T, V)


def build():
    torch.manual_seed(0)
    return Grid()


def loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])[..., :-1, :]
    labels = batch["labels"][..., 1:]
    per = [F.cross_entropy(logits[:, s].reshape(-1, VOCAB), labels[:, s].reshape(-1)) for s in range(STREAMS)]
    return {"loss": sum(per) / STREAMS, "semantic": per[0], "codebook": per[1]}


def row_loss(model, batch):
    """Mean over rows of each row's token mean: a figure independent of how rows are split (DDP)."""
    logits = model(batch["input_ids"], batch["attention_mask"])[..., :-1, :]
    labels = batch["labels"][..., 1:]
    per_token = F.cross_entropy(logits.transpose(1, -1), labels.transpose(1, -1), reduction="none")  # (B, T-1, S)
    labelled = (labels != -100).transpose(1, -1)
    per_row = (per_token * labelled).sum((1, 2)) / labelled.sum((1, 2))
    return {"loss": per_row.mean(), "first_stream": ((per_token[..., 0] * labelled[..., 0]).sum(1)
                                                     / labelled[..., 0].sum(1)).mean()}
'''


@pytest.fixture
def grid(tmp_path):
    """(the model file, its module imported, a file of pre-tokenized 2-stream rows)."""
    src = tmp_path / "grid.py"
    src.write_text(GRID)
    rng = random.Random(0)
    rows = []
    for i in range(8):
        t = rng.randint(3, 9)
        ids = [[rng.randrange(16) for _ in range(t)] for _ in range(2)]
        rows.append({"input_ids": ids, "labels": [[-100] + r[1:] for r in ids], "utt": f"u{i}"})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from lorakit.models.custom import resolve_builder

    return src, resolve_builder(f"{src}:build").__globals__, data


def _cfg(src, data, out, **kw):
    base = dict(model=f"{src}:build", loss=f"{src}:loss", data=str(data), out=str(out), max_steps=2, batch_size=3,
                grad_accum=1, target_modules=["wqkv", "wo"], modules_to_save=["head"], eval_every=0, save_every=0,
                log_every=1, dtype="float32", warmup_steps=0, lr=1e-2, max_seq_len=32)
    return TrainConfig(**{**base, **kw})


def test_default_loss_equals_transformers_causal_lm_loss():
    model = tiny_llama()
    ids = torch.randint(3, 96, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :2] = IGNORE_INDEX
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    total, n = default_loss_sum(model, batch)  # a transformers model: evaluate.loss_sum
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total / n, want, rtol=1e-5, atol=1e-6)

    class Wrapped(torch.nn.Module):  # not a transformers model: the generic path, extra columns filtered out
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    total, n = default_loss_sum(Wrapped(), {**batch, "speaker": torch.zeros(3)})
    torch.testing.assert_close(total / n, want, rtol=1e-5, atol=1e-6)
    # without labels: every real token is a target (TRL's SFTTrainer on pre-tokenized input_ids)
    no_labels = {"input_ids": ids, "attention_mask": mask}
    torch.testing.assert_close(torch.div(*default_loss_sum(Wrapped(), no_labels)),
                               model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss,
                               rtol=1e-5, atol=1e-6)


def test_default_loss_on_streams_is_per_stream_cross_entropy(grid, tmp_path):
    src, mod, data = grid
    objective = make_objective(_cfg(src, data, tmp_path / "o", loss=None))
    assert isinstance(objective, OwnLoss) and objective.name == "sft"
    model = mod["build"]()
    ds = read_token_rows(data).to_dataset(32)
    batch = collate([ds[i] for i in range(4)], 0)
    got = objective.loss(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, 2, T, V)
    labels = batch["labels"][..., 1:]
    want = F.cross_entropy(logits[..., :-1, :].reshape(-1, 16), labels.reshape(-1), reduction="sum")
    assert got.units == int((labels != -100).sum())
    torch.testing.assert_close(got.loss, want)


def test_user_loss_is_a_row_weighted_mean_over_micro_batches(grid, tmp_path):
    """8 rows, micro-batches of 3, 3 and 2 rows in one step: the logged loss and sub-losses are the
    row-weighted means of what the function returns for each (the model before any update)."""
    src, mod, data = grid
    cfg = _cfg(src, data, tmp_path / "run", max_steps=1, grad_accum=3)
    train(cfg, progress=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    model = mod["build"]()  # LoRA starts at B = 0 and the saved head is a copy: the same function
    ds = read_token_rows(data).to_dataset(32)
    sampler = BatchSampler(len(ds), 3, seed=cfg.seed)
    parts = [(len(rows), mod["loss"](model, collate([ds[i] for i in rows], 0))) for rows in
             (next(sampler) for _ in range(3))]
    assert [n for n, _ in parts] == [3, 3, 2]
    for name in ("loss", "semantic", "codebook"):
        want = sum(n * float(out[name].detach()) for n, out in parts) / 8
        assert first[name] == pytest.approx(want, rel=1e-5), name


def test_custom_model_run_logs_sub_losses_and_saves_the_adapter(grid, tmp_path):
    src, mod, data = grid
    out = tmp_path / "run"
    trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    summary = train(_cfg(src, data, out, eval_data=str(data), max_steps=4, eval_every=2, report_to=trackers),
                    progress=False)
    assert summary["objective"] == "custom"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"semantic", "codebook"} <= set(r) for r in records if "loss" in r)
    if trackers:  # the sub-losses reach the trackers under the Trainer's names
        from test_trackers import read_tensorboard

        scalars, _ = read_tensorboard(out / "tensorboard")
        assert [v for _, v in scalars["train/semantic"]] == pytest.approx([r["semantic"] for r in records if "loss" in r])
        assert [v for _, v in scalars["eval/codebook"]] == \
            pytest.approx([r["eval_codebook"] for r in records if "eval_loss" in r])
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] == pytest.approx((r["eval_semantic"] + r["eval_codebook"]) / 2) for r in evals)
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] == ["head"]
    assert config["base_model_name_or_path"] == f"{src}:build"
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("wqkv.lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())
    assert any("head" in k and "lora" not in k for k in saved)
    # loss.png draws the sub-losses in a second panel: taller than the loss alone
    from PIL import Image

    from lorakit.plots import plot_loss

    plot_loss(out / "metrics.jsonl", tmp_path / "alone.png")
    assert Image.open(out / "loss.png").height > 1.5 * Image.open(tmp_path / "alone.png").height


def test_pretrained_weights_survive_injection(grid, tmp_path):
    src, mod, data = grid
    pretrained = {k: v + 0.5 for k, v in mod["build"]().state_dict().items()}
    save_file(pretrained, tmp_path / "pretrained.safetensors")
    cfg = _cfg(src, data, tmp_path / "o", weights=str(tmp_path / "pretrained.safetensors"))
    model, tokenizer = build_model(cfg)
    assert tokenizer is None
    state = model.state_dict()
    torch.testing.assert_close(state["wqkv.base_layer.weight"], pretrained["wqkv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["embed.1.weight"], pretrained["embed.1.weight"], rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    del pretrained["wo.bias"]
    save_file(pretrained, tmp_path / "partial.safetensors")
    with pytest.raises(ModelLoadError, match="wo.bias"):
        build_model(_cfg(src, data, tmp_path / "o", weights=str(tmp_path / "partial.safetensors")))
    build_model(_cfg(src, data, tmp_path / "o", weights=str(tmp_path / "partial.safetensors"), allow_missing_keys=True))


def test_bad_loss_specs_and_returns_are_named(grid, tmp_path):
    src, mod, data = grid
    with pytest.raises(ConfigError, match=r"--loss .*grid\.py:nope: .*has no function 'nope'"):
        make_objective(_cfg(src, data, tmp_path / "o", loss=f"{src}:nope"))
    with pytest.raises(ConfigError, match="expected MODULE:FUNCTION"):
        make_objective(_cfg(src, data, tmp_path / "o", loss="not a spec"))
    objective = OwnLoss(_cfg(src, data, tmp_path / "o"), fn=lambda model, batch: {"semantic": torch.tensor(1.0)})
    ds = read_token_rows(data).to_dataset(32)
    with pytest.raises(TrainingError, match="returned a dict without 'loss'"):
        objective.loss(mod["build"](), collate([ds[0]], 0))
    objective.fn = lambda model, batch: torch.ones(2)
    with pytest.raises(TrainingError, match=r"returned a tensor of shape \(2,\) as the loss"):
        objective.loss(mod["build"](), collate([ds[0]], 0))
    with pytest.raises(ConfigError, match="--loss replaces the sft objective's loss"):
        _cfg(src, data, tmp_path / "o", objective="dpo")
    with pytest.raises(TrainingError, match="--full: for transformers models only"):
        build_model(_cfg(src, data, tmp_path / "o", full=True))


def test_transformers_model_on_pretokenized_rows_equals_the_text_run(tiny_model_dir, tmp_path):
    """The sft objective on rows tokenized beforehand (as TRL's SFTTrainer takes input_ids) trains exactly as on
    the text they came from."""
    from lorakit.data.tokenize import tokenize_examples
    from lorakit.models.load import load_model

    text = [{"prompt": f"{i} say ", "completion": "yes" if i % 3 else "no"} for i in range(9)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    _, tok = load_model(str(tiny_model_dir))
    ds = tokenize_examples(text, tok, 32)
    rows = [{"input_ids": ds[i].input_ids, "labels": ds[i].labels} for i in range(len(ds))]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = dict(model=str(tiny_model_dir), max_steps=3, batch_size=4, target_modules=["q_proj", "v_proj"], r=4,
                  eval_every=0, save_every=0, log_every=1, dtype="float32", max_seq_len=32)
    summaries = [train(TrainConfig(data=str(tmp_path / f"{name}.jsonl"), eval_data=str(tmp_path / f"{name}.jsonl"),
                                   out=str(tmp_path / name), **recipe), progress=False) for name in ("text", "ids")]
    assert [s["objective"] for s in summaries] == ["sft", "sft"]
    assert summaries[0]["final_eval_loss"] == summaries[1]["final_eval_loss"]
    a, b = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("text", "ids"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "ids" / "summary.json").read_text())["data"]["train"]["token_cache"] == \
        "not needed (token ids)"
