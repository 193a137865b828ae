"""Reward functions for online RL (GRPO): loaded from ``MODULE:FUNCTION`` specs, called with TRL's signature,
checked, and summed with weights.

A reward function is TRL's::

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]:
        ...

``prompts`` and ``completions`` are lists with one entry per completion (a prompt repeated for each of its
G completions); for chat prompts (message lists) each completion is ``[{"role": "assistant", "content":
text}]``, else a string. ``completion_ids`` holds each completion's token ids, and every other column of the
dataset rows comes as a keyword list aligned with them (``answer=[...]``). A function returns one number per
completion, or None where it does not apply (e.g. a math reward on a code prompt); a completion for which
every function returns None is unscorable: it is left out of its group's baseline and gets advantage 0
(TRL's rule). A user's TRL reward function works unchanged.

A function that raises, returns the wrong number of values or something that is not a number fails the
run with an error naming it (the last checkpoint stays as it was): a silent zero would train on a bug.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, TrainingError


@dataclass
class Reward:
    """One reward function of a run: ``name`` is its spec (``module:function``), used in errors and in the
    ``rewards/<name>/mean`` metric."""

    name: str
    fn: Callable[..., Sequence[float | None]]
    weight: float = 1.0


def parse_specs(spec: str | Sequence[str] | None) -> list[str]:
    """``"a:f,b.py:g"`` (or a list) → ``["a:f", "b.py:g"]``."""
    if spec is None:
        return []
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    return [p.strip() for p in parts if p.strip()]


def parse_weights(weights: str | Sequence[float] | None) -> list[float]:
    """``"1,0.5"`` / ``"1 0.5"`` / ``[1, 0.5]`` → ``[1.0, 0.5]`` (empty: all weights 1)."""
    if weights is None:
        return []
    items = weights.replace(",", " ").split() if isinstance(weights, str) else list(weights)
    out = []
    for w in items:
        try:
            out.append(float(w))
        except (TypeError, ValueError):
            raise ConfigError(f"reward_weights: {w!r} is not a number; give one weight per reward function, "
                              "e.g. --reward-weights 1,0.5") from None
    return out


def load_rewards(spec: str | Sequence[str] | None, weights: str | Sequence[float] | None = None) -> list[Reward]:
    """The reward functions ``spec`` names, imported, with their weights.

    Args:
        spec: ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION``, several separated by commas (or a list).
        weights: one weight per function (default: 1 each); the reward of a completion is the weighted sum.
    """
    from ..errors import ModelLoadError
    from ..models.custom import is_custom_spec, resolve_builder

    specs = parse_specs(spec)
    if not specs:
        raise ConfigError("the grpo objective needs --reward MODULE:FUNCTION (several comma-separated), a function "
                          "fn(prompts, completions, **columns) returning one float (or None) per completion")
    ws = parse_weights(weights)
    if ws and len(ws) != len(specs):
        raise ConfigError(f"--reward-weights gives {len(ws)} weights for {len(specs)} reward functions "
                          f"({', '.join(specs)}); give one per function")
    out = []
    for i, s in enumerate(specs):
        if not is_custom_spec(s):
            raise ConfigError(f"--reward {s!r}: expected MODULE:FUNCTION (an importable module, e.g. "
                              "mypkg.rewards:accuracy) or path/to/file.py:FUNCTION")
        try:
            fn = resolve_builder(s)
        except ModelLoadError as exc:
            raise ConfigError(f"--reward {s}: {exc}") from None
        out.append(Reward(s, fn, ws[i] if ws else 1.0))
    return out


def call_reward(reward: Reward, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                columns: dict[str, list[Any]]) -> list[float]:
    """One function's rewards for a batch of completions, checked: floats, NaN where it returned None."""
    n = len(completions)
    try:
        values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except Exception as exc:
        raise TrainingError(f"reward function {reward.name} raised {type(exc).__name__}: {exc} (called on {n} "
                            f"completions with columns {sorted(columns) or 'none'}); fix it and --resume") from exc
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise TrainingError(f"reward function {reward.name} returned {type(values).__name__}; expected a list of "
                            f"{n} floats (or None), one per completion") from None
    if len(values) != n:
        raise TrainingError(f"reward function {reward.name} returned {len(values)} rewards for {n} completions; "
                            "return exactly one per completion (None where it does not apply)")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if not isinstance(v, numbers.Real) or math.isinf(float(v)):
            raise TrainingError(f"reward function {reward.name} returned {v!r} ({type(v).__name__}) for completion "
                                f"{i}; rewards are finite numbers, or None where the function does not apply")
        out.append(float(v))
    return out


def score_completions(rewards: Sequence[Reward], prompts: list[Any], completions: list[Any],
                      completion_ids: list[list[int]], columns: dict[str, list[Any]]) -> torch.Tensor:
    """(N, F): each function's reward of each completion, NaN where it returned None.

    Args:
        rewards: the run's reward functions.
        prompts: one per completion (a prompt repeated for each of its completions).
        completions: strings, or ``[{"role": "assistant", "content": ...}]`` for chat prompts.
        completion_ids: token ids of each completion.
        columns: the dataset's other columns, one list entry per completion.
    """
    per_fn = [call_reward(r, prompts, completions, completion_ids, columns) for r in rewards]
    return torch.tensor(per_fn, dtype=torch.float32).T.reshape(len(completions), len(rewards))


def combine(per_fn: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """(N,) weighted sum of each completion's rewards over the functions, Nones (NaN) skipped; NaN where every
    function returned None (an unscorable completion, TRL's rule)."""
    w = torch.tensor(list(weights), dtype=per_fn.dtype)
    total = (per_fn * w.unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(per_fn).all(dim=1)] = math.nan
    return total
