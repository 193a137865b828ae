"""The tensors of a transformers model directory, read one at a time from safetensors (sharded or not).

Analysis and extraction compare two checkpoints tensor by tensor, so neither needs both models in
memory, nor a model class: ``WeightDir`` maps each tensor name to its file and reads on demand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AdapterFormatError, ModelLoadError
from ..fileio import _check_header

INDEX_NAME = "model.safetensors.index.json"


def checkpoint_dir(spec: str | Path) -> Path:
    """The local safetensors directory of a model spec (a directory, a .gguf, or the embedded default).

    A GGUF spec is converted once and cached, as ``load_model`` does. Hub ids are refused: comparing
    checkpoints reads local files only.

    Args:
        spec: a transformers directory, a .gguf file, or ``smollm2-135m-instruct`` / ``default``.
    """
    from .load import _checkpoint_dir, _resolve

    source = _resolve(str(spec))
    if source.kind == "hub":
        raise ModelLoadError(f"{spec}: not a local path; analysis and extraction read local model directories "
                             "(config.json + *.safetensors), a .gguf file, or the embedded default")
    return _checkpoint_dir(source)


class WeightDir:
    """Tensor name → file of a model directory; tensors are read one at a time, as float32.

    Args:
        spec: a model spec that :func:`checkpoint_dir` accepts.
    """

    def __init__(self, spec: str | Path):
        self.path = checkpoint_dir(spec)
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        weight_map = self._index()
        shards = sorted(set(weight_map.values())) if weight_map else sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise ModelLoadError(f"{self.path}: no *.safetensors weights found")
        for shard in shards:
            self._read_header(shard, weight_map)
        absent = sorted(set(weight_map or {}) - set(self._files))
        if absent:
            raise ModelLoadError(f"{self.path / INDEX_NAME}: lists tensor {absent[0]!r} in "
                                 f"{weight_map[absent[0]].name}, which does not hold it")

    def _index(self) -> dict[str, Path] | None:
        """{tensor: shard} from model.safetensors.index.json, or None for an unsharded directory."""
        index = self.path / INDEX_NAME
        if not index.is_file():
            return None
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {str(key): self.path / str(name) for key, name in weight_map.items()}
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from None
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise ModelLoadError(f"{index}: lists shard {missing[0]}, which does not exist")
        return files

    def _read_header(self, shard: Path, weight_map: dict[str, Path] | None) -> None:
        try:
            _check_header(shard)
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if weight_map is None or weight_map.get(key) == shard:
                        self._files[key] = shard
                        self._shapes[key] = tuple(f.get_slice(key).get_shape())
        except AdapterFormatError as exc:
            raise ModelLoadError(str(exc)) from None
        except Exception as exc:  # safetensors' own error types: all mean "bad file"
            raise ModelLoadError(f"{shard}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None

    def keys(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape}, read from the headers only."""
        return dict(self._shapes)

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as float32 (KeyError naming the directory when it has none)."""
        if key not in self._shapes:
            raise ModelLoadError(f"{self.path}: has no tensor {key!r}")
        with safe_open(str(self._files[key]), framework="pt", device="cpu") as f:
            return f.get_tensor(key).float()


def paired_keys(base: WeightDir, tuned: WeightDir) -> list[str]:
    """The tensor names of two checkpoints of one architecture, sorted.

    Args:
        base: the base checkpoint.
        tuned: the fine-tuned checkpoint.

    Raises:
        ModelLoadError: naming the first tensor (in sorted order) that one lacks or whose shapes differ.
    """
    ours, theirs = base.shapes, tuned.shapes
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            raise ModelLoadError(f"base {base.path} and tuned {tuned.path} are not the same architecture: first "
                                 f"differing tensor {key!r} has shape {_show(ours.get(key))} in base and "
                                 f"{_show(theirs.get(key))} in tuned")
    return sorted(ours)


def _show(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(tuple(shape))
