"""Tokenization and loss masks: records in the formats of ``formats`` become token ids and labels.

Labels are aligned with ``input_ids`` (the model shifts them, as transformers models do) and are
-100 wherever no loss is taken.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DataError
from .formats import validate_record
from .readers import load_jsonl

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels of one example (same length; labels -100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class DataStats:
    """What tokenization kept and cut.

    Args:
        n_examples: examples kept.
        n_truncated: kept examples that were cut to ``max_seq_len``.
        n_dropped: examples dropped because no trainable token was left (after truncation).
        n_tokens: tokens in the kept examples.
        n_trainable_tokens: tokens that receive loss: labels != -100 at positions >= 1 (position 0
            is never a target once the model shifts labels by one).
    """

    n_examples: int
    n_truncated: int
    n_dropped: int
    n_tokens: int
    n_trainable_tokens: int


@dataclass(frozen=True)
class TokenizedDataset:
    """Tokenized examples and the stats of how they were made; indexable like a list."""

    examples: list[TokenizedExample]
    stats: DataStats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]


def load(path: str | os.PathLike, tokenizer: Any, max_seq_len: int) -> TokenizedDataset:
    """Read, validate and tokenize a JSONL dataset.

    Args:
        path, tokenizer, max_seq_len: as for ``load_jsonl`` and ``tokenize_examples``.
    """
    return tokenize_examples(load_jsonl(path), tokenizer, max_seq_len, path=path)


def tokenize_examples(records: Sequence[dict[str, Any]], tokenizer: Any, max_seq_len: int, *,
                      path: str | os.PathLike | None = None) -> TokenizedDataset:
    """Tokenize records, mask the loss, truncate, and drop examples with nothing left to train on.

    Args:
        records: from ``load_jsonl``, or dicts in the same formats (validated here too).
        tokenizer: a transformers tokenizer with an eos token (and a chat template for messages).
        max_seq_len: examples longer than this keep their first ``max_seq_len`` tokens.
        path: the records' file, named in errors as ``path record N`` (N counts records from 1).

    Returns:
        The kept examples and a ``DataStats``.

    Raises:
        DataError: on an invalid record or chat template, or when no example is left to train on.
    """
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 2:
        raise ConfigError(f"max_seq_len must be an int >= 2, found {max_seq_len!r}")
    kept, n_truncated, n_dropped = [], 0, 0
    for n, record in enumerate(records, start=1):
        where = f"{path or '<records>'} record {n}"
        ids, labels = _encode(record, validate_record(record, where), tokenizer, where)
        truncated, ids, labels = len(ids) > max_seq_len, ids[:max_seq_len], labels[:max_seq_len]
        if _n_trainable(labels) == 0:
            n_dropped += 1
        else:
            n_truncated += truncated
            kept.append(TokenizedExample(ids, labels))
    if not kept:
        raise DataError(f"{path or '<records>'}: no example has a token to train on ({n_dropped} records, all "
                        f"dropped; max_seq_len={max_seq_len})")
    stats = DataStats(n_examples=len(kept), n_truncated=n_truncated, n_dropped=n_dropped,
                      n_tokens=sum(len(e.input_ids) for e in kept),
                      n_trainable_tokens=sum(_n_trainable(e.labels) for e in kept))
    return TokenizedDataset(kept, stats)


def _n_trainable(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels[1:])


def _encode(record: dict, fmt: str, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    if fmt == "messages":
        return _encode_messages(record["messages"], tokenizer, where)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{where}: the tokenizer has no eos token to end the example with")
    if fmt == "text":
        ids = tokenizer.encode(record["text"], add_special_tokens=True) + [eos]
        return ids, list(ids)
    # Prompt and completion are tokenized apart, as at inference, where the prompt is tokenized
    # alone and the model continues it: the boundary never merges into one token.
    prompt = tokenizer.encode(record["prompt"], add_special_tokens=True)
    completion = tokenizer.encode(record["completion"], add_special_tokens=False) + [eos]
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def _encode_messages(messages: list[dict], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """Render the conversation; label each assistant turn found by diffing rendered prefixes.

    Assistant message i spans from the end of render(messages[:i], add_generation_prompt=True)
    to the end of render(messages[:i+1]), less trailing whitespace tokens (the newline after
    ChatML's <|im_end|>). Both renderings must be token-prefixes of the whole conversation.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the messages format needs a tokenizer with a chat template")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]  # extra keys ignored
    ids = _render(tokenizer, msgs, False, where)
    labels = [IGNORE_INDEX] * len(ids)
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        start = _prefix_len(ids, _render(tokenizer, msgs[:i], True, where), where, i)
        end = _prefix_len(ids, _render(tokenizer, msgs[: i + 1], False, where), where, i)
        if end < start:
            raise DataError(f"{where}: chat template is not prefix-stable: the generation prompt before "
                            f"messages[{i}] is longer than the rendered message")
        while end > start and not tokenizer.decode([ids[end - 1]]).strip():
            end -= 1
        labels[start:end] = ids[start:end]
    return ids, labels


def _render(tokenizer: Any, msgs: list[dict], add_generation_prompt: bool, where: str) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2 raises its own errors, templates raise on purpose via raise_exception
        raise DataError(f"{where}: the chat template failed on messages[:{len(msgs)}]: {exc}") from None
    # Templates carry their own special tokens (bos included), as apply_chat_template(tokenize=True) assumes.
    return tokenizer.encode(text, add_special_tokens=False)


def _prefix_len(ids: list[int], prefix: list[int], where: str, i: int) -> int:
    if ids[: len(prefix)] != prefix:
        raise DataError(f"{where}: chat template is not prefix-stable: the tokens rendered up to messages[{i}] "
                        "are not a prefix of the whole conversation's tokens, so the assistant turn cannot be "
                        "located; use a template that renders earlier turns the same whatever follows")
    return len(prefix)
