"""Reward functions (lorakit/train/rewards.py): loaded from specs, called with TRL's signature, summed with
weights, Nones handled as TRL does, and every kind of bad reward function stopped with its name."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import ConfigError, TrainingError
from lorakit.train.rewards import Reward, combine, load_rewards, score_completions

REWARDS_PY = '''
def length(prompts, completions, completion_ids, **kw):
    return [float(len(ids)) for ids in completion_ids]

def exact(prompts, completions, answer, **kw):
    text = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if t.strip() == a else 0.0 for t, a in zip(text, answer)]

def only_even(prompts, completions, **kw):
    return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

def raises(prompts, completions, **kw):
    raise KeyError("answer")

def short(prompts, completions, **kw):
    return [1.0]

def words(prompts, completions, **kw):
    return ["good"] * len(completions)

def infinite(prompts, completions, **kw):
    return [float("inf")] * len(completions)

def not_a_list(prompts, completions, **kw):
    return 3.0
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS_PY)
    return path


def test_functions_get_trl_arguments_and_are_summed_with_weights(rewards_file):
    fns = load_rewards(f"{rewards_file}:exact, {rewards_file}:length", "2,0.5")
    assert [f.weight for f in fns] == [2.0, 0.5]
    prompts = [[{"role": "user", "content": "1+1"}]] * 2
    completions = [[{"role": "assistant", "content": " 2"}], [{"role": "assistant", "content": "3"}]]
    per_fn = score_completions(fns, prompts, completions, [[5, 6, 7], [8]], {"answer": ["2", "2"]})
    assert per_fn.tolist() == [[1.0, 3.0], [0.0, 1.0]]
    assert combine(per_fn, [2.0, 0.5]).tolist() == [2 * 1 + 0.5 * 3, 0.5 * 1]


def test_none_is_skipped_and_all_none_is_unscorable(rewards_file):
    fns = load_rewards([f"{rewards_file}:only_even", f"{rewards_file}:only_even"])
    per_fn = score_completions(fns, ["p"] * 4, ["a", "b", "c", "d"], [[1]] * 4, {})
    total = combine(per_fn, [1.0, 1.0])
    assert total[0] == 2.0 and total[2] == 2.0
    assert math.isnan(total[1]) and math.isnan(total[3])
    mixed = combine(torch.tensor([[math.nan, 1.0], [math.nan, math.nan]]), [3.0, 1.0])  # nansum over the rest
    assert mixed[0] == 1.0 and math.isnan(mixed[1])


@pytest.mark.parametrize("name, message", [
    ("raises", r"reward function .*:raises raised KeyError: 'answer'"),
    ("short", r"reward function .*:short returned 1 rewards for 3 completions"),
    ("words", r"reward function .*:words returned 'good' \(str\) for completion 0"),
    ("infinite", r"reward function .*:infinite returned inf"),
    ("not_a_list", r"reward function .*:not_a_list returned float; expected a list"),
])
def test_a_bad_reward_function_fails_naming_it(rewards_file, name, message):
    fns = load_rewards(f"{rewards_file}:{name}")
    with pytest.raises(TrainingError, match=message):
        score_completions(fns, ["p"] * 3, ["a", "b", "c"], [[1]] * 3, {})


def test_specs_and_weights_are_checked_before_a_run(rewards_file):
    with pytest.raises(ConfigError, match="needs --reward"):
        load_rewards(None)
    with pytest.raises(ConfigError, match="1 weights for 2 reward functions"):
        load_rewards(f"{rewards_file}:exact,{rewards_file}:length", [1.0])
    with pytest.raises(ConfigError, match="has no function 'nope'.*exact"):
        load_rewards(f"{rewards_file}:nope")
    with pytest.raises(ConfigError, match="not a number"):
        load_rewards(f"{rewards_file}:exact", "one")
    with pytest.raises(ConfigError, match="expected MODULE:FUNCTION"):
        load_rewards("just_a_name")


def test_a_module_spec_loads_too():
    fn = load_rewards("math:fsum")[0]
    assert isinstance(fn, Reward) and fn.name == "math:fsum" and fn.fn is math.fsum


def test_the_demo_reward_scores_the_first_line_date():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "rewards.py"
    fn = load_rewards(f"{path}:iso_date")[0]
    chat = [[{"role": "assistant", "content": c}] for c in
            ["1974-10-17\nThis is a date", "1974-10-18", "2022-10-17 and more", "October 17, 1974", ""]]
    per_fn = score_completions([fn], [[{"role": "user", "content": "q"}]] * 5, chat, [[1]] * 5,
                               {"answer": ["1974-10-17"] * 5})
    assert per_fn[:, 0].tolist() == pytest.approx([1.0, 2 / 3, 0.0, 0.0, 0.0])
    text = score_completions([fn], ["q"], [" 1999-01-02 "], [[1]], {"answer": ["1999-03-02"]})
    assert text[:, 0].tolist() == pytest.approx([2 / 3])
