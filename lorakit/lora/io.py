"""Adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors.

Inside a model a LoRA weight is ``<path>.lora_A.<adapter>.weight``; on disk it is
``base_model.model.<path>.lora_A.weight``. ``to_peft_key`` and ``from_peft_key`` are the only
two places that know this.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, AdapterFormatError, ConfigError
from ..fileio import PICKLE_SUFFIXES, atomic_write_text, read_safetensors, save_safetensors
from . import quantized
from .adapters import (
    adapter_names,
    bias_keys,
    lora_layers,
)
from .card import write_model_card
from .config import LoraConfig
from .convert import to_plain_lora
from .inject import _matches_list, candidate_modules
from .layer import LoraLayer, LoraLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT_VERSION = "1"
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_VECTOR_PARTS = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")  # no ".weight" in the key
TOKENS_KEY = "token_adapter.trainable_tokens_delta"  # trainable_token_indices' rows, PEFT's key


def to_peft_key(key: str, adapter_name: str) -> str:
    """Model state-dict key → PEFT file key: drop the adapter name, prefix ``base_model.model.``.

    Only the name's own slot is removed (after lora_A/lora_B/modules_to_save, or ending an
    embedding factor), so an adapter named like a path component ("0", "layers") is safe.
    """
    name = re.escape(adapter_name)
    key = re.sub(rf"\.(lora_A|lora_B)\.{name}\.", r".\1.", key)
    key = re.sub(rf"\.modules_to_save\.{name}\.", ".", key)
    key = re.sub(rf"\.(lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.{name}$", r".\1", key)
    key = re.sub(rf"\.trainable_tokens_delta\.{name}$", "." + TOKENS_KEY, key)  # PEFT's wrapper adds a level
    return PREFIX + key


def from_peft_key(key: str, adapter_name: str, save_paths: set[str]) -> str:
    """PEFT file key → model state-dict key (``save_paths``: modules_to_save locations)."""
    key = key.removeprefix(PREFIX)
    if key.endswith("." + TOKENS_KEY):
        return f"{key.removesuffix(TOKENS_KEY)}trainable_tokens_delta.{adapter_name}"
    for part in ("lora_A", "lora_B"):
        if f".{part}." in key:
            return key.replace(f".{part}.", f".{part}.{adapter_name}.")
    for part in _VECTOR_PARTS:
        if key.endswith("." + part):
            return f"{key}.{adapter_name}"
    for path in save_paths:
        if key.startswith(path + "."):
            return f"{path}.modules_to_save.{adapter_name}.{key[len(path) + 1:]}"
    return key


def adapter_state_dict(model: nn.Module, adapter_name: str,
                       state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under model state-dict keys (LoRA factors, DoRA magnitudes, modules_to_save
    copies, and the biases its config's ``bias`` trains)."""
    marks = [f".{p}.{adapter_name}." for p in ("lora_A", "lora_B", "modules_to_save")]
    ends = [f".{p}.{adapter_name}" for p in (*_VECTOR_PARTS, "trainable_tokens_delta")]
    source = model.state_dict() if state_dict is None else state_dict
    out = {k: v for k, v in source.items() if any(m in k for m in marks) or k.endswith(tuple(ends))}
    cfg = getattr(model, "lorakit_configs", {}).get(adapter_name)
    return {**out, **{k: source[k] for k in bias_keys(model, cfg.bias if cfg else "none", source)}}


def base_fingerprint(model: nn.Module) -> str:
    """Hash of the base model's parameter names and shapes (LoRA wrappers and copies ignored)."""
    h = hashlib.sha256()
    for name, p in sorted(_base_parameters(model).items()):
        h.update(f"{name}:{quantized.logical_shape(p)};".encode())  # a 4-bit base hashes as its 16-bit self
    return h.hexdigest()[:16]


def _base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if any(f".{part}." in name for part in (*_LORA_PARTS, "modules_to_save")) or \
                name.split(".")[-2] in (*_LORA_PARTS, "trainable_tokens_delta"):
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = p
    return out


def _weight_stats(layer: LoraLayer) -> float | None:
    w = quantized.dequantize(layer.base_layer) if quantized.kind(layer.base_layer) else layer.base_layer.weight
    return None if w.is_meta or type(w).__name__ == "DTensor" else round(float(w.detach().float().abs().mean()), 6)


# ---- saving -----------------------------------------------------------------------------------

def _saved_targets(model: nn.Module, paths: list[str], save_entries: list[str]) -> list[str] | str:
    """Target list PEFT will resolve to exactly ``paths``: leaf names if they are unambiguous, else a regex."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    hit = {n for n in candidate_modules(model) if _matches_list(n, leaves)
           and not any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in save_entries)}
    if hit == set(paths):
        return leaves
    return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def saved_config(model: nn.Module, adapter_name: str) -> LoraConfig:
    """The LoraConfig that describes adapter ``adapter_name`` as it is in the model now."""
    layers = [(n, m) for n, m in lora_layers(model) if adapter_name in m.adapters]
    if not layers:
        raise AdapterError(f"adapter {adapter_name!r} has no LoRA layers in this model")
    cfg = copy.deepcopy(getattr(model, "lorakit_configs", {}).get(adapter_name) or LoraConfig())
    specs = {n: m.adapters[adapter_name] for n, m in layers}
    r = Counter(s.r for s in specs.values()).most_common(1)[0][0]
    alpha = Counter(s.lora_alpha for s in specs.values()).most_common(1)[0][0]
    cfg.r, cfg.lora_alpha = r, alpha
    cfg.rank_pattern = {re.escape(n): s.r for n, s in specs.items() if s.r != r}
    cfg.alpha_pattern = {re.escape(n): s.lora_alpha for n, s in specs.items() if s.lora_alpha != alpha}
    cfg.use_rslora = next(iter(specs.values())).use_rslora
    cfg.use_dora = any(s.use_dora for s in specs.values())
    dropouts = [s.dropout for n, s in specs.items() if isinstance(dict(layers)[n], LoraLinear)]
    cfg.lora_dropout = dropouts[0] if dropouts else cfg.lora_dropout
    cfg.target_modules = _saved_targets(model, list(specs), cfg.modules_to_save or [])
    cfg.layers_to_transform = cfg.layers_pattern = cfg.exclude_modules = None
    cfg.fan_in_fan_out = any(getattr(m, "fan_in_fan_out", False) for _, m in layers)
    if not cfg.base_model_name_or_path:  # as PEFT: where transformers loaded the base from (hub id or path)
        cfg.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return cfg


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default",
                 dtype: torch.dtype | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                 convert_to_lora: bool = False) -> Path:
    """Write one adapter as a PEFT directory (adapter_config.json + adapter_model.safetensors + a README.md
    model card, :mod:`lorakit.lora.card`).

    Files are written to temp names and renamed into place. The safetensors metadata carries a
    format version and a fingerprint of the base model so a load onto the wrong base is caught.

    Args:
        model: a model holding the adapter.
        path: directory to create or overwrite.
        adapter_name: which adapter to save.
        dtype: cast the weights (e.g. torch.float16); None keeps their dtype.
        state_dict: full tensors to save instead of the model's own (e.g. gathered from FSDP shards);
            keys as in model.state_dict().
        convert_to_lora: for a PiSSA / OLoRA adapter, save the plain rank-2r LoRA that gives the same
            model on the *original* base (lorakit.lora.convert); without it the file records
            init_lora_weights="pissa"/"olora" and loaders redo the decomposition of the base.

    Returns:
        The directory path.
    """
    if adapter_name not in adapter_names(model):
        raise AdapterError(f"no adapter named {adapter_name!r}; the model has {adapter_names(model) or 'none'}")
    if dtype is not None and not dtype.is_floating_point:
        raise AdapterError(f"dtype must be a floating dtype such as torch.float16, got {dtype}")
    cfg = saved_config(model, adapter_name)
    state = adapter_state_dict(model, adapter_name, state_dict)
    if convert_to_lora:
        cfg, state = to_plain_lora(model, adapter_name, cfg, state)
    tensors = {to_peft_key(k, adapter_name): (v if dtype is None else v.to(dtype)) for k, v in state.items()}
    if not tensors:
        raise AdapterError(f"adapter {adapter_name!r} has no tensors to save")
    stats = {n: _weight_stats(m) for n, m in lora_layers(model) if adapter_name in m.adapters}
    metadata = {
        "format": "pt",
        "lorakit_format_version": FORMAT_VERSION,
        "lorakit_base_fingerprint": base_fingerprint(model),
        "lorakit_base_stats": json.dumps(dict(list(stats.items())[:8])),
    }
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterFormatError(f"{path} exists and is not a directory; choose a directory path for the adapter")
    save_safetensors(tensors, path / WEIGHTS_NAME, metadata)
    atomic_write_text(path / CONFIG_NAME, cfg.to_json())
    write_model_card(path, cfg, quantized.card_section(model),
                     transformers_model=type(model).__module__.startswith("transformers."))
    return path


# ---- loading ----------------------------------------------------------------------------------

def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Read and check an adapter directory: (config, {PEFT key: tensor}, safetensors metadata)."""
    path = Path(path)
    if str(path).endswith(PICKLE_SUFFIXES) or str(path).endswith(".safetensors"):
        path = path.parent if path.name == WEIGHTS_NAME else path
        if not path.is_dir() or str(path).endswith(PICKLE_SUFFIXES):
            read_safetensors(path)  # raises the pickle refusal or "no such file"
    if not path.is_dir():
        raise AdapterFormatError(f"{path}: not an adapter directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            read_safetensors(path / pickles[0])
        raise AdapterFormatError(f"{path}: missing {WEIGHTS_NAME}")
    if not (path / CONFIG_NAME).is_file():
        raise AdapterFormatError(f"{path}: missing {CONFIG_NAME}; an adapter needs its config (r, lora_alpha, "
                                 "target_modules) to be loaded")
    try:
        raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path / CONFIG_NAME}: not valid JSON ({exc})") from None
    try:
        cfg = LoraConfig.from_peft_dict(raw, source=str(path / CONFIG_NAME))
    except ConfigError as exc:
        raise AdapterFormatError(str(exc)) from None
    tensors, metadata = read_safetensors(weights)
    if not tensors:
        raise AdapterFormatError(f"{weights}: holds no tensors (an empty adapter; was it saved from a sharded model?)")
    return cfg, tensors, metadata
