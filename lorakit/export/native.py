"""An adapter merged back into a custom model's own checkpoint: the state dict its inference code loads
strictly, under its own key names, tied weights still tied.

The file is checked before it is written: a fresh build of the model loads it with ``strict=True`` and,
on the check inputs, gives the adapted model's outputs (to 1e-5). Only then is it written, to a temp
file renamed into place. ``.safetensors`` or ``.pt`` (a plain dict of tensors that
``torch.load(weights_only=True)`` reads).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import is_dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, ModelLoadError
from ..fileio import atomic_write, save_safetensors
from ..lora.apply import load_adapter
from ..lora.merge import merge_and_unload
from ..models.custom import load_custom, read_state_dict, resolve_builder

SUFFIXES = (".safetensors", ".pt", ".pth")
INPUTS_FUNCTION = "example_inputs"


def export_native(adapter: str | Path, model_spec: str, out: str | Path, *, weights: str | Path | None = None,
                  allow_missing: bool = False, inputs: dict | str | Path | None = None, atol: float = 1e-5) -> dict:
    """Merge ``adapter`` into the model ``model_spec`` builds and write the model's own state dict.

    Args:
        adapter: a PEFT-format adapter directory saved from this model.
        model_spec: ``MODULE:FUNCTION`` or ``file.py:FUNCTION`` (see lorakit.models.custom).
        out: the file to write, ``.safetensors`` or ``.pt``/``.pth``.
        weights: the base weights the adapter was trained on (None: what the builder makes).
        allow_missing: as for load_custom.
        inputs: keyword arguments of the model's forward for the check: a dict, or a safetensors /
            weights-only torch file of named tensors; None calls ``example_inputs(model)`` from the
            builder's module.
        atol: the largest difference allowed between the adapted and the re-loaded merged model.

    Returns:
        {"out", "keys", "tied", "max_diff"}: the written path, the number of keys, the groups of keys that
        share one tensor, and the largest output difference the check measured.

    Raises:
        AdapterError: the merge cannot be represented in the model's own checkpoint (named).
        ModelLoadError: a bad spec, weights or check inputs.
    """
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ModelLoadError(f"{out}: the native checkpoint must end in {', '.join(SUFFIXES)}")
    model, _ = load_custom(model_spec, weights, allow_missing=allow_missing)
    model.eval()
    kwargs = _check_inputs(model_spec, model, inputs)
    load_adapter(model, adapter)
    with torch.no_grad():
        want = model(**kwargs)
    merged = merge_and_unload(model)
    state = {k: v.detach() for k, v in merged.state_dict().items()}
    fresh, _ = load_custom(model_spec)
    fresh.eval()
    tied = _tied_groups(fresh)
    _check_ties(state, tied)
    try:
        fresh.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AdapterError(f"a fresh build of {model_spec} does not load the merged state dict strictly: {exc}") from None
    with torch.no_grad():
        got = fresh(**kwargs)
    diff = _max_diff(want, got)
    if not diff <= atol:
        raise AdapterError(
            f"the merged checkpoint gives outputs {diff:.3g} away from the adapted model's (allowed {atol:g}); "
            "nothing was written. A module reads an adapted weight directly — typically an output head tied "
            "to a LoRA-adapted embedding (F.linear(h, embeddings.weight)): training saw W there, the merged "
            "model sees W + dW. Leave that embedding out of target_modules (or untie the head) and retrain")
    _write(state, tied, out)
    return {"out": str(out), "keys": len(state), "tied": tied, "max_diff": diff}


def _check_inputs(spec: str, model: nn.Module, inputs) -> dict:
    """The forward's keyword arguments for the check (see export_native's ``inputs``)."""
    if isinstance(inputs, dict):
        return inputs
    if inputs is not None:
        return read_state_dict(inputs)
    name = resolve_builder(spec).__module__
    module = sys.modules.get(name) or importlib.import_module(name)
    make = getattr(module, INPUTS_FUNCTION, None)
    if make is None:
        raise ModelLoadError(f"{spec}: the export is checked on the model's outputs before it is written, and no "
                             f"check inputs were given: pass --inputs FILE (named tensors, the forward's keyword "
                             f"arguments) or define {INPUTS_FUNCTION}(model) -> dict beside the builder")
    return make(model)


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict keys that name one tensor in ``model`` (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(t), []).append(name)
    keys = set(model.state_dict())
    return [sorted(k for k in names if k in keys) for names in by_id.values() if len([k for k in names if k in keys]) > 1]


def _check_ties(state: dict[str, torch.Tensor], tied: list[list[str]]) -> None:
    for group in tied:
        first = state[group[0]]
        for key in group[1:]:
            if not torch.equal(state[key], first):
                raise AdapterError(f"{group[0]} and {key} are one tied tensor in the model, but the adapter changed "
                                   "them differently (a trainable copy or LoRA on one side only), so the native "
                                   "checkpoint cannot hold both; train that embedding without modules_to_save on one "
                                   "side only, or untie the weights in the builder")


def _write(state: dict[str, torch.Tensor], tied: list[list[str]], out: Path) -> None:
    """Write ``state``: tied keys share one tensor in a .pt file; safetensors stores each key's own copy
    (it refuses shared tensors), which loading into the tied model makes one again."""
    shared = {k: group[0] for group in tied for k in group[1:]}
    if out.suffix == ".safetensors":
        save_safetensors({k: v.clone() if k in shared else v for k, v in state.items()}, out)
    else:
        plain = {k: v.contiguous() for k, v in state.items()}
        plain.update({k: plain[first] for k, first in shared.items()})
        atomic_write(out, lambda tmp: torch.save(plain, tmp))


def _max_diff(a, b) -> float:
    """The largest absolute difference between two forward outputs (tensors, tuples, dicts, dataclasses)."""
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict) or hasattr(a, "items"):
        return max((_max_diff(v, b[k]) for k, v in a.items()), default=0.0)
    if is_dataclass(a):
        return max((_max_diff(v, getattr(b, k)) for k, v in vars(a).items()), default=0.0)
    if isinstance(a, (tuple, list)):
        return max((_max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return 0.0
