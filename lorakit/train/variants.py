"""Training-side variants: LoRA+ parameter groups and NEFTune noise, with the semantics of PEFT's
``create_loraplus_optimizer`` and Hugging Face Trainer's ``neftune_noise_alpha``."""

from __future__ import annotations

import torch
from torch import nn


def loraplus_groups(model: nn.Module, lr: float, ratio: float, lr_embedding: float = 1e-6,
                    weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ (Hayou et al. 2024) parameter groups, as PEFT's ``create_loraplus_optimizer`` makes them.

    A's (and other matrices) train at ``lr``; B's and every vector (DoRA magnitudes, biases) at
    ``lr · ratio``; adapters on embeddings at ``lr_embedding``. Biases and norm weights get no decay.
    Empty groups are left out. The order is fixed, so a resumed run rebuilds the same groups.

    Args:
        model: a model whose trainable parameters are LoRA (and modules_to_save) parameters.
        lr: A's learning rate (the optimizer's).
        ratio: B's learning rate over A's (PEFT's loraplus_lr_ratio, >= 1).
        lr_embedding: learning rate of LoraEmbedding factors.
        weight_decay: decay of the decaying groups (PEFT's loraplus_weight_decay).
    """
    from ..lora.layer import LoraEmbedding

    embedding_params = {id(p) for m in model.modules() if isinstance(m, LoraEmbedding)
                        for p in (*m.lora_embedding_A.values(), *m.lora_embedding_B.values())}
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__
                for p in m.parameters(recurse=False)}
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            decays = id(p) not in no_decay and "bias" not in name
            groups["B" if decays else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    spec = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay), "B": (lr * ratio, weight_decay),
            "B_no_decay": (lr * ratio, 0.0)}
    return [{"params": ps, "lr": spec[k][0], "weight_decay": spec[k][1]} for k, ps in groups.items() if ps]


def neftune_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the input embeddings: in training mode only, add U(−a, a) noise with
    a = alpha / sqrt(L·d) (L the padded sequence length, d the width), as transformers' Trainer does."""
    if not module.training:
        return output
    dims = output.size(1) * output.size(2)  # (B, L, d)
    magnitude = module.neftune_noise_alpha / dims ** 0.5
    return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)


def add_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Register NEFTune on ``model``'s input embeddings (a transformers model: get_input_embeddings)."""
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = alpha
    return embeddings.register_forward_hook(neftune_hook)
