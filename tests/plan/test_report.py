"""The planner's printed assumptions follow the code and the trainer's options, so they cannot drift."""

from __future__ import annotations

import re

from lorakit.cli.main import build_parser
from lorakit.lora.ops import CHUNK_BYTES
from lorakit.plan.inputs import PlanInputs
from lorakit.plan.report import assumptions
from lorakit.train.evaluate import FUSED_CE_MODELS
from lorakit.train.recipe import TrainConfig


def _flags(verb: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    return {s for action in sub.choices[verb]._actions for s in action.option_strings}


def test_checkpointing_note_follows_the_inputs_and_names_the_trainer_flag():
    on = assumptions(PlanInputs(grad_checkpointing=True))
    off = assumptions(PlanInputs(grad_checkpointing=False))
    changed = [(a, b) for a, b in zip(off, on, strict=True) if a != b]
    assert len(changed) == 1
    without, with_ = changed[0]
    assert without.startswith("no gradient checkpointing") and "recomputed in backward" in with_
    assert "gradient_checkpointing" in {f for f in TrainConfig.__dataclass_fields__}
    for note in on + off:
        assert "does not checkpoint" not in note


def test_every_flag_a_note_names_exists_on_train_or_plan():
    named = {flag for note in assumptions(PlanInputs(grad_checkpointing=True)) + assumptions(PlanInputs())
             for flag in re.findall(r"--[a-z][a-z0-9-]*", note)}
    assert "--gradient-checkpointing" in named
    assert named <= _flags("train") | _flags("plan")
    assert "--gradient-checkpointing" in _flags("train") & _flags("plan")  # one name for one thing


def test_loss_note_is_the_code_the_planner_models():
    note = next(n for n in assumptions(PlanInputs()) if n.startswith("logits only for labelled tokens"))
    assert all(family in note for family in FUSED_CE_MODELS)
    assert f"{CHUNK_BYTES // 2**20} MiB chunk" in note


def test_quantization_note_holds_while_the_trainer_cannot_quantize():
    notes = " ".join(assumptions(PlanInputs()))
    quantizes = [f for f in _flags("train") if re.search(r"quant|qlora|4bit|nf4|load-in", f)]
    assert not ("does not quantize" in notes and quantizes), (
        f"lorakit train now has {quantizes}: update the QLoRA note of lorakit.plan.report.assumptions")


def test_cli_plan_prints_the_note_of_its_own_run(capsys):
    assert build_parser().parse_args(["plan", "gpt2", "--grad-checkpointing"]).grad_checkpointing  # old spelling
    from lorakit.cli.main import main

    assert main(["plan", "gpt2", "--gpus", "T4", "--gradient-checkpointing"]) == 0
    text = capsys.readouterr().out
    assert "gradient checkpointing as lorakit train --gradient-checkpointing runs it" in text
    assert main(["plan", "gpt2", "--gpus", "T4"]) == 0
    assert "  - no gradient checkpointing: every block keeps its activations" in capsys.readouterr().out
