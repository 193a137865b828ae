"""LoRA around an ``nn.Conv1d``, in PEFT's layout: A is a convolution with the base's kernel, stride and
padding (in → r channels), B a 1-wide convolution (r → out channels), so

    h = conv(x, W) + scaling · conv(conv(dropout(x), A), B)      ΔW[o, i, t] = scaling · Σ_r B[o, r] · A[r, i, t]

A 1×1 convolution (vocoders and flow models use them as per-frame projections) is a Linear over the
channel axis. Keys are PEFT's (``lora_A.<name>.weight`` (r, in, k), ``lora_B.<name>.weight`` (out, r, 1)).
Groups, dilation and padding modes other than zeros are refused: PEFT's A ignores dilation, and merging
grouped convolutions is undefined there.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError, TargetError
from .config import moves_base
from .layer import Adapter, LoraLayer, LoraLinear, init_factors


def check_conv(name: str, module: nn.Conv1d) -> None:
    """Raise TargetError for a Conv1d LoRA cannot wrap as PEFT does."""
    if module.groups != 1 or module.dilation != (1,) or module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise TargetError(f"module {name!r} is a Conv1d with groups={module.groups}, dilation={module.dilation}, "
                          f"padding={module.padding!r}, padding_mode={module.padding_mode!r}; lorakit adapts Conv1d "
                          "layers with groups=1, dilation=1 and integer zero padding (as PEFT merges them). "
                          "Leave it out of target_modules")


def conv_shape(module: nn.Conv1d) -> tuple[int, int]:
    """(out, in · kernel): the shape whose r·(d + k) is the LoRA's parameter count."""
    return (module.out_channels, module.in_channels * module.kernel_size[0])


class LoraConv(LoraLinear):
    """LoRA around an ``nn.Conv1d`` (see the module docstring); merging and bookkeeping are LoraLayer's."""

    def __init__(self, base_layer: nn.Conv1d):
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.siblings = ()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()

    def _create_weights(self, name: str, spec: Adapter) -> None:
        if spec.use_dora:
            raise AdapterError("DoRA is not implemented for Conv1d layers in lorakit; leave them out of target_modules")
        base = self.base_layer
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A[name] = nn.Conv1d(self.in_features, spec.r, base.kernel_size, base.stride, base.padding,
                                      bias=False, **factory)
        self.lora_B[name] = nn.Conv1d(spec.r, self.out_features, 1, 1, bias=False, **factory)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """PEFT's initialisation: A kaiming-uniform (or N(0, (1/r)²)), B zeros; init=False: both random."""
        if moves_base(init):
            raise AdapterError(f"init_lora_weights={init!r} applies to Linear layers only; leave Conv1d layers out "
                               "of target_modules")
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.is_meta:
            return
        init_factors(a, b, init, self.adapters[name].r)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B·A as a (out, in, kernel) fp32 convolution weight."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return torch.einsum("or,rik->oik", b[:, :, 0], a) * self.adapters[name].scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mixed is not None:
            raise AdapterError("mixed-adapter batches do not cover Conv1d LoRA layers; run one adapter at a time")
        result = self.base_layer(x, *args, **kwargs)
        for name in self._unmerged_active():
            spec, a, b = self.adapters[name], self.lora_A[name], self.lora_B[name]
            h = nn.functional.dropout(x.to(a.weight.dtype), spec.dropout, self.training)
            result = result + (b(a(h)) * spec.scaling).to(result.dtype)
        return result
