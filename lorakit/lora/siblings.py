"""Fused sibling adapters: q/k/v (and gate/up) read one input, so their A's run as one matmul.

    [h_q | h_k | h_v] = dropout(x) · [A_q; A_k; A_v]ᵀ

Siblings are adapted Linears that are children of the same module under names that read one
input in every architecture that uses them (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/
``up_proj``, ...) and have the same input width. Grouping is static (decided when a layer is
wrapped) so a forward and its recomputation under activation checkpointing take the same path.

Whichever sibling runs first with an input computes the whole group's first half and leaves the
others their slices; a sibling uses a slice only if it was computed from the very tensor (and
version) it is called with, so a wrong guess (a cross-attention whose k/v read other states)
costs a wasted rank-r matmul, never a wrong result. The dropout mask is the one the siblings
share anyway (lorakit.ops.keep_mask), so fused and unfused runs draw the same masks.
"""

from __future__ import annotations

import torch

from .ops import LastInput, lora_down

SIBLING_NAMES = (
    frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}), frozenset({"q", "k", "v"}), frozenset({"wq", "wk", "wv"}),
    frozenset({"to_q", "to_k", "to_v"}), frozenset({"w1", "w3"}), frozenset({"wi_0", "wi_1"}),
)

enabled = True  # module switch, for measuring and testing the unfused path

_slices = LastInput()  # the latest group computation on an input: {(layer id, adapter name): h}




def down(layer, x: torch.Tensor, name: str, p: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """LoRA's first half for ``layer``'s adapter ``name``: dropout(x)·Aᵀ, fused with its siblings;
    computed in ``dtype`` (A cast to it) when given, else in A's own dtype."""
    a = layer.lora_A[name].weight
    if not enabled or len(layer.siblings) < 2:
        return lora_down(x, a if dtype is None else a.to(dtype), p=p)
    h = (_slices.get(x, dtype) or {}).pop((id(layer), name), None)
    if h is not None:
        return h
    others = [(m, n) for m in layer.siblings if m is not layer
              for n in [_fusable(m, layer.training, p, a)] if n is not None]
    if not others:
        return lora_down(x, a if dtype is None else a.to(dtype), p=p)
    weights = [a] + [m.lora_A[n].weight for m, n in others]
    cast = weights if dtype is None else [w.to(dtype) for w in weights]
    parts = lora_down(x, *cast, p=p).split([w.shape[0] for w in weights], dim=-1)
    _slices.put(x, {(id(m), n): h for (m, n), h in zip(others, parts[1:], strict=True)}, dtype)
    return parts[0]


def _fusable(m, training: bool, p: float, a: torch.Tensor) -> str | None:
    """The adapter name of sibling ``m`` if its first half can share this matmul, else None."""
    if m.mixed is not None or m.training != training:
        return None
    names = m._unmerged_active()
    if len(names) != 1:
        return None
    weight = m.lora_A[names[0]].weight
    dropout = m.adapters[names[0]].dropout if training else 0.0
    same = weight.dtype == a.dtype and weight.device == a.device
    return names[0] if same and dropout == p else None
