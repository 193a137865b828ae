"""GRPO's data: prompt-only rows, their token ids, and the seeded prompt batches of each optimizer step.

A row is ``{"prompt": "text"}`` or ``{"prompt": [{"role": "user", "content": ...}, ...]}`` (chat messages,
rendered with the chat template and the generation prompt); every other key of the row is a column passed
to the reward functions by name (``answer``, ``tests`` ...). ``--columns prompt=question`` maps another name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...data.batching import BatchSampler
from ...data.formats import ROLES, parse_columns
from ...data.readers import read_records
from ...data.tokenize import DataStats
from ...errors import ConfigError, DataError


@dataclass
class PromptRows:
    """A file's prompt rows, validated: ``prompts`` (text or messages) and the other ``columns``, row-aligned."""

    path: Path
    prompts: list[Any]
    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.prompts)

    def describe(self) -> str:
        chat = sum(isinstance(p, list) for p in self.prompts)
        kind = "chat prompts" if chat == len(self) else "text prompts" if not chat else "text and chat prompts"
        extra = f", columns for the rewards: {', '.join(sorted(self.columns))}" if self.columns else ""
        return f"{kind}, {len(self):,} rows{extra}"

    def take(self, rows: list[int]) -> tuple[list[Any], dict[str, list[Any]]]:
        """(prompts, columns) of these rows."""
        return [self.prompts[i] for i in rows], {k: [v[i] for i in rows] for k, v in self.columns.items()}


def read_prompts(path: Path, columns: list[str] | None = None) -> PromptRows:
    """Read and check a prompt file (JSONL, or JSON/CSV/Parquet/save_to_disk through ``datasets``), through the
    data package's reader (``read_records``: file:line errors, ``--columns`` mapping) with the prompt row's check.

    Args:
        path: the file.
        columns: ``--columns`` (``prompt=question``).
    """
    records = read_records(path, parse_columns(columns), validate=_check_row)
    rows = [r for _, chunk in records.raw_chunks(1000) for r in chunk]
    keys = sorted({k for r in rows for k in r if k != "prompt"})
    for i, r in enumerate(rows):
        missing = [k for k in keys if k not in r]
        if missing:
            raise DataError(f"{records.where(i)}: lacks the column(s) {missing} other rows have; every row passes the "
                            "same columns to the reward functions")
    return PromptRows(Path(path), [r["prompt"] for r in rows], {k: [r[k] for r in rows] for k in keys})


def _check_row(row: Any, where: str) -> str:
    """``read_records``' check of a prompt row; its format name is "prompt"."""
    if not isinstance(row, dict) or "prompt" not in row:
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: expected a prompt row {{\"prompt\": text or chat messages, other columns...}}; "
                        f"found {found} (map another name with --columns prompt=NAME)")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{where}: 'prompt' is empty")
        return "prompt"
    ok = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in prompt)
    if not ok:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages "
                        f"{{\"role\": one of {', '.join(ROLES)}, \"content\": string}}")
    return "prompt"


@dataclass
class PromptSet:
    """Prompt rows with their token ids (the chat template applied to messages)."""

    rows: PromptRows
    ids: list[list[int]]
    stats: DataStats
    lengths: np.ndarray  # prompt + max_completion_length per row: the widest sequence a rollout may train on

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_prompts(rows: PromptRows, tokenizer: Any, max_completion_length: int) -> PromptSet:
    """Token ids of every prompt (as ``generate`` encodes them), and the figures the run reports."""
    from ...generate.api import encode_prompt

    if tokenizer is None:
        raise ConfigError(f"{rows.path}: prompts are text; the model came without a tokenizer")
    ids = [encode_prompt(tokenizer, p, f"{rows.path} prompt {i + 1}") for i, p in enumerate(rows.prompts)]
    n = sum(len(x) for x in ids)
    stats = DataStats(n_examples=len(ids), n_truncated=0, n_dropped=0, n_tokens=n + len(ids) * max_completion_length,
                      n_trainable_tokens=len(ids) * max_completion_length)
    return PromptSet(rows, ids, stats, np.array([len(x) + max_completion_length for x in ids]))


class PromptBatches:
    """The prompts of each optimizer step: ``prompts_per_step`` rows drawn by a seeded, resumable sampler
    (every rank draws the same ones and keeps its contiguous share, from ``offset``: rollouts seeded by the
    global position sample what one process would)."""

    def __init__(self, prompts: PromptSet, prompts_per_step: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if len(prompts) < prompts_per_step:
            raise ConfigError(f"{len(prompts)} prompts, fewer than the {prompts_per_step} each step draws "
                              "(batch_size × grad_accum / num_generations); lower the batch or add prompts")
        self.prompts, self.rank, self.world = prompts, rank, world
        self.sampler = BatchSampler(len(prompts), prompts_per_step, seed=seed, drop_last=True)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def offset(self) -> int:
        """The position of this rank's first prompt among the step's prompts (over every rank)."""
        return self.rank * (self.sampler.batch_size // self.world)

    def next_step(self) -> list[int]:
        """This rank's prompt rows for the next step."""
        rows = next(self.sampler)
        share = len(rows) // self.world
        return rows[self.offset:self.offset + share]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        """The left padding share of the first epoch's prompt batches."""
        lens = [len(x) for x in self.prompts.ids]
        pad = real = 0
        for batch in self.sampler.epoch_batches(0):
            widest = max(lens[i] for i in batch)
            real += sum(lens[i] for i in batch)
            pad += widest * len(batch)
        return {"padding_fraction": 1 - real / pad if pad else 0.0}
