"""Merge an adapter into its base model and write a plain transformers model directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import LorakitError
from ..fileio import replace_dir
from ..models.dtype import parse_dtype, torch_dtype


def merge_to_directory(base: str, adapter: str | Path, out: str | Path, dtype: str = "float32") -> dict:
    """Load ``base``, apply ``adapter``, merge, and save to ``out`` (safetensors), atomically.

    The merged model's logits on a check batch are compared with the unmerged model's, and the
    largest absolute difference is returned, so the caller can see the merge is exact.

    Args:
        base: model spec (see lorakit.models.load_model).
        adapter: PEFT-format adapter directory.
        out: output directory; replaced only once the new one is complete. It gets the base's tokenizer
            when the base has one (a directory of weights alone gives a directory of weights alone).
        dtype: dtype of the saved weights ("float32", "bfloat16", "float16", or a short name: "bf16").

    Returns:
        {"out": path, "dtype": dtype, "max_abs_diff": float}
    """
    from ..lora.io import load_adapter
    from ..lora.merge import merge_and_unload
    from ..models.load import load_model

    dtype = parse_dtype(dtype)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} exists and is not a directory")
    model, tokenizer = load_model(base, tokenizer=None)  # merging needs none; pass one on when there is one
    load_adapter(model, adapter)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        merged = merge_and_unload(model)
        after = merged(ids).logits
    merged.to(torch_dtype(dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "dtype": dtype, "max_abs_diff": float((before - after).abs().max())}

