"""DPO against TRL's DPOTrainer + PEFT on the same tiny model, pairs, adapter (B != 0, so the policy differs from
the reference) and hyperparameters: the first step's loss and rewards/* within 1e-4, and 50 full-batch steps
whose loss curves agree (constant learning rate, AdamW, clipping 1.0 on both sides; every step sees every pair,
so no data order separates them). The reference is the base model on both sides."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

import lorakit as lk  # noqa: E402
from lorakit.train.loop import train  # noqa: E402
from lorakit.train.recipe import TrainConfig  # noqa: E402

STANDARD = [{"prompt": f"Q{i}: {'abc'[i % 3] * (1 + i % 4)}?", "chosen": f" yes {i}",
             "rejected": f" no, {'x' * (i % 5)}"} for i in range(8)]
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": f"say {w}"}], "chosen": [{"role": "assistant", "content": w}],
                   "rejected": [{"role": "assistant", "content": w[::-1] + "!"}]}
                  for w in ("cat", "dog", "sun", "moon", "star", "tree")]
LR, BETA = 5e-3, 0.1


def both_sides(tiny_model_dir, tmp_path, steps, pairs=STANDARD):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lk.inject(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    lk.save_adapter(ours, tmp_path / "adapter")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "ours"), objective="dpo",
                      max_steps=steps, batch_size=len(pairs), lr=LR, warmup_steps=0, min_lr_ratio=1.0, beta=BETA,
                      max_grad_norm=1.0, max_seq_len=64, eval_every=0, log_every=1, dtype="float32",
                      save_every=0, data_cache="off")
    train(cfg, progress=False, model=ours, tokenizer=tok)
    mine = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(pairs), max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=BETA, max_length=64,
                     logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                     max_grad_norm=1.0, weight_decay=0.0, seed=0, dataloader_drop_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(pairs),
                             processing_class=tok)
        # TRL takes a copy of a loaded adapter ("ref") as the reference; lorakit's is the base with the adapters
        # off, which TRL uses when there is no "ref" adapter: drop it, so both sides compare with the base
        trainer.model.delete_adapter("ref")
        trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r]
    return mine, theirs


NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


@pytest.mark.parametrize("pairs", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
def test_the_first_step_equals_trls(tiny_model_dir, tmp_path, pairs):
    mine, theirs = both_sides(tiny_model_dir, tmp_path, 1, pairs)
    assert abs(mine[0]["rewards/margins"]) > 1e-2  # the policy is not the reference
    for name in NAMES:
        assert mine[0][name] == pytest.approx(theirs[0][name], abs=1e-4), name


def test_fifty_full_batch_steps_follow_trls_loss_curve(tiny_model_dir, tmp_path):
    mine, theirs = both_sides(tiny_model_dir, tmp_path, 50)
    ours, trls = [r["loss"] for r in mine], [r["loss"] for r in theirs]
    assert len(ours) == len(trls) == 50
    assert ours[-1] < 0.5 * ours[0]  # it learns
    assert max(abs(a - b) for a, b in zip(ours, trls, strict=True)) < 1e-5  # measured: 1e-7
