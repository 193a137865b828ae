"""Helpers the export tests import by name (``from gguf_helpers import make_adapter``)."""

from __future__ import annotations

import torch

from lorakit import LoraConfig, inject, save_adapter

# rsLoRA plus a rank pattern and an alpha pattern: three ways a module's scale differs from alpha / r
PATTERNED = dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 4},
                 alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3.0})
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: str, out, *, seed: int = 0, **lora) -> tuple:
    """Inject a LoRA into ``base`` (loaded by lorakit), give B random values, save; returns (model, path)."""
    from lorakit.models.load import load_model

    model, _ = load_model(str(base))
    cfg = LoraConfig(**{"target_modules": ALL, "init_lora_weights": False, **lora})
    inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, out)
    return model, out
