"""Pure functions over a model with LoRA layers: activate, disable for a while, delete, list, count, combine."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError
from .conv import LoraConv
from .layer import Adapter, LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from .tokens import TrainableTokens

WRAPPERS = (LoraLayer, ModulesToSave, TrainableTokens)  # modules that hold adapters

COMBINE_METHODS = ("cat", "linear", "svd")


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in the model, in order of first appearance."""
    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, WRAPPERS):
            names.update(dict.fromkeys(module.adapters))
    return list(names)


def check_adapter_name(name) -> None:
    """An adapter name is a key in module dicts and state-dict paths: non-empty, no '.'."""
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterError(f"adapter name must be a non-empty string without '.', got {name!r}")


def set_requires_grad(model: nn.Module, names: list[str], flag: bool) -> None:
    """Turn gradients on or off for the LoRA (and modules_to_save) parameters of ``names``."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            dicts = (module.lora_A, module.lora_B, module.lora_magnitude_vector)
        elif isinstance(module, LoraEmbedding):
            dicts = (module.lora_embedding_A, module.lora_embedding_B, module.lora_magnitude_vector)
        elif isinstance(module, ModulesToSave):
            dicts = (module.modules_to_save,)
        elif isinstance(module, TrainableTokens) and module.source is module:
            dicts = (module.trainable_tokens_delta,)
        else:
            continue
        for d in dicts:
            for name in names:
                if name in d:
                    d[name].requires_grad_(flag)


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not a LoRA factor or a modules_to_save copy (as PEFT does)."""
    own = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.",
           ".modules_to_save.", ".trainable_tokens_delta.")
    for name, p in model.named_parameters():
        if not any(mark in f".{name}." for mark in own):
            p.requires_grad_(False)


def bias_keys(model: nn.Module, bias: str, keys) -> list[str]:
    """The state-dict keys (among ``keys``) of the biases an adapter with ``bias`` trains and saves.

    PEFT's meaning: "all" is every bias of the model, "lora_only" the biases of adapted modules
    (``<path>.base_layer.bias``), "none" nothing. Trainable copies (modules_to_save) carry their own.
    """
    if bias == "none":
        return []
    if bias == "all":
        return [k for k in keys if (k == "bias" or k.endswith(".bias"))
                and ".modules_to_save." not in k and ".original_module." not in k]
    layers = {f"{n}.base_layer.bias" for n, m in lora_layers(model) if getattr(m.base_layer, "bias", None) is not None}
    return [k for k in keys if k in layers]


def set_bias_trainable(model: nn.Module, bias: str, flag: bool) -> None:
    """Turn gradients on or off for the biases ``bias`` selects ("none" | "all" | "lora_only")."""
    params = dict(model.named_parameters())
    for key in bias_keys(model, bias, params):
        params[key].requires_grad_(flag)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(qualified name, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters loaded in the model."""
    return adapter_names(model)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters currently active (in the order given to set_active)."""
    return list(getattr(model, "lorakit_active", []))


def _require(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise AdapterError(f"unknown adapter(s) {missing}; the model has {known or 'no adapters'}")


def set_active(model: nn.Module, names: list[str] | str) -> None:
    """Activate exactly these adapters (their outputs add up); [] runs the base model alone.

    Args:
        model: a model with LoRA layers.
        names: adapter name or list of names.
    """
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    for module in model.modules():
        if isinstance(module, WRAPPERS):
            module.set_active(names)
    model.lorakit_active = names


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; the adapters active before come back on exit (also
    on an exception). Nothing is copied: it is how preference training gets its reference model.

    Every wrapper computes its base only: LoRA and DoRA layers (quantized bases too) skip their
    adapters, ``ModulesToSave`` runs its original module, trainable tokens read the original rows; an
    open ``lk.mixed_batch`` is suspended. A merged adapter is refused: its update sits inside the base
    weight, and taking it out for a while would change weights behind the caller's back (unmerge
    first, as ``lk.unmerge(model)``).

        with lk.disable_adapters(model):
            ref_logits = model(input_ids).logits

    Args:
        model: a model with adapters (a DDP/FSDP wrapper of one works too).
    """
    merged = {n for m in model.modules() if isinstance(m, (LoraLayer, TrainableTokens)) for n in m.merged}
    if merged:
        raise AdapterError(f"adapter(s) {sorted(merged)} are merged into the base weights, so the base alone cannot "
                           "run; call lk.unmerge(model) before disable_adapters")
    wrappers = [m for m in model.modules() if isinstance(m, WRAPPERS)]
    saved = [(m, m.active, getattr(m, "mixed", None)) for m in wrappers]
    had = "lorakit_active" in vars(model)
    before = vars(model).get("lorakit_active")
    for m in wrappers:
        m.active = []
        if isinstance(m, LoraLayer):
            m.mixed = None
    if had:
        model.lorakit_active = []
    try:
        yield model
    finally:
        for m, active, mixed in saved:
            m.active = active
            if isinstance(m, LoraLayer):
                m.mixed = mixed
        if had:
            model.lorakit_active = before


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and free its weights. A merged adapter must be unmerged first.

    Args:
        model: a model with LoRA layers.
        name: the adapter to remove.
    """
    _require(model, [name])
    layers = [m for m in model.modules() if isinstance(m, WRAPPERS) and name in m.adapters]
    merged = [n for n, m in lora_layers(model) if name in m.merged]
    if merged:
        raise AdapterError(f"adapter {name!r} is merged into {merged[0]}; call lk.unmerge(model) before deleting it")
    for module in layers:
        module.delete_adapter(name)
    model.lorakit_active = [a for a in active_adapters(model) if a != name]
    getattr(model, "lorakit_configs", {}).pop(name, None)


@dataclass
class TrainableReport:
    """Parameter counts as PEFT's get_nb_trainable_parameters gives them."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable and total parameters (shared tensors counted once).

    Args:
        model: any nn.Module.
    """
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return TrainableReport(trainable, total)


# ---- combining adapters ------------------------------------------------------------------

def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of an adapter, as (r, in) and (out, r) fp32 tensors, for either layer kind."""
    if isinstance(layer, LoraLinear):
        return layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
    return layer.lora_embedding_A[name].float(), layer.lora_embedding_B[name].float()


@torch.no_grad()
def _set_factors(layer: LoraLayer, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if isinstance(layer, LoraLinear):
        layer.lora_A[name].weight.copy_(a)
        layer.lora_B[name].weight.copy_(b)
    else:
        layer.lora_embedding_A[name].copy_(a)
        layer.lora_embedding_B[name].copy_(b)


def _combine_factors(parts: list[tuple[float, torch.Tensor, torch.Tensor]], method: str,
                     rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """New (A, B) with scaling 1 from [(weight·scaling, A, B), ...]."""
    if method == "cat":  # exact: B_cat·A_cat = sum of w·s·B·A
        return torch.cat([a for _, a, _ in parts]), torch.cat([w * b for w, _, b in parts], dim=1)
    if method == "linear":  # PEFT's "linear": mixes the factors, so cross terms appear
        ranks = {a.shape[0] for _, a, _ in parts}
        if len(ranks) != 1:
            raise AdapterError(f"combine(method='linear') needs adapters of equal rank, got ranks {sorted(ranks)}; "
                               "use method='cat' or 'svd'")
        a = sum((1 if w >= 0 else -1) * abs(w) ** 0.5 * a for w, a, _ in parts)  # sign on A, as PEFT
        b = sum(abs(w) ** 0.5 * b for w, _, b in parts)
        return a, b
    delta = sum(w * (b @ a) for w, a, b in parts)  # (out, in)
    rank = min(rank or max(a.shape[0] for _, a, _ in parts), *delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def combine(model: nn.Module, weights: dict[str, float], new_name: str, method: str = "cat",
            rank: int | None = None) -> None:
    """Build adapter ``new_name`` whose update is sum of weight_i · ΔW_i.

    Args:
        model: a model holding the adapters named in ``weights``.
        weights: {adapter name: weight}.
        new_name: name of the combined adapter (added, not activated).
        method: "cat" (exact; rank = sum of ranks), "linear" (PEFT's weighted factor sum; equal
            ranks; only exact for a single adapter) or "svd" (truncated SVD of the summed ΔW).
        rank: for "svd", the rank to keep (default: the largest input rank).
    """
    check_adapter_name(new_name)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"rank must be an integer >= 1 (or None for the largest input rank), got {rank!r}")
    if method not in COMBINE_METHODS:
        raise AdapterError(f"unknown combine method {method!r}; choose one of {COMBINE_METHODS}")
    if not weights:
        raise AdapterError("combine needs at least one adapter in weights")
    _require(model, list(weights))
    if new_name in adapter_names(model):
        raise AdapterError(f"the model already has an adapter named {new_name!r}")
    conv = sorted(p for p, layer in lora_layers(model) if isinstance(layer, LoraConv) and set(weights) & set(layer.adapters))
    if conv:
        raise AdapterError(f"combine works on Linear and Embedding factors; {conv[0]} is a Conv1d adapter. Combine "
                           "adapters without Conv1d targets, or merge them one after the other")
    dora = sorted({n for _, layer in lora_layers(model) for n in weights if n in layer.adapters
                   and layer.adapters[n].use_dora})
    if dora:
        raise AdapterError(f"combine works on plain LoRA factors; {dora} use DoRA, whose magnitude does not add up. "
                           "Merge them into a model instead (lk.merge_and_unload)")
    if any(isinstance(m, ModulesToSave) and set(weights) & set(m.adapters) for m in model.modules()):
        raise AdapterError("combine cannot mix modules_to_save copies; combine adapters without modules_to_save")
    for _, layer in lora_layers(model):
        parts = [(w * layer.adapters[n].scaling, *_factors(layer, n)) for n, w in weights.items()
                 if n in layer.adapters]
        if not parts:
            continue
        a, b = _combine_factors(parts, method, rank)
        first = layer.adapters[next(n for n in weights if n in layer.adapters)]
        layer.add_adapter(new_name, Adapter(a.shape[0], a.shape[0], first.dropout, False))
        _set_factors(layer, new_name, a, b)
    set_requires_grad(model, [new_name], False)
    configs = getattr(model, "lorakit_configs", {})
    source = configs.get(next(iter(weights)))
    if source is not None:
        cfg = copy.deepcopy(source)
        cfg.use_rslora, cfg.rank_pattern, cfg.alpha_pattern = False, {}, {}
        configs[new_name] = cfg
    active = active_adapters(model)
    set_active(model, active)  # layers that just gained the adapter must not activate it

