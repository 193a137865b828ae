"""Mixed-adapter batches: row i of a batch runs with its own adapter, all rows in one forward.

    with lk.mixed_batch(model, ["a", "b", None, "a"]):   # None: the base model alone
        logits = model(input_ids).logits                 # input_ids: (4, T)

Each LoRA layer stacks its adapters once into

    A: (n + 1, r_max, k)      B·scaling: (n + 1, d, r_max)      (slot 0 is all zeros: the base model)

with smaller ranks zero-padded, which is exact: padded rows of A and columns of B add 0. The forward
gathers each row's slot and does two batched matmuls, so its cost does not grow with the number of
adapters and there is no Python loop over adapters (when all rows of a layer use one adapter, the
gather picks that one and the matmuls fold into plain ones). Stacks are cached per layer and rebuilt when the
layer's adapter set or their weights change (``LoraLayer.add_adapter``/``delete_adapter`` drop the
cache, so an unloaded adapter's memory is freed with it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError
from .adapters import _factors, list_adapters, lora_layers
from .conv import LoraConv
from .layer import LoraEmbedding, LoraLayer, ModulesToSave
from .tokens import TrainableTokens


@dataclass
class Stack:
    """One layer's adapters stacked along a leading slot axis (slot 0 = no adapter)."""

    key: tuple
    slots: dict[str, int]  # adapter name -> slot
    a: torch.Tensor  # Linear: (n+1, r_max, k);  Embedding: (n+1, num_embeddings, r_max), A transposed
    b: torch.Tensor  # (n+1, d, r_max), scaling folded in


def _stack_key(layer: LoraLayer) -> tuple:
    """What a stack depends on: names, ranks, scalings, and identity + version of every factor tensor."""
    parts = []
    for name, spec in layer.adapters.items():
        a, b = _factors_raw(layer, name)
        parts.append((name, spec.r, spec.scaling, id(a), a.data_ptr(), a._version, id(b), b.data_ptr(), b._version))
    return tuple(parts)


def _factors_raw(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


@torch.no_grad()
def build_stack(layer: LoraLayer) -> Stack:
    """Stack the adapters of ``layer`` (fp32, zero-padded to the largest rank, slot 0 zeros).

    Args:
        layer: a LoraLinear or LoraEmbedding holding at least one adapter.
    """
    names = list(layer.adapters)
    r_max = max(layer.adapters[n].r for n in names)
    a0, _ = _factors(layer, names[0])
    factory = {"device": a0.device, "dtype": torch.float32}
    d, k = layer.out_features, layer.in_features
    embedding = isinstance(layer, LoraEmbedding)
    a = torch.zeros(len(names) + 1, *((k, r_max) if embedding else (r_max, k)), **factory)
    b = torch.zeros(len(names) + 1, d, r_max, **factory)
    for slot, name in enumerate(names, start=1):  # runs on a cache miss only, not per forward
        fa, fb = _factors(layer, name)  # (r, k), (d, r)
        r = fa.shape[0]
        if embedding:
            a[slot, :, :r] = fa.T
        else:
            a[slot, :r] = fa
        b[slot, :, :r] = fb * layer.adapters[name].scaling
    return Stack(_stack_key(layer), {n: i for i, n in enumerate(names, start=1)}, a, b)


def stack_for(layer: LoraLayer) -> Stack:
    """The layer's cached stack, rebuilt first if its adapters or their weights changed.

    Args:
        layer: a LoraLinear or LoraEmbedding holding at least one adapter.
    """
    cache = layer.stack_cache
    if cache is None or cache.key != _stack_key(layer):  # the key holds data_ptr: a move to another device shows
        layer.stack_cache = cache = build_stack(layer)
    return cache


class RowDelta:
    """The per-row LoRA update of one layer for one batch: called by the layer's forward as ``mixed(x)``."""

    def __init__(self, stack: Stack | None, slots: list[int], embedding: bool):
        self.n_rows, self.embedding = len(slots), embedding
        if stack is None or not any(slots):  # no row uses an adapter of this layer
            self.a = self.b = None
            return
        self.rows = torch.tensor(slots, device=stack.a.device)  # (B,) slot of each row
        # Gather each row's factors once per batch, not per call: the decode steps of a generation reuse
        # them. When every row uses the same adapter, an int index keeps one (r, k) copy and the matmuls
        # below fold into plain mm. An embedding's A stays stacked: its rows are picked per token.
        pick = slots[0] if len(set(slots)) == 1 else self.rows
        self.a = stack.a if embedding else stack.a[pick]  # (B, r_max, k) or (r_max, k)
        self.b = stack.b[pick]  # (B, d, r_max) or (d, r_max)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.a is None:
            return torch.zeros((), dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
        rows = self.n_rows
        if x.shape[0] != rows:
            raise AdapterError(f"mixed_batch was given {rows} adapter names but the batch has {x.shape[0]} rows")
        if self.embedding:  # x: token ids (B, ...)
            slots = self.rows.view(rows, *([1] * (x.dim() - 1)))
            after_a = self.a[slots, x].reshape(rows, -1, self.a.shape[-1])  # (B, T, r_max)
            return torch.matmul(after_a, self.b.transpose(-1, -2)).reshape(*x.shape, -1)  # (..., d)
        h = x.reshape(rows, -1, x.shape[-1]).to(self.a.dtype)  # (B, T, k)
        out = torch.matmul(torch.matmul(h, self.a.transpose(-1, -2)), self.b.transpose(-1, -2))  # (B, T, d)
        return out.reshape(*x.shape[:-1], -1)


def _check(model: nn.Module, names: list[str | None]) -> None:
    """Raise AdapterError for anything a mixed batch cannot run exactly."""
    if not names:
        raise AdapterError("mixed_batch needs one adapter name (or None) per batch row, got an empty list")
    known = list_adapters(model)
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise AdapterError(f"mixed_batch: unknown adapter(s) {unknown}; the model has {known or 'no adapters'}")
    if model.training:
        raise AdapterError("mixed_batch runs inference only (its stacked factors carry no gradient); "
                           "call model.eval() first")
    for path, layer in lora_layers(model):
        if isinstance(layer, LoraConv):
            raise AdapterError(f"mixed_batch does not run Conv1d adapters ({path}); use set_active for them")
        dora = [n for n, spec in layer.adapters.items() if spec.use_dora]
        if dora:
            raise AdapterError(f"mixed_batch does not run DoRA adapters ({dora} in {path}): their magnitude rescales "
                               "the base output per row. Merge such an adapter into its own model, or serve it alone")
        if layer.initial_factors:
            raise AdapterError(f"adapter(s) {sorted(layer.initial_factors)} moved part of {path}'s base weight into "
                               "themselves (PiSSA/OLoRA), so other rows would see the residual base; load the plain "
                               "form saved with save_adapter(..., convert_to_lora=True) instead")
        if layer.merged:
            raise AdapterError(f"adapter(s) {layer.merged} are merged into {path}; a mixed batch needs the base "
                               "weights alone: call lk.unmerge(model) first")
        if layer.mixed is not None:
            raise AdapterError("mixed_batch contexts cannot be nested (or used from two threads on one model)")
    for path, module in model.named_modules():
        if isinstance(module, (ModulesToSave, TrainableTokens)) and (module.active or set(names) & set(module.adapters)):
            what = "modules_to_save" if isinstance(module, ModulesToSave) else "trainable_token_indices"
            raise AdapterError(f"{path} is replaced in full or in rows by adapter(s) {module.adapters} ({what}); "
                               "mixed_batch runs LoRA factors only: use set_active for such adapters")


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[None]:
    """Run each batch row with its own adapter inside this block: row i uses ``adapters[i]``.

    Inside the block the model's active adapters are ignored; ``None`` runs a row on the base model
    alone. The results equal running each row by itself with ``set_active([name])``. Inference only.

    Args:
        model: a model with LoRA layers (in eval mode, no adapter merged).
        adapters: one adapter name or None per row of every batch fed to the model in the block.

    Raises:
        AdapterError: an unknown adapter, a model in training mode, a merged adapter, a
            modules_to_save adapter, or a nested mixed_batch.
    """
    names = list(adapters)
    _check(model, names)
    layers = [layer for _, layer in lora_layers(model)]
    try:
        set_rows(layers, names)
        yield
    finally:
        for layer in layers:
            layer.mixed = None


def set_rows(layers: Sequence[LoraLayer], adapters: Sequence[str | None]) -> None:
    """Point open mixed-batch layers at new rows: row i now uses ``adapters[i]``.

    For a caller whose rows change between forwards while the model's adapters do not (continuous
    batching): inside :func:`mixed_batch` over the same model, with names it has already checked, this
    skips the checks and the module walk that entering the block costs.

    Args:
        layers: the model's LoRA layers (``[l for _, l in lora_layers(model)]``).
        adapters: one loaded adapter name or None per row.
    """
    for layer in layers:
        stack = stack_for(layer) if layer.adapters else None
        slots = [stack.slots.get(n, 0) if stack and n else 0 for n in adapters]
        layer.mixed = RowDelta(stack, slots, isinstance(layer, LoraEmbedding))
