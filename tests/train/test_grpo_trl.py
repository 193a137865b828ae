"""The grpo objective's loss against TRL's GRPOTrainer + PEFT on the same tiny model, adapter and completions:
TRL's ``_compute_loss`` is fed the same prompts, completions, advantages and old log-probs, and its reference
log-probs come from PEFT's base (adapter disabled), lorakit's from its own adapters switched off."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from lorakit import disable_adapters  # noqa: E402
from lorakit.generate import Completion  # noqa: E402
from lorakit.train.objectives.grpo import GRPO  # noqa: E402
from lorakit.train.recipe import TrainConfig  # noqa: E402

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    """(lorakit model, TRL trainer) sharing one base and one random (B != 0) adapter."""
    import warnings

    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    import lorakit as lk

    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lk.inject(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)  # a trained adapter: the policy differs from the reference
    adapter = tmp_path_factory.mktemp("adapter")
    lk.save_adapter(ours, adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_vllm=False, report_to="none",
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=6, beta=0.04,
                      temperature=TEMPERATURE, epsilon=0.2, epsilon_high=0.28, use_cpu=True,
                      bf16=False)  # float32 as lorakit here (bf16 autocast is on by default)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=peft_model, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                              args=args, train_dataset=Dataset.from_list([{"prompt": "ab"}] * 4), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    return ours, trainer, tok


def completions(tok) -> list[Completion]:
    eos = tok.eos_token_id
    enc = [tok(t)["input_ids"] for t in ("abc", "hello", "abc", "x")]
    outs = [tok(t)["input_ids"] for t in ("de", "world!", "fgh", "yz")]
    outs[0] = outs[0] + [eos]  # two finished, two cut at the length limit
    outs[2] = outs[2] + [eos]
    return [Completion(p, o, "", "stop" if o[-1] == eos else "length", None) for p, o in zip(enc, outs, strict=True)]


def trl_inputs(trainer, comps, advantages, old):
    from trl.trainer.utils import pad

    pad_id = trainer.processing_class.pad_token_id
    prompt = [torch.tensor(c.prompt_ids) for c in comps]
    comp = [torch.tensor(c.token_ids) for c in comps]
    inputs = {"prompt_ids": pad(prompt, padding_value=pad_id, padding_side="left"),
              "prompt_mask": pad([torch.ones_like(p) for p in prompt], padding_value=0, padding_side="left"),
              "completion_ids": pad(comp, padding_value=pad_id, padding_side="right"),
              "completion_mask": pad([torch.ones_like(c) for c in comp], padding_value=0, padding_side="right"),
              "advantages": advantages}
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad(), trainer.model.disable_adapter():
        inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, inputs["completion_ids"].shape[1])[0]
    if old is not None:
        inputs["old_per_token_logps"] = old
    return inputs


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_first_step_loss_equals_trl_grpo_trainer(pair, tmp_path, loss_type, off_policy):
    ours, trainer, tok = pair
    trainer.loss_type = loss_type
    cfg = TrainConfig(objective="grpo", reward="math:fsum", num_generations=2, batch_size=4,
                      max_completion_length=6, beta=0.04, temperature=TEMPERATURE, epsilon=0.2, epsilon_high=0.28,
                      grpo_loss_type=loss_type, num_iterations=2 if off_policy else 1, out=str(tmp_path))
    objective = GRPO(cfg)
    objective.pad = tok.pad_token_id
    comps = completions(tok)
    advantages = torch.tensor([0.9, -0.9, 0.4, -0.4])
    batch = objective.collate(comps, advantages, torch.tensor([c.finish_reason == "length" for c in comps]))
    with torch.no_grad():
        with disable_adapters(ours):
            batch["ref_logps"] = objective.logps(ours, batch)
        old = None
        if off_policy:  # the policy moved since sampling: ratios away from 1, some of them clipped
            g = torch.Generator().manual_seed(1)
            old = objective.logps(ours, batch) + (torch.rand(batch["completion_mask"].shape, generator=g) - 0.5)
            batch["old_logps"] = old
    ours.train()
    part = objective.loss(ours, batch)
    mine = float(part.loss.detach()) / part.units
    trainer.model.train()
    inputs = trl_inputs(trainer, comps, advantages, old.clone() if old is not None else None)
    theirs = float(trainer._compute_loss(trainer.model, inputs).detach())
    assert mine == pytest.approx(theirs, abs=1e-4, rel=1e-4)
    assert part.metrics["kl"][0] / part.metrics["kl"][1] == pytest.approx(trainer._metrics["train"]["kl"][-1],
                                                                          rel=1e-4, abs=1e-6)
    if off_policy:
        got = part.metrics["clip_ratio/region_mean"]
        assert got[0] > 0
        assert got[0] / got[1] == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][-1], abs=1e-6)


def test_the_reference_with_adapters_off_is_the_plain_base(pair, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ours, _, tok = pair
    cfg = TrainConfig(objective="grpo", reward="math:fsum", num_generations=2, batch_size=4, beta=0.04,
                      temperature=TEMPERATURE, out=str(tmp_path))
    objective = GRPO(cfg)
    objective.pad = tok.pad_token_id
    comps = completions(tok)
    batch = objective.collate(comps, torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        with disable_adapters(ours):
            ref = objective.logps(ours, batch)
        policy = objective.logps(ours, batch)
        base = objective.logps(plain, batch)
    m = batch["completion_mask"].bool()
    torch.testing.assert_close(ref[m], base[m], rtol=1e-5, atol=1e-5)
    assert (policy[m] - base[m]).abs().max() > 1e-2  # the adapter does change the policy
