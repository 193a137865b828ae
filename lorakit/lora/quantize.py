"""Quantize a model's frozen Linears in place with bitsandbytes (QLoRA's base: NF4, FP4 or LLM.int8()).

Every ``nn.Linear`` (and transformers' ``Conv1D``) except the output head becomes a bitsandbytes
``Linear4bit`` or ``Linear8bitLt``; embeddings, norms and the head keep the model's dtype. The
quantization is a pure function of the weights (blockwise absmax), so a resumed run quantizes to
the same bits. Afterwards ``lorakit.inject`` wraps those layers as it wraps nn.Linear.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from . import quantized
from .inject import _conv1d_type, _output_head_names, candidate_modules
from .layer import LoraLayer, ModulesToSave

METHODS = ("nf4", "fp4", "int8")
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, transformers' default (llm_int8_threshold)


def quantize(model: nn.Module, method: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | str | None = None, progress: bool = False) -> nn.Module:
    """Replace the model's Linear layers (all but the output head) by bitsandbytes layers, in place.

    Args:
        model: any nn.Module without LoRA layers yet (quantize first, then inject).
        method: "nf4" or "fp4" (4-bit, ``Linear4bit``) or "int8" (``Linear8bitLt``, LLM.int8()).
        double_quant: 4-bit only: quantize the per-block scales too (QLoRA's double quantization,
            about 0.37 bit per weight less).
        compute_dtype: 4-bit only: dtype of the dequantized weight in the matmul; None keeps
            each layer's own dtype (the model's).
        progress: show a progress bar.

    Returns:
        The same model object. Its quantized Linears are frozen.

    Raises:
        ConfigError: unknown method, bitsandbytes missing (with the install command), LoRA layers
            already present, or no Linear to quantize.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype.removeprefix("torch."), None)
        if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
            raise ConfigError("compute_dtype must be a floating dtype such as 'bfloat16' or 'float32'")
    bnb = quantized._bnb()
    modules = candidate_modules(model)
    if any(isinstance(m, (LoraLayer, ModulesToSave)) for m in modules.values()):
        raise ConfigError("the model already has LoRA layers; quantize the base model first, then inject")
    heads = _output_head_names(model)
    linear_types = (nn.Linear, *_conv1d_type())
    chosen = [n for n, m in modules.items()
              if isinstance(m, linear_types) and not quantized.kind(m) and n not in heads]
    if not chosen:
        raise ConfigError("the model has no Linear layer to quantize besides its output head")
    for name in tqdm(chosen, desc=f"quantize {method}", disable=not progress, leave=False):
        new = _quantized_copy(bnb, modules[name], method, double_quant, compute_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _quantized_copy(bnb, module: nn.Module, method: str, double_quant: bool,
                    compute_dtype: torch.dtype | None) -> nn.Module:
    """A bitsandbytes Linear with ``module``'s weights, quantized on the module's device."""
    weight = module.weight.data
    if not isinstance(module, nn.Linear):  # Conv1D: (in, out) → (out, in)
        weight = weight.T
    out_f, in_f = weight.shape
    device, bias = weight.device, module.bias is not None
    if method == "int8":
        new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False,
                                  threshold=INT8_THRESHOLD, device="meta")
        new.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype or weight.dtype,
                                compress_statistics=double_quant, quant_type=method, device="meta")
        new.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, compress_statistics=double_quant,
                                       quant_type=method, module=new)
    if bias:
        new.bias = nn.Parameter(module.bias.data, requires_grad=False)
    new = new.to(device)  # bitsandbytes quantizes when the weight moves to a real device
    new.train(module.training)
    quantized.prepare(new)
    return new
