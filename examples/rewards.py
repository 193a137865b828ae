"""Reward functions for ``lorakit train --objective grpo`` (TRL's signature: a TRL reward function works as is).

    lorakit train configs/demo-grpo.yaml          # --reward examples/rewards.py:iso_date

Each function gets the prompts and completions of a rollout batch (one entry per completion; chat
completions are ``[{"role": "assistant", "content": text}]``), the completions' token ids, and every other
column of the prompt rows as a keyword list (here ``answer``). It returns one float per completion, or None
where it does not apply.
"""

from __future__ import annotations

import re

DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def iso_date(prompts, completions, answer, **kwargs) -> list[float]:
    """The ISO date on the completion's first line against the answer: 1 when it is the answer, else a third
    for each of year, month and day it gets right (0 when the first line holds no YYYY-MM-DD date).

    Partial credit gives a group of wrong completions something to rank by; only a right date scores 1,
    which is what the demo's held-out pass rate counts (pass_reward: 1).
    """
    out = []
    for completion, expected in zip(completions, answer, strict=True):
        lines = _text(completion).strip().splitlines()
        found = DATE.fullmatch(lines[0].strip()) if lines else None
        if found is None:
            out.append(0.0)
            continue
        want = expected.split("-")
        out.append(sum(a == b for a, b in zip(found.groups(), want, strict=True)) / 3)
    return out
