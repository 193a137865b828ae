"""Loading a PEFT-format adapter into a model: every key checked against the model (names, shapes,
ranks, the base it was trained on) before anything changes, then applied; rolled back on failure.
The file format itself (keys, config, reading and writing) is ``io.py``'s."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, AdapterFormatError, ShapeMismatchError
from .adapters import (
    adapter_names,
    check_adapter_name,
    freeze_base,
    set_active,
    set_bias_trainable,
    set_requires_grad,
)
from .config import LoraConfig, moves_base
from .conv import conv_shape
from .inject import _matches_list, candidate_modules, linear_shape, module_kind
from .io import CONFIG_NAME, FORMAT_VERSION, PREFIX, TOKENS_KEY, WEIGHTS_NAME, base_fingerprint, read_adapter
from .layer import LoraLayer, LoraLinear, ModulesToSave
from .tokens import TrainableTokens, token_targets


def _module_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a module LoRA can wrap, else None."""
    kind = module_kind(module)
    if kind == "conv":
        return conv_shape(module.base_layer if isinstance(module, LoraLayer) else module)
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
    """Sort PEFT keys into LoRA factors {path: {part: t}}, modules_to_save {path: {param: t}}, trained
    biases {module path: t} and trainable tokens' rows {embedding path: t}."""
    tokens: dict[str, torch.Tensor] = {}
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
        if k.endswith("." + TOKENS_KEY):
            tokens[k.removesuffix("." + TOKENS_KEY)] = t
            continue
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
    return lora, saves, biases, tokens


def _check_tokens(tokens: dict[str, torch.Tensor], model: nn.Module, modules: dict[str, nn.Module], cfg: LoraConfig,
                  where: str) -> dict[str, list[int]]:
    """{embedding path: indices} of the adapter's trainable tokens, each file tensor checked against them."""
    want = token_targets(model, cfg.trainable_token_indices, modules) if cfg.trainable_token_indices else {}
    if set(want) != set(tokens):
        raise AdapterFormatError(f"{where}: trainable_token_indices={cfg.trainable_token_indices!r} names "
                                 f"{sorted(want) or 'no embedding'}, the file has rows for {sorted(tokens) or 'none'}")
    for path, indices in want.items():
        module = modules[path]
        dim = (module.base_layer if isinstance(module, TrainableTokens) else module).embedding_dim
        if tuple(tokens[path].shape) != (len(indices), dim):
            raise ShapeMismatchError(f"{where}: {PREFIX}{path}.{TOKENS_KEY} has shape {tuple(tokens[path].shape)}; "
                                     f"{len(indices)} tokens of {path!r} need ({len(indices)}, {dim})")
    return want


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
    if cfg.use_dora and tuple(parts["lora_magnitude_vector"].shape) != (shape[0],):
        raise ShapeMismatchError(f"{where}: {PREFIX}{path}.lora_magnitude_vector has shape "
                                 f"{tuple(parts['lora_magnitude_vector'].shape)}; module {path!r} needs ({shape[0]},)")
    a, b = parts[a_key], parts[b_key]
    r = a.shape[0] if a.ndim == (3 if kind == "conv" else 2) else -1
    out_f, in_f = shape
    wants = ((r, in_f), (out_f, r))
    if kind == "conv":  # PEFT's conv factors: A (r, in, kernel), B (out, r, 1)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        wants = ((r, base.in_channels, base.kernel_size[0]), (out_f, r, 1))
    for part, t, want in ((a_key, a, wants[0]), (b_key, b, wants[1])):
        if tuple(t.shape) != want or r < 1:
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


def _apply(model, name, cfg, lora, saves, biases, modules, tokens=None) -> None:
    from .adapters import _set_factors
    from .inject import _set_submodule, _wrap, add_trainable_tokens
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
    rows, indices = tokens or ({}, {})
    if indices:
        add_trainable_tokens(model, indices, name)
        with torch.no_grad():
            for path, t in rows.items():
                model.get_submodule(path).trainable_tokens_delta[name].copy_(t)


def _rollback(model: nn.Module, name: str, before: dict[str, nn.Module]) -> None:
    from .inject import _set_submodule

    for path, module in candidate_modules(model).items():
        if path in before and module is not before[path]:
            _set_submodule(model, path, before[path])
        elif isinstance(module, (LoraLayer, ModulesToSave, TrainableTokens)) and name in module.adapters:
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
    lora, saves, biases, tokens = _split_keys(tensors, modules, save_paths, where, cfg.bias)
    if not lora:
        raise AdapterFormatError(f"{where}: {WEIGHTS_NAME} holds no LoRA factors")
    for p, parts in lora.items():
        if p not in modules:
            raise AdapterFormatError(f"{where}: adapter has weights for module {p!r}, which this model does not "
                                     f"have{_closest(p, modules)}; is it for another base model?")
        _check_factors(p, parts, modules[p], cfg, where)
    _check_saves(saves, modules, where)
    token_indices = _check_tokens(tokens, model, modules, cfg, where)
    _check_metadata(metadata, model, where)  # after the shape checks: its warning says the shapes fit
    try:
        _apply(model, adapter_name, cfg, lora, saves, biases, modules, (tokens, token_indices))
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
