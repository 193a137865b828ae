"""The same numbers in less memory: RMSNorm and the gated SiLU MLP of Llama-family blocks, for training.

What autograd keeps for backward in a transformers Llama/Qwen2/Mistral block, per token, bf16 weights:

- ``RMSNorm`` (``x.to(float32)``, ``pow(2).mean``, ``rsqrt``, ``·``, ``.to(bf16)``, ``weight ·``) keeps the fp32
  copy of its input: 4 bytes a number where the input itself is 2, twice per block and once more at the end.
- the MLP ``down(silu(gate(x)) · up(x))`` keeps silu's input, silu's output and up's output (and down's input,
  which its LoRA needs): silu's output is a function of its input and need not be kept.

``lean_layers(model)`` gives those modules a forward through an autograd Function that runs transformers' own
operations in the same order (outputs equal bit for bit) and whose backward runs the operations autograd's
would, in its order (gradients equal bit for bit, tested), keeping less: the norm keeps its input as it came
and 1/rms (one fp32 number a row) and recomputes the fp32 copy in backward; the MLP keeps gate and up and
recomputes silu(gate). SmolLM2-135M, bf16, 1,300 tokens a micro-batch: 61 norms · 1.5 MB + 30 MLPs · 4 MB ≈
210 MB less kept for backward; the recomputation is two element-wise passes per block in backward.

Only modules whose ``forward`` is, line for line, the one replicated here are changed (the source is compared,
so a transformers release that changes it leaves that model as it was); in fp32 the norm's copy is the input
itself and only the MLP saves. Training only (``train/setup.py``): outside autograd nothing differs anyway.
"""

from __future__ import annotations

import inspect
import textwrap
import types

import torch
import torch.nn.functional as F

_RMS_SOURCE = """
def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""

_MLP_SOURCE = """
def forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj
"""


class _RMSNorm(torch.autograd.Function):
    """``weight · (x·rsqrt(mean(x²) + eps)).to(x.dtype)`` with x upcast to fp32, as transformers' Llama RMSNorm;
    keeps x and 1/rms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (xf * r).to(x.dtype)
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xf = x.to(torch.float32)
        grad_w = None
        if ctx.needs_input_grad[1]:  # weight · h: d/dweight = grad · h, summed over the rows
            grad_w = (grad * (xf * r).to(x.dtype)).sum_to_size(weight.shape)
        if not ctx.needs_input_grad[0]:
            return None, grad_w, None
        g = (grad * weight).to(torch.float32)  # d/dh of weight · h, then h.to(dtype)'s backward
        grad_r = (g * xf).sum_to_size(r.shape)  # h = xf · r
        grad_v = -0.5 * grad_r * r.pow(3)  # r = rsqrt(v + eps)
        grad_sq = grad_v.expand_as(xf) / xf.shape[-1]  # v = mean(xf²)
        grad_xf = g * r + grad_sq * (2.0 * xf)  # both uses of xf: xf · r and xf.pow(2)
        return grad_xf.to(x.dtype), grad_w, None


class _SiluMul(torch.autograd.Function):
    """``silu(gate) · up``; keeps gate and up, recomputes silu(gate) in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype == torch.float32:  # the fp32 "copy" is the input itself: nothing to save, keep autograd's
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _same_source(cls: type, source: str) -> bool:
    """Whether ``cls.forward`` is ``source`` (decorators, blank lines and indentation aside)."""
    try:
        text = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return False
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("@")]
    return lines == [ln for ln in source.strip().splitlines() if ln.strip()]


def _is_silu(act: object) -> bool:
    return type(act) is torch.nn.SiLU or (type(act).__name__ == "SiLUActivation"
                                          and _same_source(type(act), "def forward(self, input: Tensor) -> Tensor:\n"
                                                                      "    return nn.functional.silu(input)"))


def _lean_kind(module: torch.nn.Module) -> str | None:
    """"rms_norm" or "mlp" when the module already runs a lean forward, else None."""
    forward = vars(module).get("forward")
    return {_rms_forward: "rms_norm", _mlp_forward: "mlp"}.get(getattr(forward, "__func__", None))


def lean_targets(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """The modules that run, or under ``lean_layers`` would run, a lean forward, each with its kind ("rms_norm"
    or "mlp"); nothing is changed (the planner reads it, on a meta model too)."""
    out = []
    checked: dict[tuple[type, str], bool] = {}
    for module in model.modules():
        cls = type(module)
        if "forward" in vars(module):  # a forward of its own: ours, or someone's (left as it is)
            if _lean_kind(module):
                out.append((module, _lean_kind(module)))
            continue
        if hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor):
            if checked.setdefault((cls, "rms"), _same_source(cls, _RMS_SOURCE)):
                out.append((module, "rms_norm"))
        elif all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            if checked.setdefault((cls, "mlp"), _same_source(cls, _MLP_SOURCE)) and _is_silu(module.act_fn):
                out.append((module, "mlp"))
    return out


def lean_layers(model: torch.nn.Module) -> dict[str, int]:
    """Give the model's Llama-style RMSNorms and gated SiLU MLPs their lean forward, in place (instances only:
    other models of the class are untouched). Returns how many of each were changed."""
    counts = {"rms_norm": 0, "mlp": 0}
    for module, kind in lean_targets(model):
        if _lean_kind(module):
            continue
        module.forward = types.MethodType(_rms_forward if kind == "rms_norm" else _mlp_forward, module)
        counts[kind] += 1
    return counts
