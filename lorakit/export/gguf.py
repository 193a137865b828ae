"""A PEFT-format LoRA adapter as a GGUF LoRA file that llama.cpp (and Ollama's ADAPTER) loads.

llama.cpp reads ``general.type = adapter``, ``adapter.type = lora``, one ``adapter.lora.alpha`` for
the whole file, and per adapted base tensor ``<name>.lora_a`` (ne = [in, r]) and ``<name>.lora_b``
(ne = [r, out]); it scales each pair by alpha / r, reading r from the pair. PEFT adapters carry a
scale per module (rsLoRA's alpha/sqrt(r), rank_pattern, alpha_pattern), so each module's true
scale is folded into its B: with the file's alpha, llama.cpp's alpha/r then gives that scale.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..lora.config import LoraConfig, scaling_of
from .gguf_format import (
    Arch,
    GgufExportError,
    TensorNames,
    arch_of,
    check_out_path,
    check_outtype,
    encode,
    file_type,
    gguf_module,
    permute_rows,
    qk_heads,
    write_file,
)

# PEFT features llama.cpp's LoRA format cannot hold, and what to do instead.
_NOT_REPRESENTABLE = {
    "use_dora": "DoRA's magnitude vector",
    "lora_bias": "LoRA bias vectors",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trained token rows",
}


@dataclass
class Pair:
    """One adapted module as llama.cpp will read it."""

    module: str  # transformers module path
    tensor: str  # GGUF base tensor name, e.g. blk.0.attn_q.weight
    a: torch.Tensor  # as written: (r, in), or (num_embeddings, r) for token_embd
    b: torch.Tensor  # as written: (out, r), scale folded in, q/k rows permuted
    r: int
    scaling: float  # the module's true scale (already folded into b)


def export_adapter_gguf(adapter: str | Path, out: str | Path, base: str | None = None,
                        outtype: str = "f32") -> dict:
    """Write ``adapter`` as a GGUF LoRA adapter for llama.cpp.

    Args:
        adapter: PEFT-format adapter directory.
        out: the .gguf file to write (atomically).
        base: the base model spec (its config gives the architecture and head counts); default: the
            adapter's base_model_name_or_path, else the embedded model.
        outtype: f32 (default, exact), f16, bf16 or q8_0 for the 2-D LoRA tensors.

    Returns:
        {"out", "architecture", "alpha", "pairs", "outtype", "types"}.

    Raises:
        GgufExportError: the adapter holds something llama.cpp's LoRA format cannot represent
            (DoRA, modules_to_save, a LoRA on a tied output head, a module llama.cpp has no tensor for).
    """
    from ..lora.io import read_adapter
    from ..models.load import DEFAULT_MODEL, load_config

    check_out_path(out)
    check_outtype(outtype)
    refuse_unrepresentable(adapter)
    cfg, tensors, _ = read_adapter(adapter)
    base = base or cfg.base_model_name_or_path or DEFAULT_MODEL
    config = load_config(base)
    arch = arch_of(config)
    pairs = adapter_pairs(cfg, tensors, config, arch, base)
    alpha = float(cfg.lora_alpha)

    def fill(writer) -> None:
        gguf = gguf_module()
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for p in pairs:
            for suffix, t in (("lora_a", p.a), ("lora_b", p.b)):
                data, qtype = encode(t, outtype)
                writer.add_tensor(f"{p.tensor}.{suffix}", data, raw_dtype=qtype)
                types.add(qtype.name)

    types: set[str] = set()
    write_file(out, arch.name, fill)
    return {"out": str(out), "architecture": arch.name, "alpha": alpha, "pairs": len(pairs),
            "outtype": outtype, "types": sorted(types)}


def refuse_unrepresentable(adapter: str | Path) -> None:
    """Refuse PEFT features llama.cpp's LoRA format has no place for, naming them and the way out."""
    path = Path(adapter) / "adapter_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # read_adapter reports a missing or broken config with its own message
    for key, what in _NOT_REPRESENTABLE.items():
        if raw.get(key) not in (None, False, {}, []):
            raise GgufExportError(f"{adapter}: {key}={raw[key]!r}: llama.cpp's LoRA adapter format has no place "
                                  f"for {what}. Export the merged model instead: lorakit export {adapter} "
                                  "--merged-gguf OUT.gguf")
    if raw.get("bias", "none") != "none":
        raise GgufExportError(f"{adapter}: bias={raw['bias']!r}: the adapter carries trained biases, and a llama.cpp "
                              f"LoRA adapter holds only low-rank pairs. Export the merged model instead: lorakit "
                              f"export {adapter} --merged-gguf OUT.gguf")
    if raw.get("modules_to_save"):
        raise GgufExportError(f"{adapter}: modules_to_save={raw['modules_to_save']!r} are full trained copies "
                              "of modules, and a llama.cpp LoRA adapter holds only low-rank pairs. Export the "
                              f"merged model instead: lorakit export {adapter} --merged-gguf OUT.gguf")


def adapter_pairs(cfg: LoraConfig, tensors: dict[str, torch.Tensor], config, arch: Arch, base: str) -> list[Pair]:
    """The adapter's A/B pairs in llama.cpp's names, layout and scale (checked against the base's shapes)."""
    from ..plan.count import build_meta_model

    shapes = {n: tuple(m.weight.shape) for n, m in build_meta_model(config).named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2}
    names = TensorNames(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    alpha = float(cfg.lora_alpha)
    pairs = []
    for module, (a, b, embedding) in sorted(_factors(tensors).items()):
        gname = names.module(module)
        if gname is None or module not in shapes:
            raise GgufExportError(f"module {module!r} has no tensor in llama.cpp's {arch.name} layout (base {base}); "
                                  "is the adapter for another base model?")
        if gname == "output" and tied:
            raise GgufExportError(f"the adapter has a LoRA on {module!r}, the output head, which {base} ties to the "
                                  "token embeddings: llama.cpp has no separate output tensor to apply it to. Export "
                                  "the merged model instead (--merged-gguf writes an untied output.weight), or train "
                                  "without the head in target_modules.")
        if embedding and tied:
            raise GgufExportError(f"the adapter has a LoRA on {module!r}, the token embeddings, which {base} ties "
                                  "to the output head: llama.cpp would apply it to the head too. Export the merged "
                                  "model instead (--merged-gguf keeps the head as it was).")
        r = a.shape[0]
        want = shapes[module][::-1] if embedding else shapes[module]  # embeddings: (num, dim) → (dim, num)
        if tuple(b.shape) != (want[0], r) or tuple(a.shape) != (r, want[1]):
            raise GgufExportError(f"{module}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the "
                                  f"base's weight {shapes[module]} ({base}); is the adapter for another base model?")
        scaling = scaling_of(r, cfg.alpha_for(module), cfg.use_rslora)
        fold = scaling * r / alpha  # llama.cpp multiplies by alpha / r
        b = b.float() * fold if fold != 1.0 else b
        heads = qk_heads(gname + ".", config, arch)
        if heads is not None:
            b = permute_rows(b, heads)
        if embedding:  # llama.cpp looks up rows of A^T (num_embeddings, r), then multiplies by B
            a = a.T
        pairs.append(Pair(module, gname + ".weight", a.contiguous(), b.contiguous(), r, scaling))
    return pairs


def _factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """{module path: (A, B, is_embedding)} from PEFT keys; anything else is refused."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key.removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", k) or re.fullmatch(r"(.+)\.lora_embedding_([AB])", k)
        if m is None:
            raise GgufExportError(f"adapter tensor {key!r} is not a LoRA factor; llama.cpp's LoRA adapter format "
                                  "holds only A/B pairs. Export the merged model instead (--merged-gguf).")
        found.setdefault(m.group(1), {})[m.group(2) + ("e" if "embedding" in k else "")] = t
    out = {}
    for module, parts in found.items():
        embedding = "Ae" in parts or "Be" in parts
        a, b = parts.get("Ae" if embedding else "A"), parts.get("Be" if embedding else "B")
        if a is None or b is None:
            raise GgufExportError(f"module {module!r} has only one of its LoRA factors A and B")
        out[module] = (a, b, embedding)
    return out
