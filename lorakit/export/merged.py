"""Merge an adapter into its base model and write a plain transformers model directory."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import LorakitError
from ..fileio import replace_dir
from ..models.dtype import parse_dtype, torch_dtype


def merge_to_directory(base: str, adapter: str | Path, out: str | Path, dtype: str = "float32",
                       quantize: str | None = None, double_quant: bool = True) -> dict:
    """Load ``base``, apply ``adapter``, merge, and save to ``out`` (safetensors), atomically.

    The merged model's logits on a check batch are compared with the unmerged model's, and the
    largest absolute difference is returned, so the caller can see the merge is exact.

    Args:
        base: model spec (see lorakit.models.load_model).
        adapter: PEFT-format adapter directory.
        out: output directory; replaced only once the new one is complete. It gets the base's tokenizer
            when the base has one (a directory of weights alone gives a directory of weights alone).
        dtype: dtype of the saved weights ("float32", "bfloat16", "float16", or a short name: "bf16").
        quantize: the adapter was trained on a quantized base (``lorakit train --quantize``): quantize
            ``base`` the same way first and merge into its dequantized weights, the weights the adapter
            was trained against (re-quantizing the merged weights would lose most of ΔW, so the output
            holds dequantize(W) + ΔW, and dequantize(W) where no adapter is, in ``dtype``).
        double_quant: with a 4-bit ``quantize``: double-quantized scales, as in training.

    Returns:
        {"out": path, "dtype": dtype, "max_abs_diff": float, "quantization": lorakit.lora.quantized.describe of
        the base before merging, or None}
    """
    from ..lora.apply import load_adapter
    from ..lora.merge import merge_and_unload
    from ..models.load import load_model, local_tokenizer_files

    dtype = parse_dtype(dtype)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} exists and is not a directory")
    # merging needs no tokenizer: a local base's files are copied as they are (no tokenizer library needed),
    # a hub base's tokenizer is loaded when it has one, to be saved beside the merged weights
    tokenizer_files = local_tokenizer_files(base)
    model, tokenizer = load_model(base, tokenizer=None if tokenizer_files is None else False)
    quantization = None
    if quantize:
        from ..lora.quantize import quantize as quantize_model
        from ..lora.quantized import describe

        quantization = describe(quantize_model(model, quantize, double_quant))
    load_adapter(model, adapter)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        with warnings.catch_warnings():  # the CLI says it itself
            warnings.simplefilter("ignore")
            merged = merge_and_unload(model)
        if quantization:
            from ..lora.quantized import dequantize_all

            dequantize_all(merged)  # layers without an adapter: a saved directory holds plain weights
        after = merged(ids).logits
    merged.to(torch_dtype(dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for file in tokenizer_files or []:
            shutil.copyfile(file, tmp / file.name)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "dtype": dtype, "max_abs_diff": float((before - after).abs().max()),
            "quantization": quantization}

