"""The planner's view of a model: the dimensions that decide activation memory and the parameter groups,
read from a transformers model built on the meta device (:func:`read_arch`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..lora.inject import module_kind


@dataclass(frozen=True)
class Arch:
    """The dimensions that decide activation memory, read from a config and its meta model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool  # SwiGLU-style MLP: act(gate(x)) * up(x)
    rms_upcast: bool  # RMSNorm computed in fp32 (Llama family) rather than a native LayerNorm
    causal: bool
    dropout: bool  # residual dropout active in training (GPT-2, BERT)
    params: int
    quantizable: int  # Linear weights a 4-bit base would quantize (all but the output head)
    head: int  # output-head weights (tied or not): their gradient is allocated first in backward
    matmul: int  # weights used in matmuls per token (Linear weights, the head included)
    largest: int  # the largest parameter tensor (CPU AdamW temporaries are sized by it)
    layers_path: str
    fused_loss: bool = False  # lorakit's loss fuses this head with the cross-entropy (evaluate.fused_head)
    head_name: str = ""  # the output head's module path (an adapted head takes the plain loss path)
    lean_norm: bool = False  # the trainer's RMSNorm keeps its input, not an fp32 copy (models/lean.py)
    lean_mlp: bool = False  # the trainer's gated SiLU MLP keeps gate and up, not silu(gate) (models/lean.py)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim


def read_arch(model: nn.Module) -> Arch:
    """The planner's view of a (meta) transformers model: dimensions and parameter groups."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        hidden, heads, vocab = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    except AttributeError as exc:
        raise ConfigError(f"{type(model).__name__}: the planner reads hidden_size, num_attention_heads and "
                          f"vocab_size from a transformers config ({exc})") from None
    layers_path, blocks = _layer_list(model, cfg)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    block_names = [n for n, _ in blocks[0].named_modules()]
    classes = {type(m).__name__ for m in blocks[0].modules()}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = out.weight.numel() if out is not None else 0
    linear = [m for m in model.modules() if module_kind(m) in ("linear", "conv1d")]
    quantizable = sum(m.weight.numel() for m in linear if m is not out)
    dropout = max(float(getattr(cfg, k, 0) or 0) for k in ("resid_pdrop", "hidden_dropout_prob", "hidden_dropout"))
    from ..train.evaluate import fused_head

    fused = fused_head(model) is not None
    from ..models.lean import lean_targets

    lean = {kind for _, kind in lean_targets(blocks[0])}
    head_name = next((n for n, m in model.named_modules() if m is out), "") if out is not None else ""
    return Arch(hidden=hidden, intermediate=inter, layers=len(blocks), heads=heads,
                kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
                vocab=vocab, gated=any("gate" in n.rsplit(".", 1)[-1] for n in block_names),
                rms_upcast=any("RMSNorm" in c for c in classes), causal=_is_causal(model), dropout=dropout > 0,
                params=sum(p.numel() for p in model.parameters()), quantizable=quantizable,
                head=head, matmul=sum(m.weight.numel() for m in linear),
                largest=max(p.numel() for p in model.parameters()), layers_path=layers_path,
                fused_loss=fused, head_name=head_name, lean_norm="rms_norm" in lean, lean_mlp="mlp" in lean)


def _layer_list(model: nn.Module, cfg) -> tuple[str, list[nn.Module]]:
    n = getattr(cfg, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for name, m in lists:
        if len(m) == n:
            return name, list(m)
    if lists:
        name, m = max(lists, key=lambda x: len(x[1]))
        return name, list(m)
    raise ConfigError(f"{type(model).__name__}: no list of transformer blocks found; the planner needs one")


def _is_causal(model: nn.Module) -> bool:
    name = type(model).__name__
    return "CausalLM" in name or "LMHeadModel" in name
