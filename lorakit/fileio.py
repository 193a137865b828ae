"""Files written so that nothing is half-written, weights read only from safetensors, and the one place
lorakit keeps its caches."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import AdapterFormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def cache_root() -> Path:
    """The root of every lorakit cache (the converted embedded model under ``models/``, tokenized sets
    under ``tokenized/``), first set of: ``$LORAKIT_CACHE``, ``$LORAKIT_HOME`` (its older name),
    ``$XDG_CACHE_HOME/lorakit``, ``~/.cache/lorakit``. An empty variable counts as unset, and so does a
    relative ``XDG_CACHE_HOME`` (the XDG base directory spec says to ignore it)."""
    for name in ("LORAKIT_CACHE", "LORAKIT_HOME"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "lorakit"
    return Path.home() / ".cache" / "lorakit"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it into place.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _publish(tmp: str, path: Path) -> None:
    """Give the temp file the permissions a plain open() would (mkstemp makes it 0600), then rename."""
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Serialise ``tensors`` (made contiguous, on CPU) to ``path`` atomically.

    Written straight to a temp file (not built in memory first), so saving a full model's
    checkpoint does not briefly double the process's memory.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raise if ``path`` names a pickle-based weight file."""
    if str(path).endswith(PICKLE_SUFFIXES):
        raise AdapterFormatError(
            f"{path}: refusing a pickle-based file ({Path(path).suffix}). Unpickling runs arbitrary code, so "
            "lorakit reads weights only from .safetensors. Convert it where you trust it, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file, or raise AdapterFormatError.

    Any parse failure (truncated file, bad header, offsets past the end, unknown dtype) becomes
    one AdapterFormatError naming the file. Only floating-point tensors are accepted.
    """
    refuse_pickle(path)
    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types and OSError; all mean "bad file"
        raise AdapterFormatError(f"{path}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    for key, tensor in tensors.items():
        if tensor.dtype not in _FLOAT_DTYPES:
            raise AdapterFormatError(f"{path}: tensor {key!r} has dtype {tensor.dtype}; LoRA weights must be "
                                     "float32, float16 or bfloat16")
    return tensors, metadata


def _check_header(path: Path) -> None:
    """Reject a header whose claimed length cannot fit in the file before any parsing."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise AdapterFormatError(f"{path}: file is {size} bytes, too short for a safetensors header")
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > 100_000_000:
        raise AdapterFormatError(f"{path}: header claims {n} bytes but the file has {size - 8} after the "
                                 "length field; the file is truncated or corrupt")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished ``src`` to ``dst``; an old ``dst`` is removed only after the move succeeds."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
