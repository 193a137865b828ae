"""lorakit.plan.objectives: the plan of dpo / orpo / simpo / grpo against a real step of lorakit's own objective
code on a tiny random Llama, measured with torch's allocation events (``lorakit.testing.peak_allocated``)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.errors import ConfigError
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import inject
from lorakit.models.lean import lean_layers
from lorakit.plan.arch import read_arch
from lorakit.plan.count import count_model
from lorakit.plan.inputs import PlanInputs
from lorakit.plan.memory import block_targets, layer_terms, plan_memory
from lorakit.testing import char_tokenizer, grpo_phase_peaks, peak_allocated
from lorakit.train.recipe import TrainConfig

# bench/plan/calibration.py's tolerance for a whole step's peak (the block activations are exact: test_plan.py)
TOLERANCE = 0.25
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False)


def _model(vocab: int, dtype: str, **cfg):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **{**TINY, **cfg})).to(getattr(torch, dtype)).train()
    lora = LoraConfig(r=4, target_modules="all-linear")
    count = count_model(model, lora)
    inject(model, lora)
    lean_layers(model)  # as the trainer runs it (the plan models it)
    return model, count


def _rows(model, count, **inputs) -> dict[str, float]:
    plan = plan_memory(read_arch(model), count, PlanInputs(device="cpu", **inputs))
    return {name: row["lora"].bytes for name, row in plan.rows.items()}


def _pairs(vocab: int, b: int = 4, t: int = 64):
    from lorakit.data.preference import collate_pairs

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    p = t // 4  # the first pair's chosen row is the longest: the batch is padded to t
    return collate_pairs([(ids(p), ids(t - p - 3 * i), ids(t - p - 1 - 5 * i)) for i in range(b)], 0)


# ---- dpo, orpo, simpo -----------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, vocab, dtype", [
    ("dpo", 1000, "float32"), ("dpo", 96, "float32"), ("dpo", 1000, "bfloat16"), ("orpo", 1000, "float32"),
    ("simpo", 96, "bfloat16"),
])
def test_a_pair_step_peaks_where_the_plan_says(objective, vocab, dtype):
    """One step of the objective's own loss (2B rows, DPO's reference with the adapters off), backward and the
    AdamW step: the most bytes live at once is the plan's peak less its weights and optimizer rows. vocab 96
    makes DPO's reference forward, not the head's chunk, the largest transient."""
    from lorakit.train.objectives.preference import DPO, ORPO, SimPO

    model, count = _model(vocab, dtype)
    batch = _pairs(vocab)
    obj = {"dpo": DPO, "orpo": ORPO, "simpo": SimPO}[objective](TrainConfig(objective=objective, data="x", out="x"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        obj.loss(model, batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's state exists before the measured step, as the plan's optimizer row
    measured, _ = peak_allocated(step)
    rows = _rows(model, count, batch_size=4, seq_len=64, dtype=dtype, objective=objective,
                 label_fraction=float(batch["completion_mask"][:, 1:].float().mean()))
    planned = rows["peak"] - rows["weights"] - rows["optimizer"]
    assert abs(planned / measured - 1) <= TOLERANCE, (planned, measured)
    assert ("reference" in rows) == (objective == "dpo")


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_packed_pair_layouts_peak_where_the_plan_says(layout):
    """--pair-layout packed / shared: the pairs in one row (the shared layout runs each prompt once) on
    lorakit's packed attention, measured as the padded layout is."""
    import inspect

    from lorakit.data.preference import collate_pairs
    from lorakit.train.objectives.preference import DPO

    if "layout" not in inspect.signature(collate_pairs).parameters:
        pytest.skip("this checkout's collate_pairs has no packed layouts")
    from lorakit.data.preference import CPU_PACK_MULTIPLE
    from lorakit.models.attention import packed_attention_for

    model, count = _model(96, "float32")
    packed_attention_for(model)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 96, (n,), generator=g).tolist()  # noqa: E731
    pairs = [(ids(32), ids(32), ids(32)) for _ in range(4)]  # every completion full length: no slack in the plan
    batch = collate_pairs(pairs, 0, layout, CPU_PACK_MULTIPLE)  # as the trainer lays them out on CPU
    obj = DPO(TrainConfig(objective="dpo", data="x", out="x", pair_layout=layout))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        obj.loss(model, batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    measured, _ = peak_allocated(step)
    rows = _rows(model, count, batch_size=4, seq_len=64, dtype="float32", objective="dpo", pair_layout=layout,
                 prompt_len=32, label_fraction=32 / 63)
    packed = _rows(model, count, batch_size=4, seq_len=64, dtype="float32", objective="dpo", pair_layout="packed",
                   label_fraction=32 / 63)
    planned = rows["peak"] - rows["weights"] - rows["optimizer"]
    assert abs(planned / measured - 1) <= TOLERANCE, (planned, measured)
    assert (rows["activations"] < packed["activations"]) == (layout == "shared")  # 4 prompts fewer: 384, not 512


def test_pair_activations_are_those_of_2b_rows_exactly():
    """The activations row of B pairs is the per-block saved tensors of the chosen + rejected forward (2B rows),
    byte for byte, as test_plan.py checks SFT's."""
    from test_plan import _saved_bytes_per_block

    model, count = _model(1000, "float32", num_hidden_layers=3)
    batch = _pairs(1000, b=2, t=16)
    saved = _saved_bytes_per_block(model, batch["input_ids"], batch["attention_mask"])
    arch = read_arch(model)
    inputs = PlanInputs(batch_size=2, seq_len=16, dtype="float32", objective="dpo")
    assert inputs.rows == 4 and inputs.tokens == 64
    assert saved[1] == sum(layer_terms(arch, inputs, "lora", block_targets(arch, count.targets)[1]).values()) * 64


def test_precompute_ref_drops_the_reference_forward():
    model, count = _model(96, "float32")
    with_ref = _rows(model, count, batch_size=4, seq_len=64, dtype="float32", objective="dpo")
    without = _rows(model, count, batch_size=4, seq_len=64, dtype="float32", objective="dpo", precompute_ref=True)
    simpo = _rows(model, count, batch_size=4, seq_len=64, dtype="float32", objective="simpo")
    assert with_ref["reference"] > 0 == without["reference"]
    assert with_ref["peak"] > without["peak"] == simpo["peak"]
    sft = _rows(model, count, batch_size=8, seq_len=64, dtype="float32")
    assert sft["activations"] == simpo["activations"]  # 4 pairs run 8 rows


# ---- grpo -----------------------------------------------------------------------------------------------

def _grpo(tmp_path, dtype, beta, rollout_rows):
    from lorakit.train.distributed import DistInfo
    from lorakit.train.objectives.grpo import GRPO
    from lorakit.train.objectives.grpo_data import PromptBatches, read_prompts, tokenize_prompts

    tok = char_tokenizer()
    model, count = _model(len(tok), dtype, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=None)
    (tmp_path / "r.py").write_text("def odd(prompts, completions, **kw):\n    return [len(c) % 3 for c in completions]\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": f"q{i}: " + "x" * (20 + i)}) for i in range(8)))
    cfg = TrainConfig(objective="grpo", data=str(tmp_path / "p.jsonl"), out=str(tmp_path), reward=f"{tmp_path}/r.py:odd",
                      num_generations=4, batch_size=8, max_completion_length=48, rollout_rows=rollout_rows, beta=beta)
    obj = GRPO(cfg)
    obj.prepare(model, tok, cfg, DistInfo(), False)
    prompts = tokenize_prompts(read_prompts(tmp_path / "p.jsonl"), tok, 48)
    return model, count, obj, PromptBatches(prompts, 2, seed=0), tok


@pytest.mark.parametrize("dtype, beta, rollout_rows", [("float32", 0.0, 8), ("float32", 0.1, 4), ("bfloat16", 0.1, 8)])
def test_grpo_phases_peak_where_the_plan_says(tmp_path, dtype, beta, rollout_rows):
    """The rollout phase (GRPO.rollout: generation through lorakit's core, then the reference forwards) and
    the training phase (loss, backward, AdamW step), each measured against the plan's phase row less the
    weights and optimizer state. The end-of-sequence token is masked during generation so that every
    completion runs to max_completion_length, the plan's worst case."""
    model, count, obj, source, tok = _grpo(tmp_path, dtype, beta, rollout_rows)
    rollout, training, batches = grpo_phase_peaks(model, obj, source, [tok.eos_token_id])
    assert batches[0]["completion_mask"].shape[1] == 48  # every completion ran to max_completion_length
    seq_len = batches[0]["input_ids"].shape[1]  # this step's longest prompt + 48
    rows = _rows(model, count, batch_size=8, seq_len=seq_len, dtype=dtype, objective="grpo", completion_len=48,
                 num_generations=4, rollout_rows=rollout_rows, beta=beta)
    held = rows["weights"] + rows["optimizer"]
    for phase, measured in (("rollout phase", rollout), ("training phase", training)):
        planned = rows[phase] - held
        assert abs(planned / measured - 1) <= TOLERANCE, (phase, planned, measured)
    assert rows["peak"] == max(rows["rollout phase"], rows["training phase"])
    assert ("reference" in rows) == (beta > 0)


def test_grpo_rollout_rows_bound_the_kv_cache():
    """rollout_rows rows of prompt + completion in the cache (capped at a step's completions); the peak is the
    larger phase; a row must be longer than its completion."""
    from lorakit.plan.objectives import kv_cache_bytes

    model, count = _model(96, "float32")
    arch = read_arch(model)
    plans = {n: _rows(model, count, batch_size=8, seq_len=80, dtype="float32", objective="grpo", completion_len=48,
                      rollout_rows=n, grad_accum=32) for n in (8, 256, 4096)}
    per_row = kv_cache_bytes(arch, PlanInputs(dtype="float32", seq_len=80), 1, 80)
    assert per_row == 80 * 2 * 2 * 2 * 16 * 4  # tokens × layers × (k, v) × kv heads × head dim × fp32
    assert plans[256]["rollouts"] - plans[8]["rollouts"] >= 248 * per_row
    assert plans[4096] == plans[256]  # 8 × 32 completions per step: no more rows ever run at once
    assert plans[8]["peak"] == plans[8]["training phase"] and plans[256]["peak"] == plans[256]["rollout phase"]
    with pytest.raises(ConfigError, match="longest prompt"):
        PlanInputs(objective="grpo", seq_len=48, completion_len=48)
    with pytest.raises(ConfigError, match="objective"):
        PlanInputs(objective="ppo")


# ---- the CLI and the fit check --------------------------------------------------------------------------

def test_cli_plan_objectives(capsys):
    from lorakit.cli.main import main

    assert main(["plan", "smollm2-135m-instruct", "--objective", "dpo", "--batch-size", "4", "--seq-len", "320",
                 "--gpus", "T4", "--json"]) == 0
    dpo = json.loads(capsys.readouterr().out)
    assert dpo["inputs"]["objective"] == "dpo" and "reference" in dpo["memory"]["lora"]
    assert main(["plan", "smollm2-135m-instruct", "--objective", "dpo", "--batch-size", "4", "--seq-len", "320",
                 "--pair-layout", "shared", "--prompt-len", "64", "--gpus", "T4", "--json"]) == 0
    shared = json.loads(capsys.readouterr().out)
    assert shared["memory"]["lora"]["activations"] < dpo["memory"]["lora"]["activations"]
    assert main(["plan", "smollm2-135m-instruct", "--objective", "grpo", "--prompt-len", "60",
                 "--max-completion-length", "12", "--batch-size", "16", "--gpus", "T4", "--explain"]) == 0
    text = capsys.readouterr().out
    assert "rollout phase" in text and "training phase" in text and "seq 72" in text
    assert "rows in flight" in text and "grpo: batch size counts completions" in text


def test_fit_check_plans_pairs_as_2b_rows(tiny_model_dir, tmp_path):
    import lorakit.plan.fit as fit

    cfg = TrainConfig(model=str(tiny_model_dir), objective="dpo", batch_size=4, r=4, data="x", out=str(tmp_path))
    verdict = fit.check_fit(cfg, "float32", "cpu", 40, 0.5)
    sft = fit.check_fit(TrainConfig(model=str(tiny_model_dir), batch_size=8, r=4), "float32", "cpu", 40, 0.5)
    assert "8 rows (chosen + rejected) x 40 tokens" in verdict.message and verdict.peak > sft.peak
