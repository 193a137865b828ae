"""Quantized frozen bases (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``): detect, dequantize, merge.

LoRA wraps a quantized Linear as it wraps a plain one: the base forward is bitsandbytes' own and
the adapter runs in its own dtype on top. What differs is everything that reads the base *weight*:

- its stored shape is packed ((out·in/2, 1) uint8 for 4-bit), so shapes come from
  ``in_features`` / ``out_features``, and fingerprints from the quantization state's shape;
- it cannot absorb a merge: re-quantizing W + ΔW into 4 bits throws away almost all of a small
  ΔW. ``densify`` swaps in a plain Linear holding dequantize(W) in the compute dtype (the merge
  then adds ΔW to it as for any Linear) and keeps the packed layer, which ``restore`` puts back
  bit for bit.

bitsandbytes is never imported here unless a model already holds its layers (it is then in
``sys.modules``): ``import lorakit`` stays light and a plain model pays nothing.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

INSTALL = "pip install 'lorakit[qlora]'"
_PARAM_TYPES = {"Params4bit": "4bit", "Int8Params": "int8"}


def _bnb():
    """bitsandbytes, imported on first use; a clear install command when it is missing."""
    from ..errors import ConfigError

    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"quantized bases need bitsandbytes, which is not installed. Install it with: {INSTALL}") from None
    return bitsandbytes


def kind(module: nn.Module) -> str | None:
    """'4bit' or 'int8' for a bitsandbytes Linear, None for anything else (without importing bitsandbytes)."""
    if "bitsandbytes" not in sys.modules or not isinstance(module, nn.Linear):
        return None
    return _PARAM_TYPES.get(type(module.weight).__name__)


def prepare(module: nn.Module) -> None:
    """Keep a 4-bit weight in bitsandbytes' canonical layout from now on.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weight in place the first
    time it runs in eval mode without gradients, and its forward on the repacked weight has no
    backward: a training step after an evaluation would silently get no gradient through that
    layer (bitsandbytes 0.50.2). lorakit turns the repacking off (inference then takes the
    dequantize-and-matmul path, as on any other CPU) and undoes it where it already happened.
    """
    if kind(module) != "4bit":
        return
    module.support_avx512bf16_for_cpu = False
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized Linear computes in: its compute_dtype, else the dtype it was quantized from."""
    if kind(module) == "4bit":
        state = module.weight.quant_state
        return module.compute_dtype or (state.dtype if state is not None else torch.float32)
    return module.bias.dtype if module.bias is not None else torch.float32


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """bitsandbytes' own dequantization of a quantized Linear's weight: (out, in) in its compute dtype."""
    bnb = _bnb()
    weight = module.weight
    if kind(module) == "4bit":
        prepare(module)
        dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        dense = bnb.functional.int8_vectorwise_dequant(weight.data, scb)
    return dense.to(compute_dtype(module))


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape before packing (a 4-bit weight stores (out·in/2, 1) bytes)."""
    state = getattr(param, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(param.shape)


def describe(model: nn.Module) -> dict | None:
    """What quantized the model's Linears: {"method": "nf4"|"fp4"|"int8", "double_quant", "compute_dtype",
    "layers"}, or None when none is quantized (read from the layers, so it also describes a model
    transformers loaded with a BitsAndBytesConfig)."""
    found = [m for m in model.modules() if kind(m) and not isinstance(m, DenseFromQuantized)]
    if not found:
        return None
    first = found[0]
    is_4bit = kind(first) == "4bit"
    return {
        "method": first.weight.quant_type if is_4bit else "int8",
        "double_quant": bool(first.weight.compress_statistics) if is_4bit else False,
        "compute_dtype": str(compute_dtype(first)).removeprefix("torch."),
        "layers": len(found),
    }


class DenseFromQuantized(nn.Linear):
    """A plain Linear holding dequantize(W) of a quantized layer, which it keeps (unregistered) in
    ``packed`` so that unmerging puts the very same packed weight back."""

    def __init__(self, packed: nn.Module):
        dense = dequantize(packed)
        super().__init__(packed.in_features, packed.out_features, bias=packed.bias is not None,
                         device=dense.device, dtype=dense.dtype)
        self.weight.data = dense
        if packed.bias is not None:
            self.bias.data = packed.bias.data.to(dense.dtype, copy=True)
        self.requires_grad_(False)
        self.__dict__["packed"] = packed  # not a submodule: parameters, state_dict and counts see the dense layer


def densify(layer: nn.Module) -> None:
    """Before a merge: swap ``layer.base_layer`` (quantized) for a DenseFromQuantized copy; no-op otherwise."""
    if kind(layer.base_layer):
        layer.base_layer = DenseFromQuantized(layer.base_layer)


def restore(layer: nn.Module) -> bool:
    """Unmerge a densified layer: put the packed base back (bit for bit). False if it was not densified."""
    if not isinstance(layer.base_layer, DenseFromQuantized):
        return False
    layer.base_layer = layer.base_layer.packed
    return True


def plain(module: nn.Module) -> nn.Module:
    """A DenseFromQuantized as a plain nn.Linear sharing its parameters (the packed layer let go); others as they are."""
    if not isinstance(module, DenseFromQuantized):
        return module
    out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    out.weight, out.bias = module.weight, module.bias
    return out.train(module.training)


def card_section(model: nn.Module) -> dict[str, list[str]] | None:
    """The model card's section for an adapter trained on a quantized base (None for a plain base)."""
    q = describe(model)
    if q is None:
        return None
    scales = " with double-quantized scales" if q["double_quant"] else ""
    return {"Quantized base (QLoRA)": [
        f"- trained on a base whose {q['layers']} Linear layers (all but the output head) bitsandbytes quantized "
        f"to {q['method']}{scales}, computing in {q['compute_dtype']} (`lorakit train --quantize {q['method']}`)",
        "- the adapter itself is plain LoRA (nothing about quantization in adapter_config.json, as PEFT saves it); "
        "it loads onto the 16/32-bit base too, whose outputs differ from the quantized base's by the "
        "quantization error",
    ]}


def dequantize_all(model: nn.Module) -> int:
    """Replace every quantized Linear still in ``model`` by a plain Linear holding its dequantized weight
    (what a saved transformers directory needs); returns how many were replaced."""
    names = [n for n, m in model.named_modules() if kind(m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, plain(DenseFromQuantized(getattr(owner, child))))
    return len(names)
