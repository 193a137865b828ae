"""What a finished LoRA run leaves for others: a base they can resolve, and a model card with the run."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from lorakit.cli.main import main


def test_a_run_records_a_resolvable_base_and_writes_its_card(tiny_model_dir, tmp_path, capsys, monkeypatch):
    rows = [{"prompt": f"{i} is a number, say ", "completion": "yes"} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tiny_model_dir.parent)
    assert main(["train", "--model", tiny_model_dir.name, "--data", str(tmp_path / "d.jsonl"), "--eval-data",
                 str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2",
                 "--max-seq-len", "32", "--r", "2", "--target-modules", "q_proj", "--dtype", "fp32"]) == 0
    capsys.readouterr()
    adapter = tmp_path / "run" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # not the relative spec typed
    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dtype"] == "float32"
    text = card.text
    assert "## Training data" in text and "## Training results" in text and "- r: 2" in text
    assert f"- train examples: 6 ({summary['data']['train']['n_tokens']:,} tokens" in text
    assert f"final {summary['final_eval_loss']:.4f}" in text and "2 steps" in text
    monkeypatch.chdir(tmp_path)  # elsewhere, eval finds the base from the adapter alone
    assert main(["eval", "--adapter", str(adapter), "--data", str(tmp_path / "d.jsonl"), "--limit", "1",
                 "--max-new-tokens", "2"]) == 0


def test_peft_finds_the_base_a_run_recorded(tiny_model_dir, tmp_path, capsys):
    import torch
    from peft import AutoPeftModelForCausalLM

    import lorakit as lk
    from lorakit.models.load import load_model

    rows = [{"prompt": f"{i} is a number, say ", "completion": "yes"} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "d.jsonl"), "--out",
                 str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "32", "--r", "2",
                 "--lr", "0.05", "--target-modules", "q_proj", "v_proj", "--dtype", "fp32"]) == 0
    capsys.readouterr()
    adapter = tmp_path / "run" / "adapter"
    theirs = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()  # the base from adapter_config.json alone
    ours, _ = load_model(str(tiny_model_dir))
    lk.load_adapter(ours, adapter)
    ids = torch.tensor([[40, 41, 42, 43, 44]])
    plain, _ = load_model(str(tiny_model_dir))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids).logits, atol=1e-5)
        assert not torch.allclose(plain(ids).logits, ours(ids).logits, atol=1e-5)  # the adapter does something


@pytest.mark.real_model
def test_a_run_on_the_embedded_model_records_its_hub_id(tmp_path, monkeypatch):
    import socket

    from lorakit.train.loop import train
    from lorakit.train.recipe import load_recipe

    cfg = load_recipe(None, {"out": str(tmp_path / "real"), "max_steps": 1, "eval_every": 0, "save_every": 0,
                             "batch_size": 2, "score_limit": 1, "eval_batches": 1, "max_new_tokens": 2})
    assert cfg.model == "smollm2-135m-instruct"

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # the embedded model and its hub id stay offline
    train(cfg, progress=False)
    adapter = tmp_path / "real" / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ModelCard.load(adapter / "README.md").data.base_model == recorded
    assert main(["generate", "--adapter", str(adapter), "Hi", "--max-new-tokens", "2"]) == 0  # resolved back
