"""Reading dataset files into validated records, with ``file:line`` (or ``file:row``) errors.

JSONL is read here with the core install. JSON, CSV, Parquet and directories written by
``datasets.Dataset.save_to_disk`` are read through the ``datasets`` library (Arrow,
memory-mapped), an optional extra: ``pip install 'lorakit[data]'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from .formats import FORMAT_NAMES, rename_columns, to_canonical, validate_record

TABLE_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
DATASETS_INSTALL = "pip install 'lorakit[data]'"
# a \\uXXXX escape of a UTF-16 surrogate: paired it is one character, alone it is no text a tokenizer takes
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class Records:
    """A dataset file's validated records, converted on access to text, prompt/completion or messages.

    Args:
        path: the file (or ``save_to_disk`` directory) read.
        rows: the records as read (a list of dicts, or a ``datasets.Dataset``), columns already mapped
            for lists; ``columns`` is applied on access for a Dataset.
        formats: how many rows each format has (format names as in ``formats.FORMAT_NAMES``).
        digest: sha256 of the file's bytes and the column mapping (the token cache's data key).
        lines: the file line of each row (JSONL), or None when rows are numbered from 1.
        columns: the ``--columns`` mapping.
    """

    def __init__(self, path: Path, rows: Any, formats: Counter, digest: str, lines: list[int] | None = None,
                 columns: dict[str, str] | None = None) -> None:
        self.path, self.rows, self.formats, self.digest = path, rows, formats, digest
        self.lines, self.columns = lines, columns or {}

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """``file:line`` (JSONL) or ``file:row N`` of row i (from 0)."""
        return f"{self.path}:{self.lines[i]}" if self.lines is not None else f"{self.path}:row {i + 1}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _, chunk in self.chunks(1000):
            yield from chunk

    def chunks(self, size: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(index of the first row, canonical records) in file order, ``size`` rows at a time."""
        for start, raw in self.raw_chunks(size):
            yield start, [to_canonical(r, validate_record(r, self.where(start + j))) for j, r in enumerate(raw)]

    def raw_chunks(self, size: int) -> Iterator[tuple[int, list[Any]]]:
        """(index of the first row, rows as read with columns mapped), ``size`` rows at a time."""
        for start in range(0, len(self.rows), size):
            if isinstance(self.rows, list):
                yield start, self.rows[start:start + size]
                continue
            cols = self.rows[start:start + size]  # a datasets.Dataset: one columnar read per chunk
            yield start, [rename_columns(dict(zip(cols, values, strict=True)), self.columns, self.where(start + j))
                          for j, values in enumerate(zip(*cols.values(), strict=True))]

    def describe(self) -> str:
        """``"alpaca, 1,000 rows"`` (or the count of each format when a file mixes them)."""
        kinds = ", ".join(f"{FORMAT_NAMES[f]} {n:,}" for f, n in self.formats.most_common())
        if len(self.formats) == 1:
            return f"{FORMAT_NAMES[next(iter(self.formats))]}, {len(self):,} rows"
        return f"{kinds} rows"


def read_records(path: str | os.PathLike, columns: dict[str, str] | None = None,
                 validate: Callable[[Any, str], str] = validate_record) -> Records:
    """Read and validate a dataset without tokenizing it (cheap: call it before loading a model).

    Args:
        path: a ``.jsonl`` file (core install), or ``.json``, ``.csv``, ``.parquet`` or a
            ``save_to_disk`` directory (``datasets`` extra).
        columns: ``{field: column}`` from ``formats.parse_columns``.
        validate: ``fn(row, where) -> format name``, raising DataError on a bad row (default: the
            training formats; preference pairs pass their own and read rows with ``raw_chunks``).

    Raises:
        DataError: naming ``file:line`` / ``file:row`` and what was expected, if the file has no
            examples, or (with the install command) when ``datasets`` is needed and missing.
    """
    path, columns = Path(path), columns or {}
    if not path.is_dir() and path.suffix.lower() not in TABLE_SUFFIXES:
        raw = _read_bytes(path)
        rows, lines = _parse_jsonl(path, raw)
        rows = [rename_columns(r, columns, f"{path}:{n}") for r, n in zip(rows, lines, strict=True)]
        formats = Counter(validate(r, f"{path}:{n}") for r, n in zip(rows, lines, strict=True))
        return Records(path, rows, formats, _digest([raw], columns), lines)
    table = _read_table(path)
    if len(table) == 0:
        raise DataError(f"{path} contains no examples")
    records = Records(path, table, Counter(), _digest(_file_chunks(path), columns), columns=columns)
    for start, chunk in records.raw_chunks(1000):
        for j, row in enumerate(chunk):
            records.formats[validate(row, records.where(start + j))] += 1
    return records


def _read_table(path: Path) -> Any:
    """A ``datasets.Dataset`` (Arrow, memory-mapped) of a JSON/CSV/Parquet file or a save_to_disk dir."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading {'a datasets directory' if path.is_dir() else path.suffix + ' files'} "
                        f"needs the datasets library: {DATASETS_INSTALL} (JSONL needs nothing extra)") from None
    datasets.disable_progress_bars()
    if not path.exists():
        raise DataError(f"{path}: cannot read dataset (no such file or directory)")
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            reader = getattr(datasets.Dataset, f"from_{TABLE_SUFFIXES[path.suffix.lower()]}")
            ds = reader(str(path))
    except Exception as exc:  # datasets and pyarrow raise many types for a malformed file
        kind = "a datasets directory" if path.is_dir() else path.suffix.lower().lstrip(".").upper()
        raise DataError(f"{path}: cannot read as {kind} ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path} holds the splits {sorted(ds)}; pass one split's directory, e.g. "
                        f"{path / sorted(ds)[0]}")
    return ds


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read dataset ({exc.strerror or exc})") from None


def _file_chunks(path: Path) -> Iterator[bytes]:
    """The bytes of a file, or of every file under a directory (with their relative names), in order."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        yield str(file.relative_to(path)).encode() if path.is_dir() else b""
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                yield block


def _digest(chunks, columns: dict[str, str]) -> str:
    h = hashlib.sha256(json.dumps(sorted(columns.items())).encode())
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _parse_jsonl(path: Path, raw: bytes) -> tuple[list[Any], list[int]]:
    rows, lines = [], []
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
            rows.append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); expected one JSON "
                            "object per line") from None
        if SURROGATE_ESCAPE.search(text):
            _no_lone_surrogate(rows[-1], where)
        lines.append(lineno)
    if not rows:
        raise DataError(f"{path} contains no examples (expected one JSON object per line)")
    return rows, lines


def _no_lone_surrogate(row: Any, where: str) -> None:
    """JSON lets a string escape half of a surrogate pair (``"\\ud800"``); Python reads it as a string no
    UTF-8 encoder (and no tokenizer) accepts, so it is refused here, by line, like a byte that is not UTF-8."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        half = ord(exc.object[exc.start])
        raise DataError(f"{where}: not valid Unicode (an unpaired surrogate \\u{half:04x}); escape a character "
                        "outside the BMP as a pair (\\ud83d\\ude00) or write it as UTF-8") from None


def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate a JSONL dataset: the records as written (extra keys included), in file order.

    Args:
        path: a UTF-8 file with one JSON object per line; blank lines are skipped.

    Raises:
        DataError: naming ``file:line`` and what was expected, or if the file has no examples.
    """
    path = Path(path)
    rows, lines = _parse_jsonl(path, _read_bytes(path))
    for row, n in zip(rows, lines, strict=True):
        validate_record(row, f"{path}:{n}")
    return rows
