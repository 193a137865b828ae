"""DPO's reference log-probs computed once (``--precompute-ref``): one pass over the pairs with the adapters
switched off, before the first step, so each training step runs one model pass per pair instead of two.

The figures are cached beside the token cache (``<cache>/reference/<key>.safetensors``), keyed by what
decides them: the data, the tokenizer and its chat template, max_seq_len, the base model's spec, dtype and
quantization, a fingerprint of its frozen weights, and what decides the arithmetic: the pair layout, the
attention implementation, the rounding of packed rows' width, the device type, the torch version and ``CACHE_VERSION`` (raised when lorakit's own
kernels change their numbers). In half precision two kernels give sums that differ by tenths of a nat, and a
reference from other arithmetic than the policy's would make the first step's loss other than ln 2. A resumed
run reads them back (or computes the same numbers again with the cache off).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ...data.cache import tokenizer_fingerprint
from ...data.preference import PreferenceSet, pair_batch
from ...fileio import read_safetensors, save_safetensors
from ...lora.adapters import disable_adapters
from ..inputs import cache_dir
from .logps import sequence_logps

CACHE_VERSION = 2  # 2: half-precision packed attention (models/attention.py: _HalfSpanAttention)


def base_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the frozen parameters' names, shapes, dtypes and first values (cheap; enough to tell bases
    apart). Sharded parameters (FSDP) contribute their names and shapes only."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if not hasattr(p, "device_mesh"):
            h.update(p.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(ds: PreferenceSet, tokenizer: Any, cfg, model: torch.nn.Module, layout: str = "padded",
              multiple: int = 0) -> str:
    config = getattr(getattr(model, "module", model), "config", None)
    inputs = {"layout": layout, "multiple": multiple, "attention": str(getattr(config, "_attn_implementation", None)),
              "device": next(model.parameters()).device.type, "torch": torch.__version__,
              "version": CACHE_VERSION, "data": ds.digest, "pairs": len(ds), "tokenizer": tokenizer_fingerprint(tokenizer),
              "chat_template": str(getattr(tokenizer, "chat_template", None)), "max_seq_len": cfg.max_seq_len,
              "skip_bad_pairs": cfg.skip_bad_pairs, "model": cfg.model, "weights": cfg.weights, "dtype": cfg.dtype,
              "quantize": cfg.quantize, "double_quant": cfg.double_quant, "base": base_fingerprint(model)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


@torch.no_grad()
def compute(model: torch.nn.Module, ds: PreferenceSet, batch_size: int, pad_id: int, progress: bool,
            layout: str = "padded", multiple: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probs of every pair under the base model, (n,) fp32 each."""
    was = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        with disable_adapters(model):
            for start in tqdm(range(0, len(ds), batch_size), desc="reference log-probs", disable=not progress,
                              leave=False):
                lp = sequence_logps(model, pair_batch(ds, list(range(start, min(start + batch_size, len(ds)))),
                                                      pad_id, layout, multiple))
                chosen.append(lp.chosen.cpu())
                rejected.append(lp.rejected.cpu())
    finally:
        model.train(was)
    return torch.cat(chosen), torch.cat(rejected)


def reference_logps(model: torch.nn.Module, tokenizer: Any, ds: PreferenceSet, cfg, pad_id: int, info,
                    progress: bool, layout: str = "padded", multiple: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference log-probs of ``ds``: from the cache when present, else computed (every rank computes:
    under FSDP each forward needs them all) and stored by rank 0."""
    folder = cache_dir(cfg)
    path = folder / "reference" / f"{cache_key(ds, tokenizer, cfg, model, layout, multiple)}.safetensors" if folder else None
    if path is not None and path.exists():
        tensors, _ = read_safetensors(path)
        if tensors["chosen"].shape == (len(ds),):
            if info.main:
                print(f"lorakit: reference log-probs of {len(ds):,} pairs read from {path}", flush=True)
            return tensors["chosen"], tensors["rejected"]
    chosen, rejected = compute(model, ds, cfg.batch_size, pad_id, progress, layout, multiple)
    if path is not None and info.main:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({"chosen": chosen, "rejected": rejected}, path)
        print(f"lorakit: reference log-probs of {len(ds):,} pairs computed once, cached in {path}", flush=True)
    return chosen, rejected
