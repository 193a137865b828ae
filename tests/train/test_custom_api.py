"""lk.fit: a model in memory trains as `lorakit train` trains the same model from its spec (same adapter,
same metrics), for a model of your own with a loss function and for a transformers model on text."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_custom_train import grid  # noqa: F401  (the fixture)

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig

RECIPE = dict(max_steps=3, batch_size=3, target_modules=["wqkv", "wo"], modules_to_save=["head"], eval_every=0,
              save_every=0, log_every=1, dtype="float32", warmup_steps=0, lr=1e-2, max_seq_len=32)


def _same_adapter(a, b):
    a, b = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fit_on_a_model_in_memory_equals_the_cli_run(grid, tmp_path):  # noqa: F811
    src, mod, data = grid
    cli = tmp_path / "cli"
    train(TrainConfig(model=f"{src}:build", loss=f"{src}:loss", data=str(data), out=str(cli), **RECIPE), progress=False)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows = [{**r, "input_ids": torch.tensor(r["input_ids"])} for r in rows]  # tensors are accepted too
    api = tmp_path / "api"
    summary = lk.fit(mod["build"](), rows, mod["loss"], out=api, progress=False, **RECIPE)
    assert summary["objective"] == "custom" and (api / "summary.json").exists() and (api / "loss.png").exists()
    _same_adapter(cli, api)
    for a, b in zip(_metrics(cli), _metrics(api), strict=True):
        assert {k: a[k] for k in ("step", "loss", "semantic", "codebook")} == \
            {k: b[k] for k in ("step", "loss", "semantic", "codebook")}
    assert (api / "data" / "train.jsonl").exists()  # the run directory holds what it trained on


def test_fit_trains_the_adapters_a_model_has(grid, tmp_path):  # noqa: F811
    src, mod, data = grid
    model = mod["build"]()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["wo"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lk.fit(model, str(data), mod["loss"], out=tmp_path / "o", progress=False, **{**RECIPE, "modules_to_save": []})
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"wo.lora_A.default.weight", "wo.lora_B.default.weight"}
    with pytest.raises(ConfigError, match="has adapters already"):
        lk.fit(model, str(data), mod["loss"], lora=lk.LoraConfig(r=2, target_modules=["wqkv"]), out=tmp_path / "p")
    with pytest.raises(ConfigError, match="come from the arguments"):
        lk.fit(model, str(data), data=str(data), out=tmp_path / "p")


def test_fit_takes_a_datasets_dataset(grid, tmp_path):  # noqa: F811
    datasets = pytest.importorskip("datasets")
    src, mod, data = grid
    rows = datasets.Dataset.from_list([json.loads(line) for line in data.read_text().splitlines()])
    lk.fit(mod["build"](), rows, mod["loss"], eval_rows=rows, out=tmp_path / "ds", progress=False, **RECIPE)
    lk.fit(mod["build"](), str(data), mod["loss"], eval_rows=str(data), out=tmp_path / "file", progress=False,
           **RECIPE)
    assert (tmp_path / "ds" / "data" / "eval").is_dir()
    _same_adapter(tmp_path / "file", tmp_path / "ds")


def test_fit_on_a_transformers_model_and_text_equals_the_cli_run(tiny_model_dir, tmp_path):
    from lorakit.models.load import load_model

    data = tmp_path / "text.jsonl"
    rows = [{"prompt": f"{i} say ", "completion": "yes" if i % 3 else "no"} for i in range(9)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {**RECIPE, "target_modules": ["q_proj", "v_proj"], "modules_to_save": [], "r": 4}
    train(TrainConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "cli"), **recipe), progress=False)
    torch.manual_seed(0)  # the CLI seeds with the recipe's seed before it loads the model and injects
    model, tok = load_model(str(tiny_model_dir), dtype="float32")
    lk.fit(model, rows, tokenizer=tok, out=tmp_path / "api", progress=False, **recipe)
    _same_adapter(tmp_path / "cli", tmp_path / "api")
    assert [r["loss"] for r in _metrics(tmp_path / "cli")] == [r["loss"] for r in _metrics(tmp_path / "api")]


def test_import_lorakit_stays_light():
    code = ("import sys, lorakit as lk; assert 'lorakit.train' not in sys.modules and 'transformers' not in "
            "sys.modules, sorted(m for m in sys.modules if m.startswith(('lorakit.train', 'transformers'))); "
            "assert callable(lk.fit)")
    subprocess.run([sys.executable, "-c", code], check=True)
