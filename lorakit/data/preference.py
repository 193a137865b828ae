"""Preference pairs in TRL's formats, read through the common readers and tokenized as TRL's DPOTrainer does.

Forms (one per row, told apart by the type of ``chosen``):

- standard ``{"prompt": str, "chosen": str, "rejected": str}``: eos is appended to each completion
  (unless it ends with it), prompt and prompt+completion are tokenized with the tokenizer's own special
  tokens;
- conversational ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``: the prompt is
  rendered with the chat template and the generation prompt, prompt+completion as the whole conversation
  (the completion is the assistant turn with its end-of-turn tokens);
- implicit prompt (no ``"prompt"``): chosen and rejected share a leading part (messages, or characters of
  a string), which becomes the prompt, as TRL's ``extract_prompt``.

The completion starts where the tokenized prompt and the tokenized prompt+completion diverge (TRL's
``common_prefix_length``). A pair longer than ``max_length`` keeps its first ``max_length`` tokens (the
completion is cut from the right; counted). A pair whose prompt alone fills ``max_length``, an empty
completion, identical completions and malformed rows are errors naming ``file:line`` — or, with
``skip_bad=True`` (``--skip-bad-pairs``), skipped and counted by reason: never trained on with zero
completion tokens.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .formats import ROLES, _json_type
from .readers import Records, read_records

BAD_REASONS = ("malformed", "prompt_too_long", "empty_completion", "identical")


class BadPair(DataError):
    """A row that parses but cannot train: ``reason`` is one of BAD_REASONS."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class PreferenceStats:
    """What tokenization kept, cut and skipped (the names the run report shares with ``DataStats``).

    Args:
        n_examples: pairs kept.
        n_truncated: kept pairs with a completion cut at max_length.
        n_dropped: rows skipped under ``skip_bad`` (by reason in ``skipped``).
        n_tokens: tokens of prompt+chosen and prompt+rejected, after truncation.
        n_trainable_tokens: completion tokens (chosen and rejected), whose log-probs the losses read.
    """

    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_tokens: int = 0
    n_trainable_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class PreferenceSet:
    """Tokenized pairs: ``pairs[i] = (prompt_ids, chosen_ids, rejected_ids)``, truncated already."""

    pairs: list[tuple[list[int], list[int], list[int]]]
    stats: PreferenceStats
    digest: str = ""  # the data file's digest (keys the reference log-prob cache)
    sources: list[int] = field(default_factory=list)  # the row (from 0) each pair came from

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each pair's longer sequence (what a padded batch holds per row), (n,) int64."""
        return np.array([len(p) + max(len(c), len(r)) for p, c, r in self.pairs], dtype=np.int64)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _check_messages(value: Any, key: str, where: str) -> None:
    if not isinstance(value, list):
        raise DataError(f"{where}: '{key}' must be a string or an array of {{role, content}} messages, found "
                        f"{_json_type(value)}")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"),
                                                                                              str):
            raise DataError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has unknown role {msg['role']!r}; expected one of {', '.join(ROLES)}")


def validate_pair(obj: Any, where: str) -> str:
    """Check one preference row and return its form: "standard" or "conversational".

    Args:
        obj: a parsed row.
        where: ``file:line`` for errors.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'chosen' and 'rejected', found {_json_type(obj)}")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    nulls = [k for k in ("chosen", "rejected") if k in obj and obj[k] is None]
    if missing or nulls:
        what = (f"missing {missing}, found keys {sorted(obj)}" if missing else
                f"{' and '.join(repr(k) for k in nulls)} {'is' if len(nulls) == 1 else 'are'} null")
        raise DataError(f"{where}: a preference pair needs 'chosen' and 'rejected' (and optionally 'prompt'); {what}")
    prompt = obj.get("prompt")
    if isinstance(obj["chosen"], str) and isinstance(obj["rejected"], str):
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{where}: 'chosen' and 'rejected' are strings, so 'prompt' must be one too, found "
                            f"{_json_type(prompt)}")
        check_completions(obj, where)
        return "standard"
    for key in ("chosen", "rejected"):
        _check_messages(obj[key], key, where)
    if prompt is not None:
        _check_messages(prompt, "prompt", where)
        if not prompt:
            raise DataError(f"{where}: 'prompt' is an empty conversation")
    check_completions(obj, where)
    return "conversational"


def _tolerant(obj: Any, where: str) -> str:
    """validate_pair, a bad row counted under its reason (``BAD_REASONS``: "malformed", "identical", ...)
    instead of raised (for skip_bad)."""
    try:
        return validate_pair(obj, where)
    except DataError as bad:
        return getattr(bad, "reason", "malformed")


class PairRecords(Records):
    """Records of a preference file; ``formats`` counts standard, conversational (and bad, by reason) rows."""

    def describe(self) -> str:
        kinds = ", ".join(f"{n:,} {f}" for f, n in self.formats.most_common())
        return f"preference pairs ({kinds})"


def read_pairs(path: str | os.PathLike, skip_bad: bool = False) -> PairRecords:
    """Read and validate a preference file (JSONL; JSON, CSV, Parquet, datasets directories with the extra).

    Args:
        path: the file.
        skip_bad: count bad rows under their reason (``records.formats["malformed"]``, ``["identical"]``,
            ``["empty_completion"]``) instead of raising on the first.
    """
    r = read_records(path, validate=_tolerant if skip_bad else validate_pair)
    records = PairRecords(r.path, r.rows, r.formats, r.digest, r.lines, r.columns)
    if set(records.formats) <= set(BAD_REASONS):
        raise DataError(f"{path}: no row is a preference pair (all {len(records)} bad: {dict(records.formats)})")
    return records


def extract_prompt(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a row: its own prompt, or the longest shared leading part of chosen
    and rejected (messages, or characters with a space before the split left to the completions), as TRL."""
    if row.get("prompt") is not None:
        return row["prompt"], row["chosen"], row["rejected"]
    chosen, rejected = row["chosen"], row["rejected"]
    idx = min(len(chosen), len(rejected))
    for i in range(idx):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _template_ids(tokenizer: Any, messages: list[dict], generation_prompt: bool, where: str) -> list[int]:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                            add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 and templates raise their own errors
        raise DataError(f"{where}: the chat template failed: {exc}") from None
    return list(out["input_ids"])


def check_completions(row: dict[str, Any], where: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a well-formed row (``extract_prompt``), after the checks that need no
    tokenizer: neither completion empty (or blank), and the two not identical.

    Raises:
        BadPair: naming the row and the reason ("empty_completion", "identical").
    """
    prompt, chosen, rejected = extract_prompt(row)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        blank = not value.strip() if isinstance(value, str) else not any(m["content"].strip() for m in value)
        if blank:
            raise BadPair(f"{where}: empty {key} completion", "empty_completion")
    if chosen == rejected:
        raise BadPair(f"{where}: chosen and rejected are identical; the pair says nothing", "identical")
    return prompt, chosen, rejected


def encode_pair(tokenizer: Any, row: dict[str, Any], where: str = "<pair>"
                ) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of a validated row, untruncated, as TRL's DPOTrainer makes them.

    Raises:
        BadPair: on an empty completion, identical completions.
        DataError: on a conversational row without a chat template (or a template that fails).
    """
    prompt, chosen, rejected = check_completions(row, where)
    if isinstance(chosen, str):
        eos = tokenizer.eos_token
        if eos is None:
            raise DataError(f"{where}: the tokenizer has no eos token to end the completions with")
        chosen, rejected = (c if c.endswith(eos) else c + eos for c in (chosen, rejected))
        ids = [list(x) for x in tokenizer([prompt, prompt + chosen, prompt + rejected])["input_ids"]]
    else:
        if not prompt:
            raise DataError(f"{where}: chosen and rejected share no leading message, so there is no prompt")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: conversational pairs need a tokenizer with a chat template")
        ids = [_template_ids(tokenizer, prompt, True, where), _template_ids(tokenizer, prompt + chosen, False, where),
               _template_ids(tokenizer, prompt + rejected, False, where)]
    n = min(_common_prefix(ids[0], ids[1]), _common_prefix(ids[0], ids[2]))
    return ids[0][:n], ids[1][n:], ids[2][n:]


def tokenize_pairs(records: Records | Sequence[dict[str, Any]], tokenizer: Any, max_length: int,
                   skip_bad: bool = False) -> PreferenceSet:
    """Tokenize preference rows: (prompt, chosen, rejected) ids, each pair cut to ``max_length`` tokens.

    Args:
        records: from ``read_pairs`` (errors name ``file:line``), or row dicts.
        tokenizer: a transformers tokenizer with an eos token (and a chat template for messages).
        max_length: most tokens of prompt + completion; the completion is cut from the right (counted).
        skip_bad: skip and count bad rows (malformed, prompt >= max_length, empty or identical
            completions) instead of raising on the first.

    Raises:
        DataError: naming the row, on a bad row without ``skip_bad``, or when no pair is left.
    """
    if isinstance(records, Records):
        rows = ((records.where(start + j), r) for start, chunk in records.raw_chunks(1000) for j, r in enumerate(chunk))
    else:
        rows = ((f"<rows> record {i + 1}", r) for i, r in enumerate(records))
    stats, skipped, pairs, sources = PreferenceStats(), Counter(), [], []
    for index, (where, row) in enumerate(rows):
        try:
            validate_pair(row, where)
            prompt, chosen, rejected = _encode_checked(tokenizer, row, where, max_length)
        except DataError as bad:  # a BadPair names its reason; anything else is a malformed row
            if not skip_bad:
                raise
            skipped[getattr(bad, "reason", "malformed")] += 1
            continue
        cut = max(len(prompt) + len(chosen), len(prompt) + len(rejected)) > max_length
        chosen, rejected = chosen[:max_length - len(prompt)], rejected[:max_length - len(prompt)]
        stats.n_truncated += cut
        stats.n_tokens += 2 * len(prompt) + len(chosen) + len(rejected)
        stats.n_trainable_tokens += len(chosen) + len(rejected)
        pairs.append((prompt, chosen, rejected))
        sources.append(index)
    stats.n_examples, stats.n_dropped, stats.skipped = len(pairs), sum(skipped.values()), dict(skipped)
    if not pairs:
        name = records.path if isinstance(records, Records) else "<rows>"
        raise DataError(f"{name}: no preference pair left to train on (skipped: {dict(skipped)}; "
                        f"max_length={max_length})")
    return PreferenceSet(pairs, stats, records.digest if isinstance(records, Records) else "", sources)


def _encode_checked(tokenizer: Any, row: dict, where: str, max_length: int):
    prompt, chosen, rejected = encode_pair(tokenizer, row, where)
    if len(prompt) >= max_length:
        raise BadPair(f"{where}: the prompt alone is {len(prompt)} tokens, at least max_length ({max_length}): no "
                   "completion token would be left. Raise --max-seq-len, shorten the prompt, or pass "
                   "--skip-bad-pairs to skip such rows (counted)", "prompt_too_long")
    if not chosen or not rejected:
        raise BadPair(f"{where}: the {'chosen' if not chosen else 'rejected'} completion has no token of its own after "
                   "the prompt", "empty_completion")
    return prompt, chosen, rejected


LAYOUTS = ("padded", "packed", "shared")

# What the trainer rounds a packed row's width up to on CPU (``pad_to_multiple_of`` below, set by
# ``train/objectives/preference.py``): its tensors then come in a few sizes, which glibc's malloc can reuse and
# oneDNN compiles once. Measured on the bench's pairs (SmolLM2-135M bf16, glibc, 2 threads, 24 steps): peak RSS
# 4,121 -> 3,700 MB at the same step time (64: 3,768; 256: 3,787 MB); the whole bench process 5,212-5,290 ->
# 4,651 MB. It costs at most 127 tokens that score nothing per micro-batch. On CUDA (a caching allocator, no
# oneDNN) rows are not rounded.
CPU_PACK_MULTIPLE = 128


def collate_pairs(pairs: Sequence[tuple[list[int], list[int], list[int]]], pad_id: int, layout: str = "padded",
                  pad_to_multiple_of: int = 0) -> dict[str, torch.Tensor]:
    """A micro-batch of B pairs, in one of three layouts.

    - ``padded``: 2·B rows, the B chosen sequences then the B rejected ones (TRL's concatenated inputs),
      right-padded: ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on completion tokens), (2B, T).
    - ``packed``: one row without padding, ``[prompt, chosen]`` then ``[prompt, rejected]`` for each pair,
      ``position_ids`` restarting at 0 for each (any attention that reads packed rows: flash-attention's
      variable lengths, transformers' block mask, lorakit's ``lorakit_packed``).
    - ``shared``: one row, each pair as ``[prompt, chosen, rejected]`` with the rejected tokens at positions
      p…p+r−1, so they attend to the prompt once computed (``models.attention``: only ``lorakit_packed`` reads
      this rule). The last prompt token predicts both completions' first tokens.

    The packed layouts carry ``input_ids``, ``attention_mask`` (counts only: 1 on the pairs' tokens, 0 on the
    padding span below; the model is given ``position_ids`` instead) and ``position_ids``, (1, N), and which
    positions score which token: ``score_index`` (M,) the position whose output predicts the token,
    ``score_targets`` (M,) the token, ``score_rows`` (M,) its sequence (pair i's chosen: i, its rejected: B + i).
    Every layout scores the same tokens; a pair with an empty prompt cannot score its completions' first
    token (nothing predicts it) in any of them.

    ``pad_to_multiple_of`` > 0 rounds the width up to a multiple of it: padded rows get more padding, a packed
    row ends with a span of ``pad_id`` tokens at positions 0, 1, … of its own, which attends only to itself and
    scores nothing. Fewer distinct widths mean fewer distinct tensor sizes, which on CPU is memory: glibc's
    malloc reuses a freed block only for a request that fits it, and oneDNN keeps a compiled matmul per shape.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"pair layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if pad_to_multiple_of < 0:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of}: expected 0 (no rounding) or a positive count")
    if layout != "padded":
        return _pack_pairs(pairs, layout == "shared", pad_id, pad_to_multiple_of)
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    masks = [[0] * len(p) + [1] * len(c) for p, c, _ in pairs] + [[0] * len(p) + [1] * len(r) for p, _, r in pairs]
    width = _round_up(max(len(s) for s in seqs), pad_to_multiple_of)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        comp[i, :len(m)] = torch.tensor(m)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple else n


def _pack_pairs(pairs: Sequence[tuple[list[int], list[int], list[int]]], share_prompt: bool, pad_id: int,
                multiple: int) -> dict[str, torch.Tensor]:
    """``collate_pairs``'s "packed" and "shared" layouts."""
    b = len(pairs)
    ids: list[int] = []
    pos: list[int] = []
    index: list[int] = []
    targets: list[int] = []
    rows: list[int] = []

    def score(first: int, tokens: list[int], row: int, after_prompt: int) -> None:
        """Completion ``tokens`` whose j-th token (j >= 1) is predicted at ``first + j - 1`` and whose first
        is predicted by the prompt's last token at ``after_prompt`` (none when the prompt is empty)."""
        at = [after_prompt] + list(range(first, first + len(tokens) - 1))
        keep = slice(0 if after_prompt >= 0 else 1, None)
        index.extend(at[keep])
        targets.extend(tokens[keep])
        rows.extend([row] * len(tokens[keep]))

    for i, (p, c, r) in enumerate(pairs):
        start, n = len(ids), len(p)
        last = start + n - 1 if n else -1
        ids.extend(p + c)
        pos.extend(range(n + len(c)))
        score(start + n, c, i, last)
        if share_prompt:
            at = len(ids)
            ids.extend(r)
            pos.extend(range(n, n + len(r)))
            score(at, r, b + i, last)
        else:
            at = len(ids)
            ids.extend(p + r)
            pos.extend(range(n + len(r)))
            score(at + n, r, b + i, at + n - 1 if n else -1)
    counts = torch.bincount(torch.tensor(rows, dtype=torch.long), minlength=2 * b)
    real, extra = len(ids), _round_up(len(ids), multiple) - len(ids)
    ids.extend([pad_id] * extra)
    pos.extend(range(extra))  # a span of its own: it restarts at 0, so nothing before it is seen
    attn = torch.ones((1, len(ids)), dtype=torch.long)
    attn[0, real:] = 0
    return {"input_ids": torch.tensor([ids]), "attention_mask": attn, "position_ids": torch.tensor([pos]), "score_index": torch.tensor(index), "score_targets":
            torch.tensor(targets), "score_rows": torch.tensor(rows), "completion_tokens": counts}


def pair_batch(pairs: PreferenceSet, rows: Sequence[int], pad_id: int, layout: str = "padded",
               pad_to_multiple_of: int = 0) -> dict[str, torch.Tensor]:
    """``collate_pairs`` of the pairs ``rows`` of a set, with their indices (``pair_index``, (B,))."""
    return {**collate_pairs([pairs.pairs[i] for i in rows], pad_id, layout, pad_to_multiple_of),
            "pair_index": torch.tensor(list(rows))}


def preference_batch(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int, layout: str = "padded",
                     pad_to_multiple_of: int = 0) -> dict[str, torch.Tensor]:
    """Tokenize preference rows (any of TRL's forms) into one batch: chosen rows first, then rejected.

    Row i's chosen sequence is batch row i, its rejected one row B + i; ``completion_mask`` marks the
    completion tokens whose log-probs ``lk.sequence_logps`` sums. ``layout="packed"`` or ``"shared"`` puts
    all the pairs in one row instead (``collate_pairs``; "shared" computes each prompt once and needs the
    model on lorakit's packed attention: ``lorakit.models.attention.packed_attention_for(model)``).

    Args:
        tokenizer: the model's tokenizer (its pad token, else eos, pads).
        rows: dicts with "chosen", "rejected" and optionally "prompt".
        max_length: most tokens of prompt + completion (completions cut from the right).
        layout: "padded", "packed" or "shared" (``collate_pairs``).
        pad_to_multiple_of: round the batch's width up to a multiple of this (0: no rounding; ``collate_pairs``).

    Returns:
        padded: ``{"input_ids", "attention_mask", "completion_mask"}``, each (2B, T) long; packed layouts:
        ``collate_pairs``'s keys.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate_pairs(tokenize_pairs(list(rows), tokenizer, max_length).pairs, pad, layout, pad_to_multiple_of)
