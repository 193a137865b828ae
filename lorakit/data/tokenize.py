"""Tokenization and loss masks: records in the formats of ``formats`` become token ids and labels.

Labels are aligned with ``input_ids`` (the model shifts them, as transformers models do) and are
-100 wherever no loss is taken. A tokenized set lives in three flat NumPy arrays (token ids, a
one-byte loss mask, example offsets), never in Python lists: 1M examples of 200 tokens take
~0.6 GB (uint16 ids when the vocabulary fits), and a cached set is memory-mapped from disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from .formats import to_canonical, validate_record
from .readers import Records, read_records

IGNORE_INDEX = -100
CHUNK = 1000  # records per tokenizer call (and per task with num_proc > 1)


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


class TokenizedDataset:
    """Tokenized examples in flat arrays; indexable like a list of ``TokenizedExample``.

    Args:
        ids: every example's token ids, concatenated (uint16 or int32).
        mask: 1 where the token is a label (same length as ids), uint8.
        offsets: example i is ``ids[offsets[i]:offsets[i + 1]]`` (int64, n + 1 entries).
        stats: how the set was made.
    """

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, stats: DataStats) -> None:
        self.ids, self.mask, self.offsets, self.stats = ids, mask, offsets, stats

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> TokenizedExample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        index %= len(self)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.ids[start:end].astype(np.int64)
        labels = np.where(self.mask[start:end].astype(bool), ids, IGNORE_INDEX)
        return TokenizedExample(ids.tolist(), labels.tolist())

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example, (n,) int64."""
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays."""
        return self.ids.nbytes + self.mask.nbytes + self.offsets.nbytes


def load(path: str | os.PathLike, tokenizer: Any, max_seq_len: int) -> TokenizedDataset:
    """Read, validate and tokenize a dataset file (any reader and format ``readers.read_records`` takes).

    Args:
        path, tokenizer, max_seq_len: as for ``read_records`` and ``tokenize_examples``.
    """
    return tokenize_examples(read_records(path), tokenizer, max_seq_len)


def tokenize_examples(records: Records | Sequence[dict[str, Any]], tokenizer: Any, max_seq_len: int, *,
                      path: str | os.PathLike | None = None, num_proc: int = 1,
                      progress: bool = False) -> TokenizedDataset:
    """Tokenize records, mask the loss, truncate, and drop examples with nothing left to train on.

    Args:
        records: ``readers.Records`` (errors name ``file:line``), or dicts in any format of
            ``formats`` (validated here; errors name ``path record N``, N counting from 1).
        tokenizer: a transformers tokenizer with an eos token (and a chat template for messages).
        max_seq_len: examples longer than this keep their first ``max_seq_len`` tokens.
        path: the dicts' file, for error messages.
        num_proc: tokenizer processes (1: this process).
        progress: show a tqdm bar.

    Returns:
        The kept examples and a ``DataStats``.

    Raises:
        DataError: on an invalid record or chat template, or when no example is left to train on.
    """
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 2:
        raise ConfigError(f"max_seq_len must be an int >= 2, found {max_seq_len!r}")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ConfigError(f"num_proc must be an int >= 1, found {num_proc!r}")
    name = str(records.path if isinstance(records, Records) else path or "<records>")
    tasks = ((chunk, wheres, max_seq_len) for chunk, wheres in _chunks(records, path))
    parts = []
    with tqdm(total=len(records), desc="tokenize", unit="ex", disable=not progress, leave=False) as bar:
        for part in _run(tasks, tokenizer, num_proc):
            parts.append(part)
            bar.update(part["n_seen"])
    n_dropped = sum(p["n_dropped"] for p in parts)
    lengths = np.concatenate([p["lengths"] for p in parts] or [np.zeros(0, dtype=np.int64)])
    if len(lengths) == 0:
        raise DataError(f"{name}: no example has a token to train on ({n_dropped} records, all "
                        f"dropped; max_seq_len={max_seq_len})")
    ids = np.concatenate([p["ids"] for p in parts])
    ids = ids.astype(np.uint16) if int(ids.max(initial=0)) < 2**16 and int(ids.min(initial=0)) >= 0 else ids
    mask = np.concatenate([p["mask"] for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stats = DataStats(n_examples=len(lengths), n_truncated=sum(p["n_truncated"] for p in parts),
                      n_dropped=n_dropped, n_tokens=int(offsets[-1]),
                      n_trainable_tokens=sum(p["n_trainable"] for p in parts))
    return TokenizedDataset(ids, mask, offsets, stats)


def _chunks(records, path) -> Iterator[tuple[list[dict], list[str]]]:
    """(canonical records, where each is) in CHUNK-sized pieces."""
    if isinstance(records, Records):
        for start, chunk in records.chunks(CHUNK):
            yield chunk, [records.where(start + j) for j in range(len(chunk))]
        return
    for start in range(0, len(records), CHUNK):
        wheres = [f"{path or '<records>'} record {n}" for n in range(start + 1, start + CHUNK + 1)]
        chunk = records[start:start + CHUNK]
        yield [to_canonical(r, validate_record(r, w)) for r, w in zip(chunk, wheres, strict=False)], wheres


def _run(tasks, tokenizer: Any, num_proc: int) -> Iterator[dict]:
    """_encode_chunk over tasks, in order; in num_proc spawned processes when num_proc > 1."""
    if num_proc == 1:
        for task in tasks:
            yield _encode_chunk(tokenizer, *task)
        return
    # spawn, not fork: a forked copy of a tokenizer whose Rust thread pool has run can deadlock
    with ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(tokenizer,)) as pool:
        pending = []
        for task in tasks:  # a bounded window of chunks in flight: records are never all pickled at once
            pending.append(pool.submit(_worker, *task))
            if len(pending) > 2 * num_proc:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _worker(records: list[dict], wheres: list[str], max_seq_len: int) -> dict:
    return _encode_chunk(_WORKER_TOKENIZER, records, wheres, max_seq_len)


def _encode_chunk(tokenizer: Any, records: list[dict], wheres: list[str], max_seq_len: int) -> dict:
    """Encode, truncate and mask one chunk of canonical records: flat arrays and counts."""
    encoded = _encode_many(records, wheres, tokenizer)
    ids_out, mask_out, lengths = [], [], []
    n_truncated = n_dropped = n_trainable = 0
    for ids, labels in encoded:
        truncated, ids, labels = len(ids) > max_seq_len, ids[:max_seq_len], labels[:max_seq_len]
        trainable = sum(label != IGNORE_INDEX for label in labels[1:])
        if trainable == 0:
            n_dropped += 1
            continue
        n_truncated += truncated
        n_trainable += trainable
        ids_out.extend(ids)
        mask_out.extend(label != IGNORE_INDEX for label in labels)
        lengths.append(len(ids))
    return {"ids": np.asarray(ids_out, dtype=np.int32), "mask": np.asarray(mask_out, dtype=np.uint8),
            "lengths": np.asarray(lengths, dtype=np.int64), "n_truncated": n_truncated, "n_dropped": n_dropped,
            "n_trainable": n_trainable, "n_seen": len(records)}


def _encode_many(records: list[dict], wheres: list[str], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each canonical record; text and prompt/completion in one batched tokenizer call."""
    out: list[Any] = [None] * len(records)
    by_format: dict[str, list[int]] = {"text": [], "prompt_completion": [], "messages": []}
    for i, record in enumerate(records):
        by_format[validate_record(record, wheres[i])].append(i)
    for i in by_format["messages"]:
        out[i] = _encode_messages(records[i]["messages"], tokenizer, wheres[i])
    plain = by_format["text"] + by_format["prompt_completion"]
    if not plain:
        return out
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{wheres[plain[0]]}: the tokenizer has no eos token to end the example with")
    texts = _batch_encode(tokenizer, [records[i]["text"] for i in by_format["text"]], True)
    for i, ids in zip(by_format["text"], texts, strict=True):
        out[i] = (ids + [eos], ids + [eos])
    # Prompt and completion are tokenized apart, as at inference, where the prompt is tokenized
    # alone and the model continues it: the boundary never merges into one token.
    pcs = by_format["prompt_completion"]
    prompts = _batch_encode(tokenizer, [records[i]["prompt"] for i in pcs], True)
    completions = _batch_encode(tokenizer, [records[i]["completion"] for i in pcs], False)
    for i, prompt, completion in zip(pcs, prompts, completions, strict=True):
        out[i] = (prompt + completion + [eos], [IGNORE_INDEX] * len(prompt) + completion + [eos])
    return out


def _batch_encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


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
