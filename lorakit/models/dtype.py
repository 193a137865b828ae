"""Dtype names, and what ``auto`` means, for every verb that loads or plans a model.

One parser (:func:`parse_dtype`) serves train, plan, merge, serve, eval and generate, so a short
name such as ``bf16`` works wherever a dtype is taken; one rule (:func:`resolve_dtype`) decides what
``auto`` picks on a device, so training and inference agree on it.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

CANONICAL = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32",
           "bf16": "bfloat16",
           "fp16": "float16", "f16": "float16", "half": "float16"}
AUTO = "auto"


def parse_dtype(value: str | torch.dtype, *, allow_auto: bool = False) -> str:
    """The canonical name (``float32``, ``bfloat16``, ``float16``, or ``auto``) of a dtype given by name.

    Args:
        value: a canonical name, a short one (``fp32``/``f32``, ``bf16``, ``fp16``/``f16``; case-insensitive,
            ``torch.`` prefix allowed), or a ``torch.dtype``.
        allow_auto: accept ``auto`` (the choice is made later by :func:`resolve_dtype`).

    Raises:
        ConfigError: the value names no dtype lorakit computes in; the message lists the accepted names.
    """
    if isinstance(value, torch.dtype):
        for name, dtype in CANONICAL.items():
            if dtype == value:
                return name
    elif isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        name = ALIASES.get(name, name)
        if name in CANONICAL or (allow_auto and name == AUTO):
            return name
    accepted = ", ".join(([AUTO] if allow_auto else []) + list(CANONICAL) + list(ALIASES))
    raise ConfigError(f"dtype {value!r} is not one lorakit computes in; accepted: {accepted}")


def torch_dtype(value: str | torch.dtype) -> torch.dtype:
    """The ``torch.dtype`` of a name :func:`parse_dtype` accepts (``auto`` excluded)."""
    return CANONICAL[parse_dtype(value)]


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (then a bf16 frozen base pays: ~4x the fp32
    GEMM rate on an AVX512-BF16 CPU, measured in bench/; without bf16 units bf16 is emulated and slower)."""
    device = str(device)
    if device.startswith("cuda"):  # emulated bf16 (e.g. a T4) does not count: it is slower than fp16/fp32 there
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own capability probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(value: str | torch.dtype, device: str) -> tuple[str, str]:
    """(canonical dtype name, why) for a model's weights on ``device``: ``value`` itself unless it is ``auto``.

    ``auto`` is bfloat16 where ``device`` computes it natively (:func:`native_bf16`), else float32.

    Args:
        value: any name :func:`parse_dtype` accepts, ``auto`` included.
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps`` ...
    """
    name = parse_dtype(value, allow_auto=True)
    if name != AUTO:
        return name, "as configured"
    if native_bf16(device):
        return "bfloat16", f"auto: {device} computes bf16 natively"
    return "float32", f"auto: {device} has no native bf16 units"
