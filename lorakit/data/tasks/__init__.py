"""Packaged demo tasks: JSONL splits shipped inside lorakit, and how to score them.

``dates``: convert a date written in one of ten English surface forms to ISO 8601
(YYYY-MM-DD). Messages format; made by ``scripts/make_date_data.py``.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError

SPLITS = ("train", "valid", "test")
_ROOT = Path(__file__).resolve().parent


def task_names() -> list[str]:
    """Names of the packaged tasks (folders holding a ``train.jsonl``)."""
    return sorted(p.parent.name for p in _ROOT.glob("*/train.jsonl"))


def task_path(name: str, split: str) -> Path:
    """Path of a packaged task's JSONL split.

    Args:
        name: task name, e.g. ``"dates"``.
        split: one of ``"train"``, ``"valid"``, ``"test"``.
    """
    if name not in task_names():
        raise DataError(f"unknown task {name!r}; packaged tasks: {', '.join(task_names()) or 'none'}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of task {name!r}; expected one of {', '.join(SPLITS)}")
    return _ROOT / name / f"{split}.jsonl"


def exact_match(prediction: str, reference: str) -> bool:
    """True when prediction and reference are equal after stripping surrounding whitespace.

    Args:
        prediction: the model's generated answer (special tokens already removed).
        reference: the expected answer.
    """
    return prediction.strip() == reference.strip()
