"""Datasets for causal-LM fine-tuning: JSONL formats, chat templates, loss masking, batching.

Each non-empty JSONL line is one object in one of three formats (extra keys are ignored):

- ``{"text": ...}``: loss on every token; eos is appended.
- ``{"prompt": ..., "completion": ...}``: loss on the completion and the eos appended to it.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template; loss on each assistant message's content and the end-of-turn token that closes it.

Labels are aligned with ``input_ids`` (the model shifts them, as transformers models do) and are
-100 wherever no loss is taken.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


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


# ---------------------------------------------------------------- reading and validation
def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate a JSONL dataset without tokenizing it (cheap: call it before loading a model).

    Args:
        path: a UTF-8 file with one JSON object per line; blank lines are skipped.

    Returns:
        The records (JSON objects, extra keys included) in file order.

    Raises:
        DataError: naming ``file:line`` and what was expected, or if the file has no examples.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read dataset ({exc.strerror or exc})") from None
    records = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 byte-order mark
            line = line[3:]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at byte "
                            f"{exc.start + 1} of the line); save the file as UTF-8") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); expected one JSON "
                            "object per line") from None
        validate_record(obj, where)
        records.append(obj)
    if not records:
        raise DataError(f"{path} contains no examples (expected one JSON object per line)")
    return records


def validate_record(obj: Any, where: str) -> str:
    """Check one record and return its format: "text", "prompt_completion" or "messages".

    Args:
        obj: a parsed JSON value.
        where: location for error messages (``file:line``).
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {_json_type(obj)}")
    present = [k for k in ("text", "prompt", "messages") if k in obj]
    if not present:
        raise DataError(f"{where}: expected a 'text', 'prompt'+'completion' or 'messages' key; found keys "
                        f"{sorted(obj)}")
    if len(present) > 1:
        raise DataError(f"{where}: found keys {present}; expected exactly one of 'text', "
                        "'prompt'+'completion', 'messages'")
    if "text" in obj:
        _require_str(obj, "text", where)
        return "text"
    if "prompt" in obj:
        if "completion" not in obj:
            raise DataError(f"{where}: has 'prompt' but no 'completion'; expected both")
        _require_str(obj, "prompt", where)
        _require_str(obj, "completion", where)
        return "prompt_completion"
    _check_messages(obj["messages"], where)
    return "messages"


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        found = "an empty array" if messages == [] else _json_type(messages)
        raise DataError(f"{where}: 'messages' must be a non-empty array of {{role, content}} objects, found {found}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', "
                            f"found {_json_type(msg)}")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                found = "nothing" if key not in msg else _json_type(msg[key])
                raise DataError(f"{where}: messages[{i}].{key} must be a string, found {found}")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has unknown role {msg['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
    if messages[0]["role"] == "assistant":  # its start cannot be found: templates refuse an empty conversation
        raise DataError(f"{where}: messages[0] is from the assistant; expected a system or user message first")


def _require_str(obj: dict, key: str, where: str) -> None:
    if not isinstance(obj[key], str):
        raise DataError(f"{where}: '{key}' must be a string, found {_json_type(obj[key])}")


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- tokenization and loss masks
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


# ---------------------------------------------------------------- batching
def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into LongTensors.

    Args:
        examples: the batch.
        pad_id: token id written into the padding of ``input_ids`` (labels pad with -100).

    Returns:
        ``input_ids``, ``labels`` and ``attention_mask`` (1 on real tokens), each (B, T_max).
    """
    if not examples:
        raise DataError("collate: the batch is empty")
    if not isinstance(pad_id, int):
        raise ConfigError(f"collate: pad_id must be an int, found {pad_id!r} (does the tokenizer have a pad "
                          "or eos token?)")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class BatchSampler:
    """Endless, deterministic, resumable batches of example indices.

    Epoch e visits a permutation of range(n_examples) drawn from a generator seeded by
    (seed, epoch) alone, so the batches depend on nothing but these numbers and the position;
    ``state_dict()`` saves the position and ``load_state_dict()`` restores it exactly.

    Args:
        n_examples: dataset size.
        batch_size: indices per batch.
        seed: shuffling seed.
        drop_last: skip an epoch's last, smaller batch (default: keep it).
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int = 0, drop_last: bool = False) -> None:
        for name, value in (("n_examples", n_examples), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"BatchSampler: {name} must be an int >= 1, found {value!r}")
        if drop_last and n_examples < batch_size:
            raise ConfigError(f"BatchSampler: drop_last with {n_examples} examples < batch_size {batch_size} "
                              "would yield no batch")
        self.n_examples, self.batch_size, self.seed, self.drop_last = n_examples, batch_size, seed, drop_last
        self.epoch, self.index = 0, 0  # next batch starts at permutation(epoch)[index]
        self._order: list[int] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.n_examples, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        end = self.index + self.batch_size
        if self.index >= self.n_examples or (self.drop_last and end > self.n_examples):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
            end = self.batch_size
        if self._order is None:
            self._order = list(range(self.n_examples))
            # A str seed is hashed with SHA-512: independent streams per (seed, epoch), same on every run.
            random.Random(f"lorakit:{self.seed}:{self.epoch}").shuffle(self._order)
        batch = self._order[self.index:end]
        self.index += len(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position (epoch, index into that epoch's order) and the settings that fix the order."""
        return {"epoch": self.epoch, "index": self.index, "n_examples": self.n_examples,
                "batch_size": self.batch_size, "seed": self.seed, "drop_last": int(self.drop_last)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; the settings must match the ones it was saved with.

        Args:
            state: a dict from ``state_dict()``.
        """
        mine = self.state_dict()
        for key in ("n_examples", "batch_size", "seed", "drop_last"):
            if state.get(key) != mine[key]:
                raise DataError(f"BatchSampler state was saved with {key}={state.get(key)} but this sampler has "
                                f"{key}={mine[key]}; resuming would replay different batches")
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and isinstance(index, int) and epoch >= 0 and 0 <= index <= self.n_examples):
            raise DataError(f"BatchSampler state has epoch={epoch!r}, index={index!r}; expected ints with "
                            f"epoch >= 0 and 0 <= index <= {self.n_examples}")
        self.epoch, self.index, self._order = epoch, index, None
