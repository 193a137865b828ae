"""LoRA layers: a frozen ``base_layer`` plus named low-rank adapters.

    h = W0·x + sum over active adapters of scaling · B·A·dropout(x)      scaling = alpha / r

A is (r, in) and starts random, B is (out, r) and starts at zero, so a new adapter leaves the
output unchanged. Names follow PEFT (``base_layer``, ``lora_A[name]``, ``lora_B[name]``,
``lora_embedding_A/B``) so that a state dict maps to PEFT's by dropping the adapter name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from . import quantized, siblings
from .config import scaling_of
from .ops import lora_down


@dataclass
class Adapter:
    """One adapter's hyper-parameters; its weights live in lora_A[name] / lora_B[name]."""

    r: int
    lora_alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return scaling_of(self.r, self.lora_alpha, self.use_rslora)


class LoraLayer(nn.Module):
    """What LoraLinear and LoraEmbedding share: adapter records, activation, merging."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters: dict[str, Adapter] = {}
        self.active: list[str] = []
        self.merged: list[str] = []  # adapters whose delta is currently added into base_layer.weight
        self.mixed = None  # inside lorakit.mixed_batch: callable x -> per-row delta (see mixed.py)
        self.stack_cache = None  # mixed.py's stacked factors; dropped whenever the adapter set changes
        base_layer.requires_grad_(False)

    # ---- adapters ------------------------------------------------------------------------

    def add_adapter(self, name: str, spec: Adapter, init: bool | str = True) -> None:
        """Create adapter ``name`` with zero-effect (or random, init=False) weights."""
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} already exists in this layer; delete it first")
        self.adapters[name] = spec
        self.stack_cache = None
        self._create_weights(name, spec.r)
        self.train(self.training)  # new submodules take the layer's mode
        self.reset_adapter(name, init)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise AdapterError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
        self.adapters.pop(name)
        self.stack_cache = None
        self._delete_weights(name)
        self.active = [a for a in self.active if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.adapters]

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads ``module.weight`` keeps working."""
        return self.base_layer.weight

    # ---- merging -------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Add scaling·B·A of each adapter into the base weight (in fp32); idempotent.

        A quantized base is first replaced by a plain Linear holding its dequantized weight (the
        packed one is kept for unmerge): re-quantizing W + ΔW would lose most of ΔW.
        """
        names = [n for n in names if n not in self.merged and n in self.adapters]
        if names:
            quantized.densify(self)
        weight = self.base_layer.weight
        for name in names:
            weight.data = (weight.data.float() + self.delta_weight(name)).to(weight.dtype)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter again, newest first (a quantized base gets its packed weight back)."""
        if quantized.restore(self):
            self.merged.clear()
            return
        weight = self.base_layer.weight
        while self.merged:
            name = self.merged.pop()
            weight.data = (weight.data.float() - self.delta_weight(name)).to(weight.dtype)

    def _unmerged_active(self) -> list[str]:
        return [n for n in self.active if n not in self.merged]

    def extra_repr(self) -> str:
        items = ", ".join(f"{n}: r={a.r} alpha={a.lora_alpha}" for n, a in self.adapters.items())
        return f"adapters=[{items}], active={self.active}, merged={self.merged}"


class LoraLinear(LoraLayer):
    """LoRA around an ``nn.Linear`` (or transformers' Conv1D, whose weight is stored (in, out))."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        if self.fan_in_fan_out:
            in_features, out_features = base_layer.weight.shape
        else:  # not weight.shape: a quantized (bitsandbytes) Linear stores its weight packed
            out_features, in_features = base_layer.out_features, base_layer.in_features
            quantized.prepare(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.siblings: tuple[LoraLinear, ...] = ()  # set by inject.link_siblings
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_weights(self, name: str, r: int) -> None:
        factory = {"device": self.base_layer.weight.device, "dtype": torch.float32}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)

    def _delete_weights(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """PEFT's initialisation: A kaiming-uniform (or N(0, (1/r)²)), B zeros; init=False: both random."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.is_meta:
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.adapters[name].r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling·B·A in fp32, laid out like the base weight."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        delta = (b @ a) * self.adapters[name].scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.mixed is not None:  # a mixed batch: row i runs with its own adapter (lorakit.mixed)
            return result + self.mixed(x).to(result.dtype)
        names = self._unmerged_active()
        for name in names:
            spec, a, b = self.adapters[name], self.lora_A[name].weight, self.lora_B[name].weight
            p = spec.dropout if self.training else 0.0
            # linear(dropout(x.to(A.dtype)), A) without keeping a dropped or upcast copy of x; one
            # matmul for the siblings that read this x (q/k/v, gate/up) when each has one adapter
            h = siblings.down(self, x, name, p) if len(names) == 1 else lora_down(x, a, p=p)
            result = result + F.linear(h * spec.scaling, b).to(result.dtype)  # scale the rank-r side: cheaper
        return result


class LoraEmbedding(LoraLayer):
    """LoRA around an ``nn.Embedding``: A is (r, num_embeddings), B is (embedding_dim, r)."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_weights(self, name: str, r: int) -> None:
        factory = {"device": self.base_layer.weight.device, "dtype": torch.float32}
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.out_features, r, **factory))

    def _delete_weights(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """PEFT's initialisation for embeddings: A zeros, B normal; init=False: both normal."""
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if a.is_meta:
            return
        if init is False:
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)
        nn.init.normal_(b)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (b @ a).T * self.adapters[name].scaling  # (num_embeddings, dim)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.mixed is not None:  # a mixed batch: row i runs with its own adapter (lorakit.mixed)
            return result + self.mixed(x).to(result.dtype)
        base = self.base_layer
        for name in self._unmerged_active():
            spec, a, b = self.adapters[name], self.lora_embedding_A[name], self.lora_embedding_B[name]
            after_a = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type,
                                  base.scale_grad_by_freq, base.sparse)  # (..., r)
            result = result + (after_a @ b.T * spec.scaling).to(result.dtype)
        return result


class ModulesToSave(nn.Module):
    """A module trained in full for some adapters: the original stays, each adapter gets a copy."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []
        original_module.requires_grad_(False)

    def add_adapter(self, name: str) -> None:
        import copy

        if name in self.modules_to_save:
            raise AdapterError(f"adapter {name!r} already has a trainable copy of this module")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active = [a for a in self.active if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.modules_to_save]

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save)

    def forward(self, *args, **kwargs):
        if len(self.active) > 1:
            raise AdapterError(f"adapters {self.active} each replace this module in full; activate only one of them")
        module = self.modules_to_save[self.active[0]] if self.active else self.original_module
        return module(*args, **kwargs)
