"""PiSSA / OLoRA adapters → plain LoRA on the original base (PEFT's ``path_initial_model_for_weight_conversion``).

An adapter initialised from W (lorakit.lora.init) was trained on the residual W_res = W − s·B₀·A₀.
Its effect on the *original* W is W_res + s·B·A − W = s·(B·A − B₀·A₀): a rank-2r LoRA
[B | −B₀]·[A; A₀] with the same scaling, so r and alpha double (alpha by √2 with rsLoRA), as PEFT
writes them. The layer keeps (A₀, B₀) from its initialisation, so no initial copy is saved to disk.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterError
from .adapters import lora_layers
from .config import LoraConfig, moves_base
from .init import convert_factors

RESIDUAL_NOTE = ("trained on the residual base W - s*B0*A0 left by init_lora_weights={init!r}: it applies to the "
                 "original base only when the loader redoes that decomposition (PEFT and lorakit do, at load); "
                 "save with convert_to_lora=True for a plain LoRA on the original base")


def to_plain_lora(model: nn.Module, adapter_name: str, cfg: LoraConfig, state: dict[str, torch.Tensor]
                  ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, model-keyed tensors) of ``adapter_name`` converted to a plain rank-2r LoRA.

    Args:
        model: the model holding the adapter (its layers hold the initial factors).
        adapter_name: a PiSSA / OLoRA adapter.
        cfg: the adapter's saved config (init_lora_weights "pissa…" or "olora").
        state: the adapter's tensors under model state-dict keys (trained A, B; others pass through).
    """
    if not moves_base(cfg.init_lora_weights):
        raise AdapterError(f"convert_to_lora applies to adapters initialised with init_lora_weights='pissa…' or "
                           f"'olora'; {adapter_name!r} has {cfg.init_lora_weights!r} and is a plain LoRA already")
    state, cfg = dict(state), copy.deepcopy(cfg)
    for path, layer in lora_layers(model):
        if adapter_name not in layer.adapters:
            continue
        if adapter_name not in layer.initial_factors:
            raise AdapterError(f"{path}: the initial factors of {adapter_name!r} are not known (was the adapter "
                               "created or loaded with its base-moving initialisation?), so it cannot be converted")
        a0, b0 = layer.initial_factors[adapter_name]
        a_key, b_key = f"{path}.lora_A.{adapter_name}.weight", f"{path}.lora_B.{adapter_name}.weight"
        state[a_key], state[b_key] = convert_factors(state[a_key], state[b_key], a0, b0)
    grow = 2 ** 0.5 if cfg.use_rslora else 2  # keeps alpha / r (or alpha / sqrt(r)) as it was
    cfg.r, cfg.lora_alpha = 2 * cfg.r, cfg.lora_alpha * grow
    cfg.rank_pattern = {k: 2 * v for k, v in cfg.rank_pattern.items()}
    cfg.alpha_pattern = {k: v * grow for k, v in cfg.alpha_pattern.items()}
    cfg.init_lora_weights = True
    return cfg, state
