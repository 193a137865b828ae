"""Exact LoRA parameter counts and adapter file sizes, without downloading or allocating weights.

The model is built on the meta device (shapes, no memory) from a preset, a ``config.json`` or any
model spec, and the adapted modules come from :func:`lorakit.inject.plan_injection`: the same code
``inject`` runs before training, so the count printed here is the count training gets.

    spec ──► transformers config ──► model on "meta" ──► plan_injection ──► per-module table, bytes
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError
from ..lora.config import LoraConfig
from ..lora.inject import Target, candidate_modules, lora_param_count, plan_injection
from ..models.dtype import parse_dtype

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_META_STAT = 0.012345  # stands in for a mean |W| on the meta device: 6 decimals, the usual width


# ---- model specs ----------------------------------------------------------------------------------

def preset_names() -> list[str]:
    """Names of the architectures shipped as config.json files (``lorakit count llama-2-7b``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_spec_config(spec: str):
    """The transformers config of a preset name, a ``config.json`` path, or a model spec.

    Args:
        spec: a preset (see :func:`preset_names`), a path to a config.json file, or anything
            :func:`lorakit.models.load_config` accepts (embedded default, model directory, .gguf, hub id).

    Raises:
        ModelLoadError: the file cannot be read by transformers (its error is quoted), or the spec
            is neither a preset nor a model spec (the presets are listed).
    """
    from transformers import AutoConfig

    if spec in preset_names():
        return AutoConfig.from_pretrained(str(PRESET_DIR / f"{spec}.json"))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path}: transformers cannot read this config.json "
                                 f"({type(exc).__name__}: {exc})") from exc
    from ..models.load import load_config

    try:
        return load_config(spec)
    except ModelLoadError as exc:
        if path.exists() or "/" in spec:
            raise
        close = difflib.get_close_matches(spec, preset_names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"{spec!r} is not a preset nor a model spec.{hint} Presets: "
                             f"{', '.join(preset_names())}.\n{exc}") from exc


def build_meta_model(config) -> nn.Module:
    """The model a config describes, built on the meta device (no memory, no weights).

    The class is the config's first ``architectures`` entry when transformers has it (what the
    checkpoint was saved as), else the causal-LM class for the config type, else the bare model.
    """
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    classes = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
    with torch.device("meta"):
        for cls in classes:
            if cls is not None:
                return cls(config)
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def meta_model(spec: str) -> nn.Module:
    """Build ``spec``'s architecture (preset | config.json | model spec | a ``MODULE:FUNCTION`` builder) on
    the meta device; a builder runs under ``torch.device("meta")`` (one that picks its own device keeps it)."""
    from ..models.custom import is_custom_spec, load_custom

    if is_custom_spec(spec):
        with torch.device("meta"):
            return load_custom(spec)[0]
    return build_meta_model(load_spec_config(spec))


# ---- counts ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleGroup:
    """Adapted modules that share a role (path with layer indices as ``*``), shape and rank."""

    pattern: str
    kind: str
    shape: tuple[int, int]
    r: int
    count: int
    use_dora: bool = False

    @property
    def each(self) -> int:
        """r·(d + k) for one module (+ d for DoRA's magnitude)."""
        return lora_param_count(self.r, self.shape, self.use_dora)

    @property
    def subtotal(self) -> int:
        return self.each * self.count


@dataclass
class CountReport:
    """What an adapter costs in parameters and bytes. ``total`` includes the adapter, as PEFT counts."""

    targets: list[Target]
    base: int
    trainable: int
    saved: dict[str, tuple[int, ...]] = field(repr=False)  # PEFT file key → shape
    metadata: dict[str, str] = field(repr=False)
    header_exact: bool = True  # False on the meta device: the file records mean |W| of 8 base weights

    @property
    def total(self) -> int:
        return self.base + self.trainable

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0

    @property
    def groups(self) -> list[ModuleGroup]:
        return group_targets(self.targets)

    def adapter_bytes(self) -> dict[str, dict[str, int]]:
        """{dtype: {"payload", "header", "file"}} of adapter_model.safetensors at fp32/fp16/bf16."""
        return {dtype: safetensors_size(self.saved, dtype, self.metadata) for dtype in DTYPE_BYTES}

    def to_dict(self) -> dict:
        """The ``--json`` document."""
        return {"trainable": self.trainable, "total": self.total, "base": self.base, "percent": self.percent,
                "modules": [{"pattern": g.pattern, "kind": g.kind, "shape": list(g.shape), "r": g.r,
                             "count": g.count, "each": g.each, "subtotal": g.subtotal} for g in self.groups],
                "adapter_bytes": self.adapter_bytes(), "header_exact": self.header_exact}


def group_targets(targets: list[Target]) -> list[ModuleGroup]:
    """Targets grouped by role (layer indices replaced by ``*``), kind, shape and r, in model order."""
    counts: dict[tuple, int] = {}
    for t in targets:
        key = (re.sub(r"\.\d+(?=\.|$)", ".*", t.name), t.kind, t.shape, t.r, t.use_dora)
        counts[key] = counts.get(key, 0) + 1
    return [ModuleGroup(*key[:4], n, key[4]) for key, n in counts.items()]


def count_model(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default") -> CountReport:
    """Count what ``inject(model, cfg)`` would add, without changing ``model``.

    Args:
        model: any model, on the meta device or with weights (then the adapter file header is exact).
        cfg: the LoRA config; modules_to_save copies count as trainable, as in PEFT.
        adapter_name: the adapter name the file keys would be built from.

    Raises:
        TargetError: a target matches nothing, or r exceeds a module's smaller dimension (named).
    """
    from ..lora.io import FORMAT_VERSION, base_fingerprint, to_peft_key

    targets = plan_injection(model, cfg)
    saved: dict[str, tuple[int, ...]] = {}
    for t in targets:
        a, b = ("lora_embedding_A", "lora_embedding_B") if t.kind == "embedding" else ("lora_A", "lora_B")
        suffix = "" if t.kind == "embedding" else ".weight"
        a_shape, b_shape = (t.r, t.shape[1]), (t.shape[0], t.r)
        if t.kind == "conv":  # PEFT's conv factors: A (r, in, kernel), B (out, r, 1)
            conv = model.get_submodule(t.name)
            a_shape, b_shape = (t.r, conv.in_channels, conv.kernel_size[0]), (t.shape[0], t.r, 1)
        saved[to_peft_key(f"{t.name}.{a}.{adapter_name}{suffix}", adapter_name)] = a_shape
        saved[to_peft_key(f"{t.name}.{b}.{adapter_name}{suffix}", adapter_name)] = b_shape
        if t.use_dora:
            saved[to_peft_key(f"{t.name}.lora_magnitude_vector.{adapter_name}", adapter_name)] = (t.shape[0],)
    biases = _trained_biases(model, cfg.bias, targets)
    saved.update({to_peft_key(k, adapter_name): tuple(p.shape) for k, p in biases.items()})
    copies = _modules_to_save(model, cfg.modules_to_save or [])
    for path, module in copies.items():
        for key, tensor in module.state_dict().items():
            saved[to_peft_key(f"{path}.modules_to_save.{adapter_name}.{key}", adapter_name)] = tuple(tensor.shape)
    tokens = _trainable_tokens(model, cfg)
    saved.update({to_peft_key(f"{path}.trainable_tokens_delta.{adapter_name}", adapter_name): shape
                  for path, shape in tokens.items()})
    trainable = sum(t.lora_params for t in targets) + sum(
        p.numel() for m in copies.values() for p in m.parameters()) + sum(p.numel() for p in biases.values()) + sum(
        rows * dim for rows, dim in tokens.values())
    stats = _base_stats(model, targets)
    metadata = {"format": "pt", "lorakit_format_version": FORMAT_VERSION,
                "lorakit_base_fingerprint": base_fingerprint(model),
                "lorakit_base_stats": json.dumps({k: _META_STAT if v is None else v for k, v in stats.items()})}
    base = sum(p.numel() for p in model.parameters())
    return CountReport(targets, base, trainable, saved, metadata, None not in stats.values())


def _trained_biases(model: nn.Module, bias: str, targets: list[Target]) -> dict[str, nn.Parameter]:
    """The biases ``bias`` ("all" | "lora_only") trains, under the keys they have once the model is adapted."""
    if bias == "none":
        return {}
    adapted = {t.name for t in targets}
    out = {}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if name.endswith(".bias") and (bias == "all" or owner in adapted):
            out[f"{owner}.base_layer.bias" if owner in adapted else name] = p
    return out


def _trainable_tokens(model: nn.Module, cfg: LoraConfig) -> dict[str, tuple[int, int]]:
    """{embedding path: (rows, dim)} that trainable_token_indices trains."""
    from ..lora.tokens import token_targets

    if not cfg.trainable_token_indices:
        return {}
    found = token_targets(model, cfg.trainable_token_indices, candidate_modules(model))
    return {path: (len(ids), model.get_submodule(path).embedding_dim) for path, ids in found.items()}


def count_spec(spec: str, cfg: LoraConfig) -> CountReport:
    """:func:`count_model` on ``spec``'s architecture built on the meta device."""
    return count_model(meta_model(spec), cfg)


def _modules_to_save(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = candidate_modules(model)
    return {n: m for entry in names for n, m in modules.items() if n == entry or n.endswith("." + entry)}


def _base_stats(model: nn.Module, targets: list[Target]) -> dict[str, float | None]:
    """The mean |W| of the first 8 adapted base weights, as io.save_adapter records them (None on meta)."""
    out = {}
    for t in targets[:8]:
        w = model.get_submodule(t.name).weight
        out[t.name] = None if w.is_meta else round(float(w.detach().float().abs().mean()), 6)
    return out


def shape_count(d: int, k: int, r: int) -> dict[str, float]:
    """The formula view for one d×k matrix: full d·k vs LoRA r·(d + k) (A is r×k, B is d×r).

    Raises:
        ConfigError: a dimension is < 1, or r exceeds min(d, k) (the rank of a d×k matrix).
    """
    if min(d, k) < 1 or r < 1:
        raise ConfigError(f"--shape {d}x{k} with r={r}: dimensions and r must be >= 1")
    if r > min(d, k):
        which = "d (out)" if d <= k else "k (in)"
        raise ConfigError(f"r={r} is larger than the {d}x{k} matrix allows: {which} is {min(d, k)}, "
                          f"so r must be <= {min(d, k)}")
    lora = r * (d + k)
    return {"d": d, "k": k, "r": r, "full": d * k, "lora": lora, "ratio": lora / (d * k)}


def parse_shape(text: str) -> tuple[int, int]:
    """'4096x4096' (or '4096,11008') → (d, k); a ConfigError for anything else."""
    parts = re.split(r"[x×,*]", str(text).strip().lower())
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--shape {text!r}: expected DxK, the out and in dimensions, e.g. 4096x11008")
    return int(parts[0]), int(parts[1])


# ---- the adapter file -----------------------------------------------------------------------------

def safetensors_size(shapes: dict[str, tuple[int, ...]], dtype: str,
                     metadata: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes of a safetensors file holding tensors of these shapes, all of ``dtype``.

    Mirrors the format: an 8-byte length, a JSON header (``__metadata__`` then each tensor's dtype,
    shape and data offsets, tensors sorted by name, space-padded to a multiple of 8), then the data.

    Args:
        shapes: tensor name → shape.
        dtype: "float32", "float16" or "bfloat16" (or a short name: "bf16").
        metadata: the string→string ``__metadata__`` block, if any.
    """
    dtype = parse_dtype(dtype)  # short names too: bf16, fp16, fp32
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(shapes):
        n = DTYPE_BYTES[dtype] * _numel(shapes[name])
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    padded = text + (-text) % 8
    return {"payload": offset, "header": 8 + padded, "file": 8 + padded + offset}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- text -----------------------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def format_count(report: CountReport, title: str = "") -> str:
    """The ``lorakit count`` table: one line per module role, totals, adapter file sizes."""
    groups = report.groups
    width = max([len(g.pattern) for g in groups] + [6])
    lines = [title] if title else []
    lines.append(f"{'module':<{width}}  {'kind':<9} {'d x k':>13} {'r':>4} {'count':>6} {'r·(d+k)':>11} {'subtotal':>13}")
    for g in groups:
        shape = f"{g.shape[0]}x{g.shape[1]}"
        lines.append(f"{g.pattern:<{width}}  {g.kind:<9} {shape:>13} {g.r:>4} {g.count:>6} {g.each:>11,} "
                     f"{g.subtotal:>13,}")
    lines.append(f"trainable {report.trainable:,} of {report.total:,} parameters = {report.percent:.4f}% "
                 f"(base {report.base:,}; {len(report.targets)} adapted modules)")
    lines.append(f"{'adapter_model.safetensors':<26} {'payload':>16} {'header':>10} {'file':>16}")
    for dtype, s in report.adapter_bytes().items():
        lines.append(f"  {dtype:<24} {s['payload']:>14,} B {s['header']:>8,} B {s['file']:>14,} B  "
                     f"{_size(s['file'])}")
    if not report.header_exact:
        lines.append("  (meta device: the header records the mean |W| of 8 base weights; their digits are "
                     "assumed 8 characters wide, so the header may differ by a few bytes)")
    return "\n".join(lines)


def format_shape(view: dict[str, float]) -> str:
    """The ``lorakit count --shape DxK`` line."""
    return (f"{view['d']}x{view['k']} matrix: full {view['full']:,} parameters; LoRA r={view['r']}: "
            f"A {view['r']}x{view['k']} + B {view['d']}x{view['r']} = r·(d+k) = {view['lora']:,} "
            f"({100 * view['ratio']:.2f}% of full)")
