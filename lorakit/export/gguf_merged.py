"""The base model with an adapter merged, as one GGUF file for llama.cpp, Ollama and transformers.

From a base GGUF, every metadata key (tokenizer and chat template included) and every tensor the
adapter does not touch are copied byte for byte, quantized ones too; only the adapted tensors are
rewritten, at ``outtype``. They are never re-quantized into 4 bits: a small ΔW would drown in a
4-bit grid. From a transformers directory, the whole model is written (see gguf_hf.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .gguf_format import (
    GgufExportError,
    TensorNames,
    arch_of,
    check_out_path,
    check_outtype,
    encode,
    gguf_module,
    permute_rows,
    qk_heads,
    write_file,
)

_FLOAT_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def export_merged_gguf(adapter: str | Path, out: str | Path, base: str | None = None,
                       outtype: str | None = None) -> dict:
    """Merge ``adapter`` into ``base`` and write one GGUF model file.

    A plain LoRA on a GGUF base is merged tensor by tensor without loading the model; anything else
    (DoRA, trained biases, modules_to_save, a tied head, a transformers base) through the loaded model.

    Args:
        adapter: PEFT-format adapter directory.
        out: the .gguf file to write (atomically).
        base: base model spec: a .gguf file, the embedded default, or a transformers directory;
            default: the adapter's base_model_name_or_path, else the embedded model.
        outtype: type of the adapted tensors (f32, f16, bf16, q8_0). None: a float base tensor keeps
            its type, a quantized one becomes f16 (from a transformers directory: its weights' dtype).

    Returns:
        {"out", "architecture", "source", "adapted", "types", "added"}.
    """
    from ..lora.apply import load_adapter
    from ..lora.io import read_adapter
    from ..models.load import DEFAULT_MODEL, load_model

    if outtype is not None:
        check_outtype(outtype)
    check_out_path(out)
    cfg, tensors, _ = read_adapter(adapter)
    base = base or cfg.base_model_name_or_path or DEFAULT_MODEL
    source = gguf_source(base)
    lean = _deltas(adapter, cfg, tensors, base) if source is not None else None
    if lean is not None:  # a plain LoRA on a GGUF base: ΔW added to each dequantized tensor, no model loaded
        arch, deltas = lean
        report = _write_from_gguf(source, arch, deltas, out, outtype, add_to_base=True)
        return {"out": str(out), "architecture": arch.name, "source": str(source), **report}
    model, tokenizer = load_model(base)
    load_adapter(model, adapter)
    arch = arch_of(model.config)
    weights = merged_weights(model)
    if source is None:
        from .gguf_hf import write_hf_gguf

        report = write_hf_gguf(base, model, tokenizer, weights, out, outtype)
    else:
        report = _write_from_gguf(source, arch, _gguf_updates(model.config, arch, weights), out, outtype)
    return {"out": str(out), "architecture": arch.name, "source": str(source or base), **report}


def _deltas(adapter, cfg, tensors, base: str):
    """(arch, {GGUF tensor name: ΔW in GGUF row order}) for an adapter a llama.cpp LoRA file could hold,
    else None (DoRA, trained biases, modules_to_save, tied heads: lorakit's own merge handles those)."""
    from ..models.load import load_config
    from .gguf import adapter_pairs, refuse_unrepresentable

    config = load_config(base)
    arch = arch_of(config)
    try:
        refuse_unrepresentable(adapter)
        pairs = adapter_pairs(cfg, tensors, config, arch, base)
    except GgufExportError:
        return None
    return arch, {p.tensor: _Delta(p, float(cfg.lora_alpha)) for p in pairs}


class _Delta:
    """ΔW of one pair as llama.cpp computes it from the adapter file, (alpha / r)·B·A (scale folded into B),
    formed only when called: while writing, one at a time, so a large model's ΔWs never coexist."""

    def __init__(self, pair, alpha: float):
        self.pair, self.alpha = pair, alpha
        self.embedding = pair.tensor == "token_embd.weight"  # A is stored transposed: ΔW = A^T-rows · B^T
        a, b = pair.a.shape, pair.b.shape
        self.shape = (a[0], b[0]) if self.embedding else (b[0], a[1])

    def __call__(self) -> torch.Tensor:
        a, b = self.pair.a.float(), self.pair.b.float()
        return (self.alpha / self.pair.r) * (a @ b.T if self.embedding else b @ a)


def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name in the plain model: merged fp32 tensor} for every tensor the adapter changes.

    Each LoRA layer is merged (by its own ``merge``, so any variant merges its way), read, and its
    base weight restored bit for bit; modules_to_save contribute their trained copies. A LoRA on a
    head tied to the embeddings yields the head's own, now untied, weight.
    """
    from ..lora.layer import LoraLayer, ModulesToSave

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active:
            weight = module.base_layer.weight
            saved = weight.data
            module.merge(list(module.active))
            out[f"{name}.weight"] = weight.data.detach().float().clone()
            module.unmerge()
            weight.data = saved  # exact: W + Δ - Δ is not W in floating point
        elif isinstance(module, ModulesToSave) and module.active:
            copy = module.modules_to_save[module.active[0]]
            out.update({f"{name}.{p}": t.detach().float().clone() for p, t in copy.named_parameters()})
    out.update(_trained_biases(model))
    if not out:
        raise GgufExportError("the adapter changes no weight of the base model; nothing to merge")
    _untie_head(model, out)
    return out


def _trained_biases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The biases the loaded adapters train (bias="all" / "lora_only"), under plain names."""
    from ..lora.adapters import bias_keys

    state = model.state_dict()
    out = {}
    for cfg in getattr(model, "lorakit_configs", {}).values():
        for key in bias_keys(model, cfg.bias, state):
            out[key.replace(".base_layer.", ".")] = state[key].detach().float().clone()
    return out


def _untie_head(model: torch.nn.Module, out: dict[str, torch.Tensor]) -> None:
    """A head tied to changed embeddings keeps the base embeddings: it is written as its own tensor."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    weight = getattr(head, "weight", None)  # a modules_to_save wrapper has none: it is its own tensor already
    if weight is None or weight is not getattr(embed, "weight", None):
        return
    names = {id(m): n for n, m in model.named_modules()}
    head_name, embed_name = f"{names[id(head)]}.weight", f"{names[id(embed)]}.weight"
    if embed_name in out and head_name not in out:
        out[head_name] = weight.detach().float().clone()


def gguf_source(base: str) -> Path | None:
    """The GGUF file behind a base spec (a .gguf path, or the embedded model under any of its names, its
    hub id included, which adapters trained on it record), else None."""
    from ..models.load import EMBEDDED_HUB_ID, base_model_id, resolve_embedded_gguf

    path = Path(base).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    return resolve_embedded_gguf() if base_model_id(base) == EMBEDDED_HUB_ID else None


def _gguf_updates(config, arch, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged tensors under GGUF names, in GGUF row order."""
    names = TensorNames(arch, config.num_hidden_layers)
    updates = {}
    for hf_name, w in weights.items():
        g = names.param(hf_name)
        if g is None:
            raise GgufExportError(f"{hf_name}: the merged model changes a tensor llama.cpp's {arch.name} layout "
                                  "has no name for")
        heads = qk_heads(g, config, arch)
        updates[g] = permute_rows(w, heads) if heads is not None else w
    return updates


def _write_from_gguf(source: Path, arch, updates: dict, out, outtype: str | None, add_to_base: bool = False) -> dict:
    """Copy ``source`` with ``updates`` (GGUF names → tensors, or callables making them) replacing its tensors,
    or added to them (``add_to_base``)."""
    gguf = gguf_module()
    reader = gguf.GGUFReader(source)
    if _field(reader, "general.architecture") != arch.name:
        raise GgufExportError(f"{source}: general.architecture is {_field(reader, 'general.architecture')!r}, "
                              f"but the model's config says {arch.name!r}")
    existing = {t.name: t for t in reader.tensors}
    for name, w in updates.items():
        t = existing.get(name)
        if t is None and name != "output.weight":  # a tied head, untied by the merge, is the one new tensor
            raise GgufExportError(f"{source}: has no tensor {name!r} for the merged weight; is it the adapter's base?")
        if t is not None and tuple(int(n) for n in reversed(t.shape)) != tuple(w.shape):
            raise GgufExportError(f"{source}: tensor {name} is {tuple(reversed(t.shape))} but the merged weight is "
                                  f"{tuple(w.shape)}; is it the adapter's base?")
    alignment = _field(reader, "general.alignment")
    types: dict[str, str] = {}

    def fill(writer) -> None:
        _copy_fields(reader, writer)
        for t in tqdm(reader.tensors, desc="writing GGUF", unit="tensor", file=sys.stderr):
            if t.name in updates:
                w = updates.pop(t.name)  # one merged tensor alive at a time before encoding
                w = w() if callable(w) else w
                if add_to_base:
                    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) + w
                _add(writer, t.name, w, _chosen(outtype, t.tensor_type.name), types)
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        for name in added:
            _add(writer, name, updates.pop(name),
                 outtype or _chosen(None, existing["token_embd.weight"].tensor_type.name), types)

    added = sorted(set(updates) - set(existing))
    count = len(updates)
    write_file(out, arch.name, fill, alignment=alignment)
    return {"adapted": count, "types": types, "added": added}


def _chosen(outtype: str | None, base_type: str) -> str:
    """The type an adapted tensor is written at: the one asked for, else its float type, else f16."""
    return outtype or _FLOAT_TYPES.get(base_type, "f16")


def _add(writer, name: str, w: torch.Tensor, outtype: str, types: dict[str, str]) -> None:
    data, qtype = encode(w, outtype)
    writer.add_tensor(name, data, raw_dtype=qtype)
    types[name] = qtype.name


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _copy_fields(reader, writer) -> None:
    """Every metadata key of ``reader`` into ``writer`` with its type (strings as raw bytes)."""
    vt = gguf_module().GGUFValueType
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the header's own counts, and the key the writer sets itself
        main = field.types[0]
        if main == vt.ARRAY:
            sub = field.types[-1]
            if sub == vt.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
            if len(value) == 0:
                continue  # the writer cannot write an empty array; it carries nothing
            writer.add_key_value(key, value, main, sub)
        elif main == vt.STRING:
            writer.add_key_value(key, bytes(field.parts[-1]), main)
        else:
            writer.add_key_value(key, field.contents(), main)
