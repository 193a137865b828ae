"""What lorakit knows of llama.cpp's GGUF layout: architectures, tensor names, the q/k row order, types.

llama.cpp names tensors by role (``blk.0.attn_q.weight``); the ``gguf`` package's tensor-name map
gives the role of a transformers module path. A GGUF tensor's ``ne`` is the reverse of the numpy
shape, so a torch weight (out, in) is written as it is (``ne = [in, out]``). llama.cpp's converter
reorders the rows of Llama-family q/k weights (its RoPE pairs neighbouring dimensions where
transformers pairs halves): :func:`permute_rows` is that reorder, :func:`unpermute_rows` its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, LorakitError
from ..fileio import atomic_write

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
INSTALL_GGUF = "pip install 'gguf>=0.10'"


class GgufExportError(LorakitError):
    """An adapter or model cannot be written as GGUF the way llama.cpp reads it."""


@dataclass(frozen=True)
class Arch:
    """A transformers model type as llama.cpp runs it."""

    model_type: str  # transformers' config.model_type
    name: str  # general.architecture in the GGUF file
    permute_qk: bool  # llama.cpp's converter reorders q/k rows for this family


# The families whose GGUF layout lorakit writes and tests. Mistral runs as "llama" in llama.cpp.
_ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False)}


def gguf_module():
    """The ``gguf`` package (a core dependency), imported on first use."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - a broken install
        raise GgufExportError(f"the gguf package is missing; install it with: {INSTALL_GGUF}") from exc
    return gguf


def arch_of(config) -> Arch:
    """The GGUF architecture of a transformers config, or a GgufExportError listing the supported ones."""
    gguf = gguf_module()
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise GgufExportError(f"model type {model_type!r} is not one lorakit writes as GGUF (supported: "
                              f"{', '.join(sorted(_ARCHS))}); for other models merge with `lorakit merge` and "
                              "convert the merged directory with llama.cpp's convert_hf_to_gguf.py")
    key, permute = _ARCHS[model_type]
    return Arch(model_type, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, key)], permute)


class TensorNames:
    """transformers parameter name → GGUF tensor name, via gguf's tensor-name map for one architecture."""

    def __init__(self, arch: Arch, n_layers: int):
        gguf = gguf_module()
        enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
        self._map = gguf.get_tensor_name_map(enum, n_layers)

    def module(self, path: str) -> str | None:
        """``model.layers.0.self_attn.q_proj`` → ``blk.0.attn_q`` (None when llama.cpp has no such tensor)."""
        return self._map.get_name(path)

    def param(self, name: str) -> str | None:
        """``model.layers.0.self_attn.q_proj.weight`` → ``blk.0.attn_q.weight``."""
        path, _, suffix = name.rpartition(".")
        base = self.module(path)
        return None if base is None else f"{base}.{suffix}"


def head_counts(config) -> tuple[int, int]:
    """(attention heads, key/value heads) of a config."""
    n_head = config.num_attention_heads
    return n_head, getattr(config, "num_key_value_heads", None) or n_head


def qk_heads(gguf_name: str, config, arch: Arch) -> int | None:
    """The head count llama.cpp's converter permutes ``gguf_name``'s rows by, or None when it does not."""
    if not arch.permute_qk:
        return None
    n_head, n_kv = head_counts(config)
    if ".attn_q." in gguf_name:
        return n_head
    if ".attn_k." in gguf_name:
        return n_kv
    return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, rows (i, i + d/2) become neighbours (2i, 2i + 1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows` (transformers' GGUF loader applies it)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    return outtype


def encode(t: torch.Tensor, outtype: str):
    """``t`` as GGUF data: (numpy array, GGMLQuantizationType).

    Vectors stay f32 (llama.cpp's norms and biases are f32); q8_0 needs rows of a multiple of 32
    values, and a tensor whose rows are not falls back to f16, as llama.cpp's converter does.
    """
    gguf = gguf_module()
    q = gguf.GGMLQuantizationType
    data = t.detach().float().contiguous().cpu().numpy()
    if data.ndim < 2 or outtype == "f32":
        return data, q.F32
    if outtype == "bf16":
        return gguf.quants.quantize(data, q.BF16), q.BF16
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, q.Q8_0), q.Q8_0
    return data.astype(np.float16), q.F16


def file_type(outtype: str) -> int:
    """general.file_type for a file whose 2-D tensors are mostly ``outtype``."""
    ft = gguf_module().LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[outtype]


def check_out_path(path: str | Path) -> Path:
    """Refuse an output path that is not a ``.gguf`` file name (checked before any work is done)."""
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise ConfigError(f"{path}: a GGUF output file name must end in .gguf")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; pass a file name ending in .gguf")
    return path


def write_file(path: str | Path, arch_name: str, fill, alignment: int | None = None) -> None:
    """Write a GGUF file atomically: ``fill(writer)`` adds keys and tensors, then it is written and renamed.

    Each tensor goes to a spooled temporary file as it is added (so only one is in memory at a time), then
    the header and the tensors are written out.
    """
    gguf = gguf_module()
    path = check_out_path(path)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch_name, use_temp_file=True)
        if alignment is not None:
            writer.data_alignment = alignment
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)
