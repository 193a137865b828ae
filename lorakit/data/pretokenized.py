"""Pre-tokenized rows: token ids and any other numeric columns, trained on as they are (no tokenizer).

A row holds ``input_ids`` (ints) and optionally ``labels`` (ints, -100 where no loss is taken, the
shape of ``input_ids``), ``attention_mask`` (0/1 over the time axis) and any other numeric columns
(speaker ids, durations, codec codes, float features). A model with its own loss may name its
columns freely (``text_ids``, ``speech_ids``): a row without ``input_ids`` is pre-tokenized too when
it has no key of a text format and holds a list of numbers. Each column of a row is

- 1-D ``(T,)``: one stream over time,
- 2-D ``(S, T)``: S streams (codebooks) over time, the time axis last, or
- 0-D: one number per row (a length, a speaker id).

A column keeps its number of dimensions and streams in every row; its time length may differ from
row to row and from the other columns'. Columns that are not numeric (an utterance id, the source
text) are left out and named in the start-of-run report.

Files: JSONL (core install), Parquet / JSON / ``datasets`` ``save_to_disk`` directories (the
``datasets`` extra), or a NumPy ``.npz`` archive (read with ``allow_pickle=False``) laid out as

- ``lengths``: int ``(n,)``, the time length of row i in every sequence column;
- ``<column>``: the rows concatenated along time: ``(sum(lengths),)`` or ``(S, sum(lengths))``;
- ``lengths.<column>``: optional, that column's own time lengths when they differ from ``lengths``;
- ``row.<column>``: ``(n,)``, one number per row.

A ``.npy`` file is refused: one array cannot hold rows of different lengths except as an object
array, which NumPy stores as a pickle (loading one can run code).

Collation (``collate_rows``) right-pads each column's time axis to the longest in the batch:
``input_ids`` with the pad id, ``labels`` with -100, ``attention_mask`` with 0, any other column with
its ``--pad-value COLUMN=V`` (0 by default). Without an ``attention_mask`` column one is made from
``input_ids``' lengths. Integers become int64 tensors, floats float32, booleans bool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .formats import FORMAT_KEYS
from .readers import TABLE_SUFFIXES, _parse_jsonl, _read_bytes, _read_table
from .tokenize import IGNORE_INDEX, DataStats

TOKENS = "input_ids"
TIME_ALIGNED = ("labels", "attention_mask")  # must share input_ids' time length


def looks_pretokenized(row: Any) -> bool:
    """Whether a record is a pre-tokenized row: a mapping whose ``input_ids`` is a list (or array), or
    one with no key of a text format (``text``, ``prompt``, ``messages`` ...) that holds a list of numbers."""
    if not isinstance(row, dict):
        return False
    if TOKENS in row:
        return _is_sequence(row[TOKENS])
    return not any(row.get(k) is not None for k in FORMAT_KEYS) and any(_is_sequence(v) for v in row.values())


def _is_sequence(value: Any) -> bool:
    arr = _numeric(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    return arr is not None and arr.ndim >= 1 and arr.size > 0


def is_pretokenized(path: str | os.PathLike) -> bool:
    """Whether a data file holds pre-tokenized rows (read from its first row, or its schema).

    Args:
        path: a ``.jsonl`` / ``.npz`` file, a table file or a ``save_to_disk`` directory.
    """
    path = Path(path)
    if path.suffix.lower() in (".npz", ".npy"):
        return True
    if path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES:
        if path.suffix.lower() == ".csv" or not path.exists():
            return False
        table = _read_table(path)
        return TOKENS in table.column_names or (len(table) > 0 and looks_pretokenized(table[0]))
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    return looks_pretokenized(json.loads(line.lstrip(b"\xef\xbb\xbf")))
    except (OSError, ValueError):
        return False  # the ordinary reader reports the problem with its file:line
    return False


class TokenRows:
    """A file's validated pre-tokenized rows (each a dict of NumPy arrays) and the columns left out.

    Args:
        path: the file read (or a label such as ``<rows>`` for rows handed over in memory).
        rows: the rows, numeric columns only.
        lines: the file line of each row (JSONL), or None when rows are numbered from 1.
        skipped: non-numeric columns left out.
    """

    def __init__(self, path: Path | str, rows: list[dict[str, np.ndarray]], lines: list[int] | None = None,
                 skipped: list[str] | None = None) -> None:
        self.path, self.rows, self.lines, self.skipped = path, rows, lines, skipped or []

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}" if self.lines is not None else f"{self.path}:row {i + 1}"

    def describe(self) -> str:
        """``"pre-tokenized, 1,000 rows: input_ids (8 × time), labels (8 × time), spk (one per row)"``."""
        first = self.rows[0]
        shapes = ", ".join(f"{k} ({_shape_words(v)})" for k, v in first.items())
        left = f"; left out (not numeric): {', '.join(self.skipped)}" if self.skipped else ""
        return f"pre-tokenized, {len(self):,} rows: {shapes}{left}"

    def to_dataset(self, max_seq_len: int, pad_values: dict[str, float] | None = None) -> TokenRowDataset:
        """The rows cut to ``max_seq_len`` steps of time, as a dataset the batch sources draw from."""
        return TokenRowDataset(self.rows, max_seq_len, pad_values or {})


def read_token_rows(source: str | os.PathLike | list[dict[str, Any]]) -> TokenRows:
    """Read and validate pre-tokenized rows (cheap: call it before loading a model).

    Args:
        source: a ``.jsonl`` file, a ``.npz`` archive (layout in the module docstring), a Parquet/JSON
            file or a ``save_to_disk`` directory (``datasets`` extra), or a list of row dicts.

    Raises:
        DataError: naming ``file:line`` / ``file:row`` and the column, for a row that is not numeric,
            has the wrong shape or disagrees with the first row; for a ``.npy`` file or a pickled array.
    """
    if isinstance(source, list):
        return _validate("<rows>", source, None)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        raise DataError(f"{path}: a .npy file holds one array, and rows of different lengths only as an object "
                        "array, which NumPy stores as a pickle (loading it could run code); save the columns "
                        "with numpy.savez as laid out in docs/custom-models.md (lengths + one array per column)")
    if suffix == ".npz":
        return _validate(path, _npz_rows(path), None)
    if path.is_dir() or suffix in TABLE_SUFFIXES:
        table = _read_table(path)
        if len(table) == 0:
            raise DataError(f"{path} contains no examples")
        rows = [dict(zip(chunk, values, strict=True)) for start in range(0, len(table), 1000)
                for chunk in [table[start:start + 1000]] for values in zip(*chunk.values(), strict=True)]
        return _validate(path, rows, None)
    rows, lines = _parse_jsonl(path, _read_bytes(path))
    return _validate(path, rows, lines)


def _npz_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an .npz archive laid out as the module docstring says."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:  # an object array: NumPy refuses to unpickle it
        raise DataError(f"{path}: {exc}; store numeric arrays only (the .npz layout in docs/custom-models.md)") \
            from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as .npz ({exc})") from None
    if "lengths" not in arrays:
        raise DataError(f"{path}: no 'lengths' array; an .npz of rows holds 'lengths' (each row's time length) and "
                        f"one array per column concatenated along time (found {sorted(arrays)})")
    lengths = _lengths(path, "lengths", arrays.pop("lengths"))
    own = {k.removeprefix("lengths."): _lengths(path, k, arrays.pop(k)) for k in list(arrays)
           if k.startswith("lengths.")}
    n = len(lengths)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for name, arr in arrays.items():
        if name.startswith("row."):
            if arr.shape != (n,):
                raise DataError(f"{path}: array {name!r} has shape {arr.shape}; one number per row is ({n},)")
            for i in range(n):
                rows[i][name.removeprefix("row.")] = arr[i]
            continue
        steps = own.get(name, lengths)
        if arr.ndim not in (1, 2) or arr.shape[-1] != int(steps.sum()) or len(steps) != n:
            raise DataError(f"{path}: array {name!r} has shape {arr.shape}; its rows concatenated along time are "
                            f"(sum of lengths,) or (streams, sum of lengths) = (…, {int(steps.sum())}) for {n} rows")
        for i, part in enumerate(np.split(arr, np.cumsum(steps)[:-1], axis=-1)):
            rows[i][name] = part
    for name in own:
        if name not in arrays:
            raise DataError(f"{path}: 'lengths.{name}' names no column (columns: {sorted(arrays)})")
    return rows


def _lengths(path: Path, name: str, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or (arr < 0).any():
        raise DataError(f"{path}: {name!r} must be a 1-D array of non-negative ints, found {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _validate(path: Path | str, raw: list[Any], lines: list[int] | None) -> TokenRows:
    """Each row's numeric columns as arrays, checked against the rules and the first row."""
    out = TokenRows(path, [], lines)
    if not raw:
        raise DataError(f"{path} contains no examples")
    schema: dict[str, tuple[int, tuple[int, ...], str]] = {}  # column -> (ndim, streams, kind) of row 1
    for i, row in enumerate(raw):
        where = out.where(i)
        if not looks_pretokenized(row):
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: expected a pre-tokenized row (an 'input_ids' list, or numeric columns and no "
                            f"text-format key), as the rows before it (found {found})")
        arrays = {}
        for name, value in row.items():
            arr = _numeric(value)
            if arr is None:
                if i == 0:
                    out.skipped.append(name)
                elif name in schema:
                    raise DataError(f"{where}: column {name!r} is not numeric here ({_kind_of(value)}), but it is in "
                                    "the first row")
                continue
            if i > 0 and name not in schema and name not in out.skipped:
                raise DataError(f"{where}: column {name!r} is not in the first row; every row needs the same columns")
            if name in out.skipped:
                continue
            arrays[name] = arr
        if i == 0:
            schema = {k: (a.ndim, a.shape[:-1], a.dtype.kind) for k, a in arrays.items()}
        _check_row(arrays, schema, where)
        out.rows.append(arrays)
    return out


def _numeric(value: Any) -> np.ndarray | None:
    """The value as a numeric array, or None when it is not numeric (text, nulls, ragged lists)."""
    if value is None or isinstance(value, (str, bytes, dict)):
        return None
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged nested lists
        return None
    return arr if arr.dtype.kind in "biuf" else None


def _check_row(arrays: dict[str, np.ndarray], schema: dict, where: str) -> None:
    missing = sorted(set(schema) - set(arrays))
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} that the first row has (or not numeric here)")
    for name, arr in arrays.items():
        ndim, streams, kind = schema[name]
        if arr.ndim > 2:
            raise DataError(f"{where}: column {name!r} has {arr.ndim} dimensions {arr.shape}; a column is one number "
                            "per row, a (time,) stream or (streams, time)")
        if (arr.ndim, arr.shape[:-1]) != (ndim, streams) or (kind == "f") != (arr.dtype.kind == "f"):
            raise DataError(f"{where}: column {name!r} is {_shape_words(arr)} {arr.dtype.name}, but "
                            f"{'(' + ' × '.join([*map(str, streams), 'time']) + ')' if ndim else 'one number'} "
                            f"{'float' if kind == 'f' else 'int'} in the first row")
        if arr.ndim and arr.shape[-1] == 0:
            raise DataError(f"{where}: column {name!r} is empty (0 steps of time)")
    if not any(a.ndim for a in arrays.values()):
        raise DataError(f"{where}: no column is a sequence (time,) or (streams, time); found one number per "
                        f"column: {sorted(arrays)}")
    ids = arrays.get(TOKENS)
    if ids is None:
        return
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or (ids < 0).any():
        raise DataError(f"{where}: 'input_ids' must be non-negative ints, (time,) or (streams, time); found "
                        f"{ids.dtype.name} {ids.shape}")
    if "labels" in arrays and (arrays["labels"].shape != ids.shape or arrays["labels"].dtype.kind not in "iu"):
        raise DataError(f"{where}: 'labels' must be ints shaped like input_ids {ids.shape} (-100 where no loss is "
                        f"taken), found {arrays['labels'].dtype.name} {arrays['labels'].shape}")
    if "attention_mask" in arrays:
        mask = arrays["attention_mask"]
        if mask.shape != ids.shape[-1:] or not np.isin(mask, (0, 1)).all():
            raise DataError(f"{where}: 'attention_mask' must be 0/1 over input_ids' {ids.shape[-1]} steps of time, "
                            f"found {mask.shape}")


def _shape_words(arr: np.ndarray) -> str:
    return "one per row" if arr.ndim == 0 else "time" if arr.ndim == 1 else f"{arr.shape[0]} × time"


def _kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class TokenRow(dict):
    """One row of a ``TokenRowDataset``: ``{column: array}``, with the dataset's pad values (``pad``)."""

    pad: dict[str, float]


class TokenRowDataset:
    """Pre-tokenized rows cut to ``max_seq_len`` steps; indexable like a list of ``TokenRow``.

    Args:
        rows: validated rows (``TokenRows.rows``).
        max_seq_len: every column's time axis keeps its first max_seq_len steps.
        pad_values: ``{column: value}`` written into the padding (``--pad-value``).
    """

    def __init__(self, rows: list[dict[str, np.ndarray]], max_seq_len: int, pad_values: dict[str, float]) -> None:
        self.pad_values = check_pad_values(pad_values, rows[0])
        self.rows = [{k: (v[..., :max_seq_len] if v.ndim else v) for k, v in r.items()} for r in rows]
        cut = sum(any(v.ndim and v.shape[-1] > max_seq_len for v in r.values()) for r in rows)
        self.lengths = np.asarray([max(v.shape[-1] for v in r.values() if v.ndim) for r in self.rows], dtype=np.int64)
        tokens = sum(r[TOKENS].shape[-1] for r in self.rows) if TOKENS in self.rows[0] else int(self.lengths.sum())
        self.stats = DataStats(n_examples=len(rows), n_truncated=cut, n_dropped=0, n_tokens=tokens,
                               n_trainable_tokens=sum(_trainable(r) for r in self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> TokenRow:
        row = TokenRow(self.rows[index])
        row.pad = self.pad_values
        return row


def _trainable(row: dict[str, np.ndarray]) -> int:
    """Steps of time that carry a label after the causal shift (a step counts once, whatever its streams)."""
    if "labels" in row:
        labelled = (row["labels"] != IGNORE_INDEX).reshape(-1, row["labels"].shape[-1]).any(axis=0)
    elif "attention_mask" in row:
        labelled = row["attention_mask"].astype(bool)
    else:
        labelled = np.ones(max(v.shape[-1] for v in row.values() if v.ndim), dtype=bool)
    return int(labelled[1:].sum())


def parse_pad_values(specs: list[str] | None) -> dict[str, float]:
    """``["mel=-4", "input_ids=0"]`` → ``{"mel": -4, "input_ids": 0}`` (ints stay ints).

    Args:
        specs: ``COLUMN=VALUE`` pairs.
    """
    out: dict[str, float] = {}
    for spec in specs or []:
        name, sep, value = str(spec).partition("=")
        name, value = name.strip(), value.strip()
        try:
            number = float(value) if sep and name else None
        except ValueError:
            number = None
        if number is None:
            raise ConfigError(f"--pad-value {spec!r}: expected COLUMN=NUMBER, e.g. input_ids=0 or mel=-4.0")
        if name in out:
            raise ConfigError(f"--pad-value sets {name!r} twice")
        out[name] = int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return out


def check_pad_values(pad_values: dict[str, float], first: dict[str, np.ndarray]) -> dict[str, float]:
    """The pad values, each naming a sequence column of the rows; an int column takes only a whole number."""
    for name, value in pad_values.items():
        if name not in first or first[name].ndim == 0:
            raise ConfigError(f"--pad-value {name}={value}: the rows have no sequence column {name!r} (columns: "
                              f"{', '.join(k for k, v in first.items() if v.ndim)})")
        if first[name].dtype.kind != "f" and not float(value).is_integer():
            raise ConfigError(f"--pad-value {name}={value}: column {name!r} holds ints; give a whole number")
    return dict(pad_values)


def collate_rows(rows: list[TokenRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad each column's time axis to the batch's longest (see the module docstring for the values).

    Args:
        rows: the batch (from one ``TokenRowDataset``).
        pad_id: written into the padding of ``input_ids`` unless ``--pad-value input_ids=V`` says otherwise.

    Returns:
        ``{column: tensor}``: (B,) for one number per row, (B, T) for streams, (B, S, T) for S streams, and
        (with input_ids) ``attention_mask`` (B, T) over input_ids' steps.
    """
    if not rows:
        raise DataError("collate: the batch is empty")
    defaults = {TOKENS: pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out = {}
    for name, first in rows[0].items():
        arrays = [r[name] for r in rows]
        dtype = np.float32 if first.dtype.kind == "f" else bool if first.dtype.kind == "b" else np.int64
        if first.ndim == 0:
            out[name] = torch.from_numpy(np.asarray(arrays, dtype=dtype))
            continue
        width = max(a.shape[-1] for a in arrays)
        buf = np.full((len(rows), *first.shape[:-1], width), rows[0].pad.get(name, defaults.get(name, 0)),
                      dtype=dtype)
        for i, a in enumerate(arrays):
            buf[i, ..., :a.shape[-1]] = a
        out[name] = torch.from_numpy(buf)
    if "attention_mask" not in out and TOKENS in out:
        steps = torch.tensor([r[TOKENS].shape[-1] for r in rows])
        out["attention_mask"] = (torch.arange(out[TOKENS].shape[-1]) < steps[:, None]).long()
    return out
