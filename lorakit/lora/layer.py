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
from . import dora, init, quantized, siblings
from .config import moves_base, scaling_of
from .ops import lora_down


@dataclass
class Adapter:
    """One adapter's hyper-parameters; its weights live in lora_A[name] / lora_B[name]."""

    r: int
    lora_alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False  # a magnitude vector in lora_magnitude_vector[name] (lorakit.lora.dora)

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
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA (A₀, B₀), on CPU
        self.merge_factors: dict[str, torch.Tensor] = {}  # DoRA's g at merge time, to unmerge exactly
        base_layer.requires_grad_(False)

    # ---- adapters ------------------------------------------------------------------------

    def add_adapter(self, name: str, spec: Adapter, init: bool | str = True) -> None:
        """Create adapter ``name`` with zero-effect (or random, init=False) weights."""
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} already exists in this layer; delete it first")
        self.adapters[name] = spec
        self.stack_cache = None
        try:
            self._create_weights(name, spec)
            self.train(self.training)  # new submodules take the layer's mode
            self.reset_adapter(name, init)
        except BaseException:
            self.delete_adapter(name)
            raise

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise AdapterError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
        self.adapters.pop(name)
        self.stack_cache = None
        self.initial_factors.pop(name, None)
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
        packed one is kept for unmerge): re-quantizing W + ΔW would lose most of ΔW. A DoRA adapter
        makes W ← g·(W + scaling·B·A) with g = m / ‖W₀ + scaling·B·A‖ taken on the weight with
        nothing merged (W₀), as its forward does; g is kept to unmerge exactly.
        """
        todo = [n for n in dict.fromkeys(names) if n not in self.merged and n in self.adapters]
        if todo:
            quantized.densify(self)
        weight = self.base_layer.weight
        base = self._unmerged_weight() if any(self.adapters[n].use_dora for n in todo) else None
        for name in todo:
            if self.adapters[name].use_dora:
                new, self.merge_factors[name] = dora.merge_weight(self, name, self._oriented(weight.data.float()), base)
                weight.data = self._oriented(new).to(weight.dtype)
            else:
                weight.data = (weight.data.float() + self.delta_weight(name)).to(weight.dtype)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out again, newest first (a quantized base gets its packed weight back)."""
        if quantized.restore(self):
            self.merged.clear()
            self.merge_factors.clear()
            return
        weight = self.base_layer.weight
        while self.merged:
            name = self.merged.pop()
            weight.data = self._take_out(name, weight.data.float(), self.merge_factors.pop(name, None)).to(weight.dtype)

    def _take_out(self, name: str, w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """``w`` (fp32, the base's layout) with merged adapter ``name`` taken out (g: its DoRA factor)."""
        if g is None:
            return w - self.delta_weight(name)
        return self._oriented(dora.unmerge_weight(self, name, self._oriented(w), g))

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out, (out, in) fp32 (a copy)."""
        w = self.base_layer.weight.data.float()
        for name in reversed(self.merged):
            w = self._take_out(name, w, self.merge_factors.get(name))
        return self._oriented(w)

    def _oriented(self, w: torch.Tensor) -> torch.Tensor:
        """(out, in) ↔ the base weight's own layout (a transpose for fan-in-fan-out bases)."""
        return w.T if getattr(self, "fan_in_fan_out", False) else w

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
        self.compute_dtype: torch.dtype | None = None  # set_compute_dtype: LoRA's matmuls in the base's half dtype
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: m, (out,)

    def _create_weights(self, name: str, spec: Adapter) -> None:
        factory = {"device": self.base_layer.weight.device, "dtype": torch.float32}
        self.lora_A[name] = nn.Linear(self.in_features, spec.r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(spec.r, self.out_features, bias=False, **factory)
        if spec.use_dora:
            dora.check_base(self)
            self.lora_magnitude_vector[name] = nn.Parameter(torch.ones(self.out_features, **factory))

    def _delete_weights(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """PEFT's initialisation: A kaiming-uniform (or N(0, (1/r)²)), B zeros; init=False: both random;
        "pissa"/"olora": from W, which becomes the residual (lorakit.lora.init). DoRA's m = ‖W + s·BA‖."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.is_meta:
            return
        if moves_base(init):
            self._init_from_base(name, init)
        else:
            init_factors(a, b, init, self.adapters[name].r)
        if name in self.lora_magnitude_vector:
            self.lora_magnitude_vector[name].copy_(dora.magnitude_init(self, name))

    def _init_from_base(self, name: str, how: str) -> None:
        """PiSSA / OLoRA: A, B from W; W ← W − s·B·A (so the output is unchanged); keep (A₀, B₀) to convert."""
        if self.merged:
            raise AdapterError(f"cannot initialise {name!r} from the base weight while {self.merged} are merged into it")
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point:
            raise AdapterError(f"init_lora_weights={how!r} needs a float base weight (got {weight.dtype}); initialise "
                               "on the unquantized model, then quantize the residual")
        w = self._oriented(weight.data.float())  # (out, in)
        a0, b0 = init.factors(how, w, self.adapters[name].r, self.adapters[name].scaling)
        self.lora_A[name].weight.copy_(a0)
        self.lora_B[name].weight.copy_(b0)
        weight.data = self._oriented(w - self.adapters[name].scaling * (b0 @ a0)).to(weight.dtype)
        self.initial_factors[name] = (a0.cpu(), b0.cpu())

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
        half = self.compute_dtype is not None and x.dtype == self.compute_dtype
        for name in names:
            spec, a, b = self.adapters[name], self.lora_A[name].weight, self.lora_B[name].weight
            p = spec.dropout if self.training else 0.0
            dtype = x.dtype if half and not spec.use_dora else None  # None: the adapter's own (fp32)
            # linear(dropout(x.to(A.dtype)), A) without keeping a dropped or upcast copy of x; one
            # matmul for the siblings that read this x (q/k/v, gate/up) when each has one adapter
            h = (siblings.down(self, x, name, p, dtype) if len(names) == 1
                 else lora_down(x, a if dtype is None else a.to(dtype), p=p))
            lora = F.linear(h * spec.scaling, b if dtype is None else b.to(dtype))  # scale the rank-r side: cheaper
            if spec.use_dora:  # m·(W + s·BA)/‖W + s·BA‖ in place of W + s·BA (lorakit.lora.dora)
                result = dora.forward(self, name, x, result, lora, p)
            else:
                result = result + lora.to(result.dtype)
        return result


class LoraEmbedding(LoraLayer):
    """LoRA around an ``nn.Embedding``: A is (r, num_embeddings), B is (embedding_dim, r)."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: m, (embedding_dim,)

    def _create_weights(self, name: str, spec: Adapter) -> None:
        factory = {"device": self.base_layer.weight.device, "dtype": torch.float32}
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(spec.r, self.in_features, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.out_features, spec.r, **factory))
        if spec.use_dora:
            dora.check_base(self)
            self.lora_magnitude_vector[name] = nn.Parameter(torch.ones(self.out_features, **factory))

    def _delete_weights(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def _oriented(self, w: torch.Tensor) -> torch.Tensor:
        """(out, in) = (dim, vocabulary) ↔ the table's own (vocabulary, dim) layout (DoRA's norms use it)."""
        return w.T

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """PEFT's initialisation for embeddings: A zeros, B normal; init=False: both normal."""
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if moves_base(init):
            raise AdapterError(f"init_lora_weights={init!r} applies to Linear layers only (as in PEFT); "
                               "leave embeddings out of target_modules")
        if a.is_meta:
            return
        if init is False:
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)
        nn.init.normal_(b)
        if name in self.lora_magnitude_vector:
            self.lora_magnitude_vector[name].copy_(dora.magnitude_init(self, name))

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
            lora = after_a @ b.T * spec.scaling
            if spec.use_dora:  # g·(result + s·B·A·x), g = m / ‖W + s·BA‖ per embedding dimension
                result = dora.forward(self, name, x, result, lora, 0.0)
            else:
                result = result + lora.to(result.dtype)
        return result


def init_factors(a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int) -> None:
    """PEFT's initialisation of one adapter's factors, in place: A kaiming-uniform (N(0, (1/r)²) for
    "gaussian"), B zeros so the adapter starts as the identity; init=False: both random."""
    if init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)


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

    def __getattr__(self, name: str):
        """What the wrapper itself lacks is the wrapped module's (``head.weight``, ``emb.num_embeddings``): the
        active adapter's copy, else the original, as PEFT's wrapper answers, so code written against the
        plain module keeps working after injection."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "original_module" not in modules:  # still being built
                raise
        active = self.__dict__.get("active", [])
        copies = modules["modules_to_save"]
        return getattr(copies[active[0]] if len(active) == 1 else modules["original_module"], name)

    def forward(self, *args, **kwargs):
        if len(self.active) > 1:
            raise AdapterError(f"adapters {self.active} each replace this module in full; activate only one of them")
        module = self.modules_to_save[self.active[0]] if self.active else self.original_module
        return module(*args, **kwargs)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Run the LoRA matmuls of every adapted Linear in ``dtype`` when its input comes in that dtype.

    The adapter weights stay as they are (fp32); each forward casts A and B (r·(in + out) numbers) to
    ``dtype``, so a bf16 base's activations are never upcast, and autograd returns fp32 gradients to the
    fp32 weights. This is what PEFT computes under ``torch.autocast(dtype=torch.bfloat16)`` (TRL's
    ``bf16=True``): A·x and B·h as bf16 matmuls with fp32 accumulation. DoRA adapters keep fp32.

    Args:
        model: a model with LoRA layers.
        dtype: ``torch.bfloat16``, or None for the default (the adapter weights' dtype, fp32).

    Returns:
        The number of layers set.

    Raises:
        AdapterError: ``dtype`` is another dtype (fp16's gradients would need loss scaling; fp32 is None).
    """
    if dtype not in (None, torch.bfloat16):
        raise AdapterError(f"LoRA compute dtype {dtype} is not supported: use torch.bfloat16 (a bf16 base) "
                           "or None (the adapter weights' float32)")
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in layers:
        m.compute_dtype = dtype
    return len(layers)
