"""Merging adapters into the base weights: W ← W + scaling·B·A, computed in fp32.

State changes only when asked: nothing here runs on ``.eval()`` or inside ``forward``.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import AdapterError
from . import quantized
from .adapters import _require, active_adapters, lora_layers
from .inject import candidate_modules
from .layer import LoraLayer, ModulesToSave
from .tokens import TrainableTokens


def merge(model: nn.Module, names: list[str] | str | None = None) -> None:
    """Add the named adapters (default: the active ones) into the base weights; idempotent.

    A merged adapter that stays active is not added a second time in ``forward``.

    Args:
        model: a model with LoRA layers.
        names: adapter name(s) to merge; None merges the active adapters.
    """
    names = active_adapters(model) if names is None else ([names] if isinstance(names, str) else list(names))
    _require(model, names)
    _refuse_shared_weights(model, names)
    for _, layer in lora_layers(model):
        layer.merge(names)
    for module in model.modules():  # a tied head reads the embedding's table, so both see the merged rows
        if isinstance(module, TrainableTokens):
            module.merge(names)


def _refuse_shared_weights(model: nn.Module, names: list[str]) -> None:
    """Merging into a weight another module shares (tied embeddings) would change that module too."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for lname, layer in lora_layers(model):
        if not set(names) & set(layer.adapters) or set(layer.merged) >= set(names) & set(layer.adapters):
            continue
        shared = owners.get(id(layer.base_layer.weight), [])
        if len(shared) > 1:
            raise AdapterError(f"cannot merge into {lname}: its weight is shared with "
                               f"{', '.join(n for n in shared if not n.startswith(lname + '.'))} (tied embeddings), "
                               "so merging would change that module too. Untie the weights first "
                               "(e.g. clone lm_head.weight) or keep the adapter unmerged.")


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again; idempotent.

    Args:
        model: a model with LoRA layers.
    """
    for _, layer in lora_layers(model):
        layer.unmerge()
    for module in model.modules():
        if isinstance(module, TrainableTokens):
            module.unmerge()


def merged_adapters(model: nn.Module) -> list[str]:
    """Adapters currently merged into at least one base weight."""
    out: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, (LoraLayer, TrainableTokens)):
            out.update(dict.fromkeys(module.merged))
    return list(out)


def merge_and_unload(model: nn.Module, names: list[str] | str | None = None) -> nn.Module:
    """Merge adapters (default: the active ones) and return the plain model, LoRA layers removed.

    modules_to_save wrappers are replaced by the copy of the (single) active adapter. A quantized
    (bitsandbytes) layer becomes a plain Linear holding dequantize(W) + ΔW in its compute dtype,
    with a warning saying so.

    Args:
        model: a model with LoRA layers; modified in place.
        names: adapter name(s) to merge; None merges the active adapters.

    Returns:
        The same model object, with every LoRA wrapper replaced by its base module.
    """
    active = active_adapters(model)
    merge(model, names)
    densified = [m.base_layer for _, m in lora_layers(model) if isinstance(m.base_layer, quantized.DenseFromQuantized)]
    if densified:
        warnings.warn(f"{len(densified)} quantized Linear layers became plain Linear layers holding the dequantized "
                      f"weight plus the adapter's delta, in {str(densified[0].weight.dtype).removeprefix('torch.')} "
                      "(re-quantizing W + ΔW would lose most of ΔW)", stacklevel=2)
    for name, module in list(candidate_modules(model).items()):
        if isinstance(module, LoraLayer):
            replacement = quantized.plain(module.base_layer)
        elif isinstance(module, TrainableTokens):
            replacement = module.base_layer
        elif isinstance(module, ModulesToSave):
            chosen = [a for a in active if a in module.modules_to_save]
            replacement = module.modules_to_save[chosen[0]] if chosen else module.original_module
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    for attr in ("lorakit_active", "lorakit_configs"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
