"""The grpo objective end to end on a tiny model: a run's metrics, samples and held-out pass rate; rewards
fed TRL's inputs; an exact resume (also in the middle of a reused rollout batch); a bad reward function
stopping the run with its name and the checkpoint intact; recipes checked before anything loads."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from lorakit.errors import ConfigError, DataError, TrainingError
from lorakit.train.loop import train
from lorakit.train.recipe import TrainConfig

REWARDS = '''
CALLS = []

def has_answer(prompts, completions, completion_ids, answer, **kw):
    CALLS.append((list(prompts), list(completions), [list(c) for c in completion_ids], list(answer)))
    return [float(a in c) for c, a in zip(completions, answer)]

def short(prompts, completions, **kw):
    return [1.0 - len(c) / 8 for c in completions]

def breaks_on_third_call(prompts, completions, **kw):
    CALLS.append(1)
    if len(CALLS) == 3:
        raise ZeroDivisionError("division by zero")
    return [0.0] * len(completions)
'''


@pytest.fixture
def data(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    rows = [{"prompt": f"say {c}:", "answer": c} for c in "abcdefgh"]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]))
    return tmp_path


def recipe(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data / "train.jsonl"), out=str(out), objective="grpo",
                reward=f"{data}/rewards.py:has_answer,{data}/rewards.py:short", reward_weights=[1.0, 0.5],
                num_generations=4, batch_size=4, grad_accum=2, max_steps=4, max_completion_length=6, log_every=1,
                lr=2e-2, warmup_steps=0, data_cache="off", save_every=0, eval_every=0, seed=3)
    return TrainConfig(**{**base, **kw})


def test_a_run_logs_trl_metrics_samples_and_the_pass_rate(tiny_model_dir, data, tmp_path):
    cfg = recipe(tiny_model_dir, data, tmp_path / "run", test_data=str(data / "test.jsonl"), beta=0.1,
                 pass_reward=0.0)
    summary = train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = lines[0]
    for name in ("loss", "reward", "reward_std", "rewards/has_answer/mean", "rewards/short/mean", "kl",
                 "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean",
                 "frac_reward_zero_std", "rollout/tokens_per_s", "time/generation_s", "time/training_s"):
        assert name in first, name
    for line in lines:  # each step's own split of time
        assert line["time/generation_s"] > 0 and line["time/training_s"] > 0
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at the start: the policy is the base
    assert lines[-1]["kl"] > 0
    assert 1 <= first["completions/mean_length"] <= 6
    # the logged reward is the weighted sum's mean over the step's 8 completions
    assert first["reward"] == pytest.approx(first["rewards/has_answer/mean"] + 0.5 * first["rewards/short/mean"])
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["step"] == 1 and set(samples[0]["rewards"]) == {"has_answer", "short"}
    assert samples[0]["reward"] == pytest.approx(samples[0]["rewards"]["has_answer"] +
                                                 0.5 * samples[0]["rewards"]["short"])
    for block in ("before", "after"):
        assert summary[block]["n"] == 3 and 0 <= summary[block]["pass_rate"] <= 1
        reward = sum(e["reward"] for e in summary[block]["examples"]) / 3
        assert summary[block]["reward"] == pytest.approx(reward)
        # pass_reward 0: a completion passes when its reward is >= 0
        assert summary[block]["pass_rate"] == sum(e["reward"] >= 0 for e in summary[block]["examples"]) / 3
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_samples_go_to_the_trackers(tiny_model_dir, data, tmp_path):
    """The completions of samples.jsonl also reach TensorBoard's Text tab, step by step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = recipe(tiny_model_dir, data, tmp_path / "run", max_steps=3, log_every=2, report_to="tensorboard")
    train(cfg, progress=False)
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2]  # the first step, then every log_every-th
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("train/samples/text_summary")}
    assert sorted(texts) == [1, 2]
    for s in samples:
        assert f"| {s['prompt']} | {s['completion']} |".replace("\n", "<br>") in texts[s["step"]]


def test_reward_functions_get_trl_inputs(tiny_model_dir, data, tmp_path):
    import sys

    cfg = recipe(tiny_model_dir, data, tmp_path / "run", max_steps=1)
    train(cfg, progress=False)
    module = next(m for name, m in sys.modules.items() if name.startswith("lorakit_custom_rewards_")
                  and getattr(m, "__file__", "") == str((data / "rewards.py").resolve()))
    prompts, completions, ids, answers = module.CALLS[-1]
    assert len(prompts) == len(completions) == len(ids) == len(answers) == 8  # batch_size × grad_accum
    assert prompts[0] == prompts[3] != prompts[4]  # a prompt's 4 completions are consecutive
    assert answers[0] == prompts[0][4]  # the row's column, repeated per completion
    assert all(isinstance(c, str) and 1 <= len(i) <= 6 for c, i in zip(completions, ids, strict=True))


@pytest.mark.parametrize("iterations, pause", [(1, 2), (2, 3)])
def test_a_resumed_run_trains_as_the_straight_run(tiny_model_dir, data, tmp_path, iterations, pause):
    straight = recipe(tiny_model_dir, data, tmp_path / "straight", num_iterations=iterations, beta=0.05)
    train(straight, progress=False)
    paused = recipe(tiny_model_dir, data, tmp_path / "paused", num_iterations=iterations, beta=0.05,
                    stop_after=pause)
    train(paused, progress=False)
    train(TrainConfig(**{**paused.to_dict(), "resume": True, "stop_after": 0}), progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "paused" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    la = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "paused" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in la] == pytest.approx([x["loss"] for x in lb], abs=1e-6)
    rollout_steps = [i for i, x in enumerate(la) if "rollout/tokens_per_s" in x]
    assert rollout_steps == list(range(0, len(la), iterations))  # a reused batch samples nothing
    # samples.jsonl keeps step with the checkpoint: the resumed run's equals the straight run's
    assert (tmp_path / "paused" / "samples.jsonl").read_text() == (tmp_path / "straight" / "samples.jsonl").read_text()


def test_a_reward_function_that_raises_stops_the_run_naming_it(tiny_model_dir, data, tmp_path):
    cfg = recipe(tiny_model_dir, data, tmp_path / "run", reward=f"{data}/rewards.py:breaks_on_third_call",
                 reward_weights=[], save_every=2)
    with pytest.raises(TrainingError, match=r"reward function .*rewards.py:breaks_on_third_call raised "
                                            r"ZeroDivisionError: division by zero"):
        train(cfg, progress=False)
    from lorakit.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(ckpts) == 1 and ckpts[0].name.endswith("2"), ckpts  # step 2's, intact: the run resumes from it


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 3}, "not a multiple of num_generations=4"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"grpo_loss_type": "ppo"}, "grpo_loss_type must be one of"),
    ({"scale_rewards": "std"}, "scale_rewards must be one of"),
    ({"reward": None}, "needs --reward"),
    ({"num_generations": 1, "batch_size": 4}, "num_generations must be an integer >= 2"),
])
def test_bad_recipes_fail_before_anything_loads(tmp_path, data, change, message):
    cfg = recipe(tmp_path / "no-model", data, tmp_path / "run", **change)
    with pytest.raises(ConfigError, match=message):
        train(cfg, progress=False)


def test_rows_without_a_prompt_are_named(tmp_path, data):
    (data / "bad.jsonl").write_text('{"prompt": "ok", "answer": "a"}\n{"question": "x", "answer": "b"}\n')
    cfg = TrainConfig(**{**recipe(tmp_path / "no-model", data, tmp_path / "run").to_dict(),
                         "data": str(data / "bad.jsonl")})
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a prompt row"):
        train(cfg, progress=False)


def test_prompt_files_read_alike_in_every_format_with_columns_mapped(tmp_path):
    """JSONL, CSV and Parquet prompt files through the data package's reader: the same rows, ``--columns``
    mapping the prompt, a row missing a column the others have named by file and line/row."""
    from lorakit.train.objectives.grpo_data import read_prompts

    rows = [{"question": f"say {c}:", "answer": c} for c in "abc"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_prompts(tmp_path / "p.jsonl", ["prompt=question"])
    assert got.prompts == ["say a:", "say b:", "say c:"] and got.columns == {"answer": ["a", "b", "c"]}
    pytest.importorskip("datasets")
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    for name in ("p.csv", "p.parquet"):
        other = read_prompts(tmp_path / name, ["prompt=question"])
        assert (other.prompts, other.columns) == (got.prompts, got.columns), name
    (tmp_path / "gap.jsonl").write_text('{"prompt": "a", "answer": "x"}\n\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"gap.jsonl:3: lacks the column\(s\) \['answer'\]"):
        read_prompts(tmp_path / "gap.jsonl")
    with pytest.raises(DataError, match=r"p.csv:row 1: column 'query'"):
        read_prompts(tmp_path / "p.csv", ["prompt=query"])


def test_the_planner_counts_rollouts_and_training_apart(tiny_model_dir, data, tmp_path):
    """GRPO's fit check plans both phases: rollouts (weights and optimizer state, the KV cache of the rows in
    flight: rollout_rows, or a step's completions if fewer) and training (batch_size completions of prompt +
    completion); the peak is the larger."""
    import lorakit.plan.fit as fit
    from lorakit.lora.config import LoraConfig
    from lorakit.plan.arch import read_arch
    from lorakit.plan.count import count_model, meta_model
    from lorakit.plan.memory import PlanInputs, plan_memory

    def planned(rows):
        model = meta_model(str(tiny_model_dir))
        count = count_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        return plan_memory(read_arch(model), count, PlanInputs(
            batch_size=8, seq_len=40, dtype="float32", device="cpu", objective="grpo", completion_len=6,
            num_generations=4, rollout_rows=rows, grad_accum=64)).rows

    def check(rows):
        cfg = recipe(tiny_model_dir, data, tmp_path, rollout_rows=rows, batch_size=8, grad_accum=64, r=8)
        return fit.check_fit(cfg, "float32", "cpu", 40, 0.5)

    one, many = check(1), check(4096)  # 4096: capped at the step's 8 x 64 completions
    small, big = planned(1), planned(512)
    assert one.peak == small["training phase"]["lora"].bytes > small["rollout phase"]["lora"].bytes
    assert many.peak == big["rollout phase"]["lora"].bytes > big["training phase"]["lora"].bytes
    assert "512 rows of KV cache" in many.message and "training" in many.message
    layers, kv_heads, head_dim = 2, 2, 8  # write_tiny_model's Llama
    cache = 512 * 40 * layers * 2 * kv_heads * head_dim * 4
    held = sum(big[r]["lora"].bytes for r in ("weights", "optimizer"))
    assert big["rollout phase"]["lora"].bytes >= held + cache
