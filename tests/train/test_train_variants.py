"""LoRA+ parameter groups (against PEFT's create_loraplus_optimizer) and NEFTune (against its closed form)."""

from __future__ import annotations

import peft
import pytest
import torch
from builders import tiny_qwen2
from peft.optimizers import create_loraplus_optimizer

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.train.recipe import TrainConfig
from lorakit.train.variants import add_neftune, loraplus_groups

TARGETS = ["q_proj", "v_proj", "embed_tokens"]  # an embedding: LoRA+ gives it its own rate


@pytest.mark.parametrize("kw", [dict(target_modules=TARGETS, bias="lora_only"),
                                dict(target_modules=["q_proj", "v_proj"], use_dora=True)], ids=str)
def test_loraplus_groups_match_peft(kw):
    kw = dict(r=4, **kw)
    ours = lk.inject(tiny_qwen2(), lk.LoraConfig(**kw))
    theirs = peft.get_peft_model(tiny_qwen2(), peft.LoraConfig(**kw))
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.01)
    names = {id(p): n.removeprefix("base_model.model.").removesuffix(".weight") if "magnitude" in n
             else n.removeprefix("base_model.model.") for n, p in theirs.named_parameters()}
    want = sorted((g["lr"], g["weight_decay"], tuple(sorted(names[id(p)] for p in g["params"])))
                  for g in opt.param_groups if g["params"])
    ours_names = {id(p): n for n, p in ours.named_parameters()}
    got = sorted((g["lr"], g["weight_decay"], tuple(sorted(ours_names[id(p)] for p in g["params"])))
                 for g in loraplus_groups(ours, 1e-3, 16, 1e-5, 0.01))
    assert got == want
    assert {lr for lr, _, _ in got} >= {1e-3, 16e-3}


def test_neftune_noise_in_training_only():
    model = tiny_qwen2()
    emb = model.get_input_embeddings()
    ids = torch.randint(0, 80, (2, 10))
    clean = emb(ids).detach()
    add_neftune(model, 5.0)
    model.eval()
    assert torch.equal(emb(ids), clean)  # evaluation and generation see no noise
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_qwen2()(ids).logits)
    model.train()
    noise = emb(ids) - clean
    bound = 5.0 / (10 * 32) ** 0.5  # alpha / sqrt(L·d)
    assert noise.abs().max() <= bound + 1e-6 and noise.abs().max() > 0.8 * bound
    assert abs(noise.mean()) < 0.1 * bound  # uniform, centred


@pytest.mark.parametrize("kw", [dict(loraplus_lr_ratio=0.5), dict(neftune_alpha=-1.0), dict(bias="some"),
                                dict(init_lora_weights="corda")], ids=str)
def test_bad_variant_settings_are_refused(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        TrainConfig(**kw)


def test_yaml_booleans_for_init():
    assert TrainConfig(init_lora_weights=False).lora_init() is False
    assert TrainConfig(init_lora_weights="pissa_niter_4").lora_init() == "pissa_niter_4"


def test_lora_only_settings_are_refused_with_full():
    with pytest.raises(ConfigError, match="dora, loraplus_lr_ratio apply to LoRA"):
        TrainConfig(full=True, dora=True, loraplus_lr_ratio=4)
    assert TrainConfig(full=True, neftune_alpha=5).neftune_alpha == 5  # NEFTune applies to full fine-tuning too
