"""Reading dataset files into records, with ``file:line`` errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from .formats import validate_record


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
