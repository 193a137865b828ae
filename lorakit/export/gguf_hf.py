"""A whole transformers model (with merged weights) as a GGUF file, for a base that is not a GGUF.

The hyper-parameters go under llama.cpp's keys for the architecture, the tokenizer as a byte-level
BPE vocabulary ("gpt2" in llama.cpp's terms: tokens, token types, merges, special ids, chat
template), and the weights in llama.cpp's names and q/k row order. Other tokenizer kinds
(SentencePiece) and RoPE scalings that need extra tensors are refused with the way out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .gguf_format import (
    GgufExportError,
    TensorNames,
    arch_of,
    encode,
    file_type,
    gguf_module,
    permute_rows,
    qk_heads,
    write_file,
)

# llama.cpp's pre-tokenizer names for the byte-level BPE vocabularies lorakit recognises; any other
# gets "default" (llama.cpp's GPT-2 regex), which can split text differently from transformers.
_PRE_BY_VOCAB = {("llama", 128256): "llama-bpe", ("llama", 49152): "smollm"}
_PRE_BY_TYPE = {"qwen2": "qwen2", "qwen3": "qwen2"}
_DTYPES = {"float16": "f16", "bfloat16": "bf16"}


def write_hf_gguf(base: str, model: torch.nn.Module, tokenizer, weights: dict[str, torch.Tensor],
                  out: str | Path, outtype: str | None) -> dict:
    """Write ``model`` (its merged ``weights`` overriding its own) and ``tokenizer`` as one GGUF file.

    Args:
        base: the transformers directory the model came from (its tokenizer files are read).
        model: the loaded model (LoRA wrappers are looked through).
        tokenizer: its tokenizer; must be a byte-level BPE one.
        weights: {parameter name: merged tensor} (see gguf_merged.merged_weights).
        out: the .gguf file.
        outtype: type of the 2-D tensors; None: the directory's dtype (f32 when unknown).
    """
    config = model.config
    arch = arch_of(config)
    _refuse_rope_scaling(config)
    vocab = _bpe_vocab(base, tokenizer, config)
    outtype = outtype or _saved_dtype(base)
    tensors = _gguf_tensors(model, weights, config, arch)
    types: dict[str, str] = {}

    def fill(writer) -> None:
        _add_hparams(writer, config, base, outtype)
        _add_vocab(writer, vocab, base, config)
        for name, t in tqdm(tensors.items(), desc="encoding", unit="tensor", file=sys.stderr, leave=False):
            data, qtype = encode(t, outtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
            types[name] = qtype.name

    write_file(out, arch.name, fill)
    changed = _changed(weights, config, arch)
    return {"adapted": len(weights), "types": {k: v for k, v in types.items() if k in changed},
            "added": [], "pre_tokenizer": vocab["pre"]}


def _saved_dtype(base: str) -> str:
    """The outtype matching the dtype the directory's weights were saved in (f32 when it does not say)."""
    try:
        saved = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "f32"
    return _DTYPES.get(str(saved.get("dtype") or saved.get("torch_dtype") or ""), "f32")


def _changed(weights, config, arch) -> set[str]:
    names = TensorNames(arch, config.num_hidden_layers)
    return {names.param(n) for n in weights}


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under plain names (LoRA wrappers and copies looked through)."""
    out = {}
    for name, t in model.state_dict().items():
        if any(f".{p}." in name or name.endswith(f".{p}") for p in ("lora_A", "lora_B", "lora_embedding_A",
                                                                       "lora_embedding_B", "modules_to_save")):
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = t
    return out


def _gguf_tensors(model, weights, config, arch) -> dict[str, torch.Tensor]:
    names = TensorNames(arch, config.num_hidden_layers)
    state = {**_plain_state(model), **weights}
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in weights:
        state.pop("lm_head.weight", None)  # tied and unchanged: llama.cpp reuses token_embd
    out = {}
    for hf_name, t in state.items():
        g = names.param(hf_name)
        if g is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise GgufExportError(f"{hf_name}: no tensor of that role in llama.cpp's {arch.name} layout")
        heads = qk_heads(g, config, arch)
        out[g] = permute_rows(t, heads) if heads is not None else t
    return out


def _refuse_rope_scaling(config) -> None:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in (None, "default"):
        raise GgufExportError(f"the base uses RoPE scaling {kind!r}, which llama.cpp needs extra tensors for that "
                              "lorakit does not write. Convert the base with llama.cpp's convert_hf_to_gguf.py and "
                              "pass that .gguf as --base: lorakit then copies it and rewrites only adapted tensors.")


def _bpe_vocab(base: str, tokenizer, config) -> dict:
    """Tokens, token types and pre-tokenizer name of a byte-level BPE tokenizer, or a clear refusal."""
    path = Path(base) / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise GgufExportError(f"{base}: the tokenizer is not a byte-level BPE one (tokenizer.json model "
                              f"{model_type!r}); lorakit writes only those into GGUF. Convert the base with "
                              "llama.cpp's convert_hf_to_gguf.py and pass that .gguf as --base.")
    gguf = gguf_module()
    tt = gguf.TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(tt.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(tt.CONTROL if added[i].special else tt.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(tt.NORMAL)
    pre = _PRE_BY_TYPE.get(config.model_type) or _PRE_BY_VOCAB.get((config.model_type, config.vocab_size), "default")
    if pre == "default":
        print(f"lorakit: {base}: unknown BPE pre-tokenizer; writing llama.cpp's 'default' one, which may split "
              "text differently from transformers (token ids given directly are unaffected)", file=sys.stderr)
    return {"tokens": tokens, "types": types, "pre": pre}


def _add_vocab(writer, vocab: dict, base: str, config) -> None:
    gguf = gguf_module()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    gguf.SpecialVocab(base, load_merges=True, n_vocab=config.vocab_size).add_to_gguf(writer, quiet=True)


def _add_hparams(writer, config, base: str, outtype: str) -> None:
    gguf = gguf_module()
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(Path(base).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def model_to_gguf(base: str, out: str | Path, outtype: str | None = None) -> dict:
    """Write the transformers directory ``base`` (no adapter) as a GGUF model file.

    Args:
        base: a transformers model directory (safetensors weights, byte-level BPE tokenizer).
        out: the .gguf file.
        outtype: f32, f16, bf16 or q8_0 for the 2-D tensors; None: the directory's dtype.
    """
    from ..models.load import load_model

    model, tokenizer = load_model(base)
    return write_hf_gguf(base, model, tokenizer, {}, out, outtype)
