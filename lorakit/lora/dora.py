"""DoRA (weight-decomposed LoRA, Liu et al. 2024) on a LoraLinear or a LoraEmbedding, with PEFT's semantics.

    W' = m · (W + s·B·A) / ‖W + s·B·A‖        norms per output feature (row of the (out, in) W)

For an embedding the (out, in) weight is the table transposed, (dim, vocabulary): m has one entry per
embedding dimension and each norm runs over the vocabulary, as PEFT's ``DoraEmbeddingLayer`` takes it.

m (``lora_magnitude_vector[name]``, shape (out,)) starts at ‖W + s·B·A‖, so a new adapter changes
nothing. The norm is a constant for the gradient (paper §4.3, as PEFT): only m, A and B learn.
With g = m / ‖W + s·BA‖ the layer computes, as PEFT does,

    y = base(x) + (g - 1)·W·x' + g·s·B·A·x'          x' = dropout(x) in training, else x

and when x' = x it reuses base(x) − bias for W·x, so the frozen matmul runs once (an embedding has
no dropout: y = g·(base(x) + s·B·A·x), PEFT's embedding formula).

The norm never forms W + s·BA (out × in): ‖W + s·BA‖² = ‖W‖² + 2s·Σ_j (W·Aᵀ ⊙ B) + s²·Σ_j (B·(A·Aᵀ) ⊙ B),
where ‖W‖² is cached per base weight (it is frozen) and the rest costs one (out × in × r) matmul
and no full-size temporary. PEFT forms B·A through an identity matrix and adds it to W every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AdapterError
from .ops import keep_mask, keep_probability


def base_weight(layer) -> torch.Tensor:
    """The frozen base weight laid out (out, in), in its own dtype (a view, no copy)."""
    return layer._oriented(layer.base_layer.weight)


def factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of adapter ``name``, (r, in) and (out, r), as stored (a LoraLinear's or a LoraEmbedding's)."""
    if hasattr(layer, "lora_embedding_A"):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def check_base(layer) -> None:
    """DoRA needs a plain floating-point weight to take norms of; refuse anything else clearly."""
    w = getattr(layer.base_layer, "weight", None)
    if w is None or not w.dtype.is_floating_point or w.ndim != 2:
        raise AdapterError(f"DoRA needs a plain floating-point base weight; {type(layer.base_layer).__name__} "
                           f"holds {getattr(w, 'dtype', None)}. Use plain LoRA on quantized bases (use_dora=False).")


def _base_sq_norm(layer) -> torch.Tensor:
    """‖W‖² per output row in fp32, cached while the base weight stays the same tensor and version."""
    w = layer.base_layer.weight
    key = (w.data_ptr(), w._version, w.device, w.dtype)
    cached = getattr(layer, "_dora_base_sq", None)
    if cached is None or cached[0] != key:
        cached = (key, base_weight(layer).float().pow(2).sum(dim=1))  # (out,)
        layer._dora_base_sq = cached
    return cached[1]


@torch.no_grad()
def weight_norm(layer, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + s·B·A‖ per output row, fp32 (out,), without forming W + s·B·A.

    Args:
        layer: a LoraLinear or LoraEmbedding holding adapter ``name``.
        name: the adapter.
        weight: an (out, in) fp32 base weight to use instead of the layer's own (merging).
    """
    a, b = (t.float() for t in factors(layer, name))  # (r, in), (out, r)
    s = layer.adapters[name].scaling
    if weight is None:
        w = base_weight(layer)
        sq = _base_sq_norm(layer)
    else:
        w, sq = weight, weight.pow(2).sum(dim=1)
    wa = (w @ a.to(w.dtype).T).float()  # (out, r): W·Aᵀ in the base's precision, as PEFT's norm is
    cross = (wa * b).sum(dim=1)  # Σ_j W_ij (BA)_ij
    own = ((b @ (a @ a.T)) * b).sum(dim=1)  # ‖(BA)_i‖²
    return (sq + 2 * s * cross + s * s * own).clamp_min(0).sqrt()


def forward(layer, name: str, x: torch.Tensor, result: torch.Tensor, lora: torch.Tensor, p: float) -> torch.Tensor:
    """The layer output with DoRA adapter ``name`` applied on top of ``result`` (PEFT's formula).

    Args:
        layer: the LoraLinear or LoraEmbedding.
        name: a DoRA adapter of it.
        x: the layer input (..., in).
        result: the output so far (base, plus any adapters applied before this one), (..., out).
        lora: s·B·A·x' for this adapter (x' the dropped-out input in training), (..., out).
        p: the dropout probability in effect (0 outside training).
    """
    g = layer.lora_magnitude_vector[name] / weight_norm(layer, name)  # (out,), gradient to m only
    if p > 0:  # PEFT: W·dropout(x), with the same mask A saw (ops.keep_mask shares it)
        w = base_weight(layer)
        dropped = x.to(w.dtype) * keep_mask(x, p)
        base = F.linear(dropped, w) / keep_probability(p)
    else:
        bias = getattr(layer.base_layer, "bias", None)
        base = result if bias is None else result - bias  # W·x without running the frozen matmul again
    return result + ((g - 1) * base + g * lora).to(result.dtype)


def magnitude_init(layer, name: str) -> torch.Tensor:
    """m at creation: ‖W + s·B·A‖, so the adapter starts as an identity on the output."""
    return weight_norm(layer, name)


@torch.no_grad()
def merge_weight(layer, name: str, weight: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, g) for merging: g·(weight + s·B·A), g = m / ‖base + s·B·A‖; all (out, in) fp32.

    ``base`` is the weight with no adapter merged, the one forward takes the norm of.
    """
    g = layer.lora_magnitude_vector[name].float() / weight_norm(layer, name, base)  # (out,)
    return g[:, None] * (weight + _delta(layer, name)), g


@torch.no_grad()
def unmerge_weight(layer, name: str, weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Invert merge_weight with the g it returned: weight / g − s·B·A, (out, in) fp32."""
    return weight / g[:, None] - _delta(layer, name)


def _delta(layer, name: str) -> torch.Tensor:
    a, b = (t.float() for t in factors(layer, name))
    return (b @ a) * layer.adapters[name].scaling  # (out, in)
