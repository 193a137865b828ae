"""The tokenized-set cache: a second run with the same data, tokenizer, chat template, format and
max_seq_len starts without tokenizing.

A set is a directory ``<cache>/<key>/`` holding ``ids.npy``, ``mask.npy``, ``offsets.npy`` and
``meta.json`` (the key's inputs, the stats, each array file's sha256). It is written under a
temporary name and renamed into place, read back memory-mapped, and trusted only when every
file's hash matches: a corrupt or stale entry is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import cache_root, replace_dir
from .readers import Records
from .tokenize import DataStats, TokenizedDataset, tokenize_examples

CACHE_VERSION = 1  # bump when tokenization changes what it makes of the same inputs
ARRAYS = ("ids", "mask", "offsets")


def default_cache_dir() -> Path:
    """``tokenized/`` under the root of lorakit's caches (``lorakit.fileio.cache_root``)."""
    return cache_root() / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's output: its full definition (vocabulary, merges, normalizer,
    pre- and post-processors) and its special tokens. The chat template is keyed separately."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps([specials, tokenizer.eos_token_id, tokenizer.bos_token_id]).encode())
    return h.hexdigest()


def cache_inputs(records: Records, tokenizer: Any, max_seq_len: int) -> dict[str, Any]:
    """Everything the tokenized set depends on."""
    template = getattr(tokenizer, "chat_template", None)
    return {"version": CACHE_VERSION, "data": records.digest, "formats": sorted(records.formats),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "chat_template": hashlib.sha256(str(template).encode()).hexdigest(), "max_seq_len": max_seq_len}


def cached_tokenize(records: Records, tokenizer: Any, max_seq_len: int, cache_dir: str | os.PathLike | None,
                    num_proc: int = 1, progress: bool = False) -> tuple[TokenizedDataset, str]:
    """The tokenized set of ``records``, from the cache when a valid entry exists, else built and stored.

    Args:
        records: from ``readers.read_records``.
        tokenizer, max_seq_len, num_proc, progress: as for ``tokenize.tokenize_examples``.
        cache_dir: the cache directory, or None to tokenize without caching.

    Returns:
        The set, and what happened: ``"hit"``, ``"built"``, ``"rebuilt (<why>)"`` or ``"off"``.
    """
    if cache_dir is None:
        return tokenize_examples(records, tokenizer, max_seq_len, num_proc=num_proc, progress=progress), "off"
    inputs = cache_inputs(records, tokenizer, max_seq_len)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    entry = Path(cache_dir) / key
    why = None
    if entry.exists():
        try:
            return _read(entry, inputs), "hit"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = str(exc)
    ds = tokenize_examples(records, tokenizer, max_seq_len, num_proc=num_proc, progress=progress)
    _write(entry, inputs, ds)
    return ds, "built" if why is None else f"rebuilt ({why})"


def _read(entry: Path, inputs: dict[str, Any]) -> TokenizedDataset:
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    if meta["inputs"] != inputs:
        raise ValueError("its key inputs differ from this run's")
    arrays = {}
    for name in ARRAYS:
        path = entry / f"{name}.npy"
        if _sha256(path) != meta["files"][name]:
            raise ValueError(f"{path.name} does not match its recorded hash")
        arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
    n = len(arrays["offsets"]) - 1
    if len(arrays["ids"]) != len(arrays["mask"]) or n != meta["stats"]["n_examples"] or \
            int(arrays["offsets"][-1]) != len(arrays["ids"]):
        raise ValueError("its arrays disagree in length")
    return TokenizedDataset(arrays["ids"], arrays["mask"], arrays["offsets"], DataStats(**meta["stats"]))


def _write(entry: Path, inputs: dict[str, Any], ds: TokenizedDataset) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        files = {}
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(ds, name)), allow_pickle=False)
            files[name] = _sha256(tmp / f"{name}.npy")
        meta = {"inputs": inputs, "stats": vars(ds.stats), "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        replace_dir(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
