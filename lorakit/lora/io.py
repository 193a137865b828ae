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
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, AdapterFormatError, ConfigError, ShapeMismatchError
from ..fileio import PICKLE_SUFFIXES, atomic_write_text, read_safetensors, save_safetensors
from . import quantized
from .adapters import (
    adapter_names,
    bias_keys,
    check_adapter_name,
    freeze_base,
    lora_layers,
    set_active,
    set_bias_trainable,
    set_requires_grad,
)
from .card import write_model_card
from .config import LoraConfig, moves_base
from .convert import to_plain_lora
from .inject import _matches_list, candidate_modules, linear_shape, module_kind
from .layer import LoraLayer, LoraLinear, ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT_VERSION = "1"
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_VECTOR_PARTS = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")  # no ".weight" in the key


def to_peft_key(key: str, adapter_name: str) -> str:
    """Model state-dict key → PEFT file key: drop the adapter name, prefix ``base_model.model.``.

    Only the name's own slot is removed (after lora_A/lora_B/modules_to_save, or ending an
    embedding factor), so an adapter named like a path component ("0", "layers") is safe.
    """
    name = re.escape(adapter_name)
    key = re.sub(rf"\.(lora_A|lora_B)\.{name}\.", r".\1.", key)
    key = re.sub(rf"\.modules_to_save\.{name}\.", ".", key)
    key = re.sub(rf"\.(lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.{name}$", r".\1", key)
    return PREFIX + key


def from_peft_key(key: str, adapter_name: str, save_paths: set[str]) -> str:
    """PEFT file key → model state-dict key (``save_paths``: modules_to_save locations)."""
    key = key.removeprefix(PREFIX)
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
    ends = [f".{p}.{adapter_name}" for p in _VECTOR_PARTS]
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
        if any(f".{part}." in name for part in (*_LORA_PARTS, "modules_to_save")) or name.split(".")[-2] in _LORA_PARTS:
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


def _module_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a module LoRA can wrap, else None."""
    kind = module_kind(module)
    if isinstance(module, LoraLayer):
        return (module.out_features, module.in_features)
    if kind == "embedding":
        return (module.embedding_dim, module.num_embeddings)
    if kind in ("linear", "conv1d"):
        return linear_shape(module)
    return None


def _closest(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f" (closest modules here: {', '.join(close)})" if close else ""


def _split_keys(tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module], save_paths: set[str], where: str,
                bias: str = "none"):
    """Sort PEFT keys into LoRA factors {path: {part: t}}, modules_to_save {path: {param: t}} and
    trained biases {module path: t}."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    saves: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        t = tensors[key]
        if not torch.isfinite(t).all():
            raise AdapterFormatError(f"{where}: tensor {key!r} contains NaN or inf values")
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{where}: key {key!r} does not start with {PREFIX!r}; not a PEFT adapter file")
        k = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", k) or re.fullmatch(
            r"(.+)\.(lora_embedding_[AB]|lora_magnitude_vector)", k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        base = k.removesuffix(".base_layer.weight")
        if base != k and module_kind(modules.get(base)) == "embedding":  # PEFT saves targeted embeddings in full
            _check_saved_embedding(key, t, modules[base], where)
            continue
        owner = next((p for p in save_paths if k.startswith(p + ".")), None)
        if owner is None and bias != "none" and k.endswith(".bias"):
            path = k.removesuffix(".bias").removesuffix(".base_layer")
            biases[path] = _check_bias(key, t, modules.get(path), where)
            continue
        if owner is None:
            raise AdapterFormatError(f"{where}: unexpected key {key!r}: neither a LoRA factor nor a parameter of a "
                                     f"modules_to_save module{_closest(k.rsplit('.', 1)[0], modules)}")
        saves.setdefault(owner, {})[k[len(owner) + 1:]] = t
    return lora, saves, biases


def _check_bias(key: str, t: torch.Tensor, module: nn.Module | None, where: str) -> torch.Tensor:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    own = getattr(base, "bias", None)
    if not isinstance(own, torch.Tensor):
        raise AdapterFormatError(f"{where}: {key} is a bias for a module this model does not have (or that has no bias)")
    if tuple(t.shape) != tuple(own.shape):
        raise ShapeMismatchError(f"{where}: {key} has shape {tuple(t.shape)}, the model's bias is {tuple(own.shape)}")
    return t


def _check_saved_embedding(key: str, t: torch.Tensor, module: nn.Module, where: str) -> None:
    weight = module.base_layer.weight if isinstance(module, LoraLayer) else module.weight
    if tuple(t.shape) != tuple(weight.shape):
        raise ShapeMismatchError(f"{where}: {key} has shape {tuple(t.shape)} but the model's embedding is "
                                 f"{tuple(weight.shape)}; resize the model's token embeddings first")
    if not weight.is_meta and not torch.allclose(t.float(), weight.detach().float().cpu(), atol=1e-3):
        warnings.warn(f"{where}: {key} differs from the model's embedding; lorakit keeps the model's", stacklevel=3)


def _check_factors(path: str, parts: dict[str, torch.Tensor], module: nn.Module, cfg: LoraConfig, where: str) -> int:
    """Check one module's A and B against the model; return r."""
    kind, shape = module_kind(module), _module_shape(module)
    if shape is None:
        raise AdapterFormatError(f"{where}: adapter has LoRA weights for {path!r}, a {type(module).__name__}, "
                                 "which LoRA cannot wrap")
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")
    need = {a_key, b_key} | ({"lora_magnitude_vector"} if cfg.use_dora else set())
    if set(parts) != need:
        raise AdapterFormatError(f"{where}: module {path!r} ({kind}) needs {sorted(need)} (use_dora={cfg.use_dora}), "
                                 f"found {sorted(parts)}")
    if cfg.use_dora and kind == "embedding":
        raise AdapterFormatError(f"{where}: module {path!r} is an embedding with DoRA; lorakit implements DoRA on "
                                 "Linear layers only")
    if cfg.use_dora and tuple(parts["lora_magnitude_vector"].shape) != (shape[0],):
        raise ShapeMismatchError(f"{where}: {PREFIX}{path}.lora_magnitude_vector has shape "
                                 f"{tuple(parts['lora_magnitude_vector'].shape)}; module {path!r} needs ({shape[0]},)")
    a, b = parts[a_key], parts[b_key]
    r = a.shape[0] if a.ndim == 2 else -1
    out_f, in_f = shape
    for part, t, want in ((a_key, a, (r, in_f)), (b_key, b, (out_f, r))):
        if t.ndim != 2 or tuple(t.shape) != want or r < 1:
            raise ShapeMismatchError(f"{where}: {PREFIX}{path}.{part} has shape {tuple(t.shape)} but module {path!r} "
                                     f"of this model needs {want} (its weight is {out_f}x{in_f}); "
                                     "is this adapter for another base model?")
    if r != cfg.rank_for(path):
        raise AdapterFormatError(f"{where}: module {path!r} has rank {r} but {CONFIG_NAME} says r={cfg.rank_for(path)}")
    return r


def _check_saves(saves: dict[str, dict[str, torch.Tensor]], modules: dict[str, nn.Module], where: str) -> None:
    for path, params in saves.items():
        module = modules[path]
        own = (module.original_module if isinstance(module, ModulesToSave) else module).state_dict()
        if set(params) != set(own):
            raise AdapterFormatError(f"{where}: modules_to_save {path!r} needs {sorted(own)}, found {sorted(params)}")
        for name, t in params.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise ShapeMismatchError(f"{where}: {PREFIX}{path}.{name} has shape {tuple(t.shape)}, "
                                         f"the model's is {tuple(own[name].shape)}")


def _check_metadata(metadata: dict[str, str], model: nn.Module, where: str) -> None:
    version = metadata.get("lorakit_format_version", FORMAT_VERSION)
    if not version.isdigit() or int(version) > int(FORMAT_VERSION):
        raise AdapterFormatError(f"{where}: format version {version!r} is newer than this lorakit reads "
                                 f"({FORMAT_VERSION}); upgrade lorakit")
    saved = metadata.get("lorakit_base_fingerprint")
    if saved and saved != base_fingerprint(model):
        warnings.warn(f"{where}: the adapter was saved from a model with a different architecture fingerprint "
                      "(parameter names/shapes); its target shapes fit, so it is loaded", stacklevel=3)


def _apply(model, name, cfg, lora, saves, biases, modules) -> None:
    from .adapters import _set_factors
    from .inject import _set_submodule, _wrap
    from .layer import Adapter

    for path, parts in lora.items():
        module = modules[path]
        layer = _wrap(model, path, module, module_kind(module))
        a, b = (parts["lora_A"], parts["lora_B"]) if "lora_A" in parts else (
            parts["lora_embedding_A"], parts["lora_embedding_B"])
        dropout = cfg.lora_dropout if isinstance(layer, LoraLinear) else 0.0
        # PiSSA/OLoRA: redo the decomposition, so the base becomes the residual the adapter was trained on
        init = cfg.init_lora_weights if moves_base(cfg.init_lora_weights) else True
        layer.add_adapter(name, Adapter(a.shape[0], cfg.alpha_for(path), dropout, cfg.use_rslora, cfg.use_dora), init)
        _set_factors(layer, name, a, b)
        if cfg.use_dora:
            with torch.no_grad():
                layer.lora_magnitude_vector[name].copy_(parts["lora_magnitude_vector"])
    with torch.no_grad():  # trained biases (bias="all"/"lora_only") replace the model's, as in PEFT
        for path, t in biases.items():
            module = modules[path]
            (module.base_layer if isinstance(module, LoraLayer) else module).bias.copy_(t)
    for path, params in saves.items():
        wrapper = modules[path]
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            _set_submodule(model, path, wrapper)
        wrapper.add_adapter(name)
        wrapper.modules_to_save[name].load_state_dict(params)


def _rollback(model: nn.Module, name: str, before: dict[str, nn.Module]) -> None:
    from .inject import _set_submodule

    for path, module in candidate_modules(model).items():
        if path in before and module is not before[path]:
            _set_submodule(model, path, before[path])
        elif isinstance(module, (LoraLayer, ModulesToSave)) and name in module.adapters:
            module.delete_adapter(name)


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", *,
                 activate: bool = True, is_trainable: bool = False) -> nn.Module:
    """Load a PEFT-format adapter into ``model``, wrapping modules with LoRA layers where needed.

    Everything is checked before anything changes: a file that is malformed, unsafe or made for
    another base model raises an AdapterFormatError and leaves the model untouched.

    Args:
        model: the base model (plain, or already holding other adapters).
        path: adapter directory (adapter_config.json + adapter_model.safetensors).
        adapter_name: name to load the adapter under.
        activate: make it the only active adapter (default True).
        is_trainable: leave its parameters trainable (default False: frozen, for inference).

    Returns:
        The same model object.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise AdapterError(f"the model already has an adapter named {adapter_name!r}; "
                           "delete_adapter it first or load under another name")
    where = str(path)
    cfg, tensors, metadata = read_adapter(path)
    modules = candidate_modules(model)
    save_paths = {n for n in modules if cfg.modules_to_save and _matches_list(n, cfg.modules_to_save)}
    lora, saves, biases = _split_keys(tensors, modules, save_paths, where, cfg.bias)
    if not lora:
        raise AdapterFormatError(f"{where}: {WEIGHTS_NAME} holds no LoRA factors")
    for p, parts in lora.items():
        if p not in modules:
            raise AdapterFormatError(f"{where}: adapter has weights for module {p!r}, which this model does not "
                                     f"have{_closest(p, modules)}; is it for another base model?")
        _check_factors(p, parts, modules[p], cfg, where)
    _check_saves(saves, modules, where)
    _check_metadata(metadata, model, where)  # after the shape checks: its warning says the shapes fit
    try:
        _apply(model, adapter_name, cfg, lora, saves, biases, modules)
    except BaseException:
        _rollback(model, adapter_name, modules)
        raise
    freeze_base(model)
    set_requires_grad(model, [adapter_name], is_trainable)
    set_bias_trainable(model, cfg.bias, is_trainable)
    model.lorakit_configs = {**getattr(model, "lorakit_configs", {}), adapter_name: cfg}
    if activate:
        set_active(model, [adapter_name])
    else:
        set_active(model, getattr(model, "lorakit_active", []))
    return model
