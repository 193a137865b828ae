"""Turn a full fine-tune into a LoRA adapter: truncated SVD of each Linear's ΔW, saved in PEFT's format.

    ΔW = W_tuned − W_base = U·S·Vᵀ  ──►  B = U_r·sqrt(S_r),  A = sqrt(S_r)·V_rᵀ,  lora_alpha = r (scaling 1)

By Eckart–Young, B·A is the best rank-r approximation of ΔW in Frobenius norm; its relative error
is sqrt(1 − energy kept). Tensors LoRA on Linear layers cannot carry (norms, biases, embeddings)
are listed with their relative change, not silently dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, ModelLoadError, ShapeMismatchError
from ..models.modeldir import WeightDir, paired_keys
from .svd import energy_at, natural_key, rank_for_energy


@dataclass
class ExtractedModule:
    """One module's extracted factors, as reported.

    Args:
        name: module path.
        r: rank kept.
        energy: fraction of ‖ΔW‖_F² the rank-r factors keep.
        rel_error: ‖ΔW − B·A‖_F / ‖ΔW‖_F, measured on the saved float32 factors.
    """

    name: str
    r: int
    energy: float
    rel_error: float


@dataclass
class Extraction:
    """What extract_into did: modules adapted, and changed tensors LoRA could not carry (name → ‖Δ‖/‖W‖)."""

    modules: list[ExtractedModule]
    not_extracted: dict[str, float | None] = field(default_factory=dict)
    unchanged: int = 0


def svd_factors(delta: torch.Tensor, r: int | None = None, energy: float | None = None):
    """Truncated SVD of ``delta`` (out, in) as LoRA factors with scaling 1.

    Args:
        delta: the weight update, laid out (out, in).
        r: rank to keep (capped at min(out, in)); or
        energy: keep the smallest rank holding this fraction of ‖delta‖_F².

    Returns:
        (B (out, k), A (k, in), singular values (all of them, descending)).
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(r, len(s)) if r is not None else rank_for_energy(s, energy)
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], s


def _check_choice(r: int | None, energy: float | None) -> None:
    if (r is None) == (energy is None):
        raise ConfigError("give exactly one of r (a fixed rank) or energy (a fraction of ‖ΔW‖² per module)")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ConfigError(f"r must be an integer >= 1, got {r!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ConfigError(f"energy must be a fraction in (0, 1], got {energy!r}")


def _linear_modules(model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """Module path → (module, is_conv1d) for the Linear (and Conv1D) layers LoRA can wrap."""
    from ..lora.inject import candidate_modules, module_kind

    return {n: (m, module_kind(m) == "conv1d") for n, m in candidate_modules(model).items()
            if module_kind(m) in ("linear", "conv1d")}


def _relative_change(w: torch.Tensor, delta: torch.Tensor) -> float | None:
    norm = float(w.norm())
    return float(delta.norm()) / norm if norm else None


def _factorise_all(model, b: WeightDir, t: WeightDir, r, energy, progress):
    """SVD every changed Linear weight; returns ({name: (B, A)}, Extraction)."""
    linear = _linear_modules(model)
    factors, report = {}, Extraction([])
    for key in tqdm(sorted(paired_keys(b, t), key=natural_key), desc="extract", disable=not progress,
                    dynamic_ncols=True):
        w = b.get(key)
        delta = t.get(key) - w
        name = key.removesuffix(".weight")
        if not bool(delta.any()):
            report.unchanged += 1
            continue
        if name not in linear or not key.endswith(".weight"):
            report.not_extracted[key] = _relative_change(w, delta)
            continue
        module, conv1d = linear[name]
        if tuple(module.weight.shape) != tuple(delta.shape):
            raise ShapeMismatchError(f"module {name!r} of the model is {tuple(module.weight.shape)} but {key!r} in "
                                     f"{b.path} is {tuple(delta.shape)}; pass the model that {b.path} holds")
        delta = delta.T if conv1d else delta  # LoRA's B·A is laid out (out, in)
        fb, fa, s = svd_factors(delta, r, energy)
        err = float((delta.double() - fb.double() @ fa.double()).norm() / delta.double().norm())
        factors[name] = (fb, fa)
        report.modules.append(ExtractedModule(name, fa.shape[0], energy_at(s, fa.shape[0]), err))
    if not factors:
        raise ModelLoadError(f"tuned {t.path} does not differ from base {b.path} in any Linear weight; "
                             "there is nothing to extract")
    return factors, report


def extract_into(model: nn.Module, base: str | Path, tuned: str | Path, *, r: int | None = None,
                 energy: float | None = None, adapter_name: str = "default", progress: bool = True) -> Extraction:
    """Add adapter ``adapter_name`` to ``model`` (the base) holding the truncated SVD of each Linear's ΔW.

    Every module gets lora_alpha = its rank, so scaling is 1 and B·A is ΔW's approximation itself;
    ranks that differ between modules go into rank_pattern / alpha_pattern.

    Args:
        model: the base model, loaded from ``base``.
        base: base checkpoint (directory, .gguf or the embedded default).
        tuned: fine-tuned checkpoint directory of the same architecture.
        r: fixed rank (capped per module at min(out, in)); or
        energy: per module, the smallest rank keeping this fraction of ‖ΔW‖_F².
        adapter_name: name of the new adapter.
        progress: show a tqdm bar.
    """
    from ..lora.config import LoraConfig
    from ..lora.inject import inject
    from ..models.load import base_model_id

    _check_choice(r, energy)
    b, t = WeightDir(base), WeightDir(tuned)
    factors, report = _factorise_all(model, b, t, r, energy, progress)
    ranks = {m.name: m.r for m in report.modules}
    common = Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(n): k for n, k in ranks.items() if k != common}
    linear = _linear_modules(model)
    cfg = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(ranks), rank_pattern=odd,
                     alpha_pattern=dict(odd), fan_in_fan_out=any(linear[n][1] for n in ranks),
                     base_model_name_or_path=base_model_id(str(base)), task_type="CAUSAL_LM")
    inject(model, cfg, adapter_name)
    with torch.no_grad():
        for name, (fb, fa) in factors.items():
            layer = model.get_submodule(name)
            layer.lora_A[adapter_name].weight.copy_(fa)
            layer.lora_B[adapter_name].weight.copy_(fb)
    return report


def _eval_set(data: str, tokenizer, max_seq_len: int):
    from ..data.readers import read_records
    from ..data.tasks import task_names, task_path
    from ..data.tokenize import tokenize_examples

    path = Path(data) if Path(data).exists() or data not in task_names() else task_path(data, "valid")
    return tokenize_examples(read_records(path), tokenizer, max_seq_len)


def extract(base: str, tuned: str, out: str | Path, *, r: int | None = None, energy: float | None = None,
            data: str | None = None, batches: int = 4, batch_size: int = 8, max_seq_len: int = 128,
            progress: bool = True) -> dict:
    """Extract a PEFT-format adapter from base + tuned, save it to ``out``, and report how good it is.

    Args:
        base: base model spec (directory, .gguf or the embedded default).
        tuned: fine-tuned model directory (e.g. ``lorakit train --full``'s out/model).
        out: adapter directory to write.
        r: fixed rank; or
        energy: per-module energy to keep (exactly one of the two).
        data: JSONL file or packaged task (its valid split): eval loss of base, tuned and base+adapter.
        batches: how many batches of ``data`` to evaluate.
        batch_size: examples per batch.
        max_seq_len: token limit per example.
        progress: show tqdm bars.

    Returns:
        {"out", "modules": [per module r, energy, rel_error], "not_extracted", "adapter_params",
        "eval_loss": {"base", "tuned", "extracted"} or None}
    """
    from ..lora.io import save_adapter
    from ..models.load import load_model
    from ..train.evaluate import eval_loss

    _check_choice(r, energy)
    model, tokenizer = load_model(base, tokenizer=bool(data))  # only --data needs one
    dataset = _eval_set(data, tokenizer, max_seq_len) if data else None
    losses = {}
    if dataset is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        losses["base"] = eval_loss(model, dataset, batch_size, pad, batches)
    report = extract_into(model, base, tuned, r=r, energy=energy, progress=progress)
    save_adapter(model, out)
    params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    if dataset is not None:
        losses["extracted"] = eval_loss(model, dataset, batch_size, pad, batches)
        del model
        tuned_model, _ = load_model(tuned, tokenizer=False)
        losses["tuned"] = eval_loss(tuned_model, dataset, batch_size, pad, batches)
    return {"out": str(out), "modules": [asdict(m) for m in report.modules], "adapter_params": params,
            "not_extracted": report.not_extracted, "unchanged": report.unchanged,
            "eval_loss": losses or None}


def format_extract(result: dict) -> str:
    """A short text report of :func:`extract`'s result."""
    mods = result["modules"]
    ranks = sorted(m["r"] for m in mods)
    errs = [m["rel_error"] for m in mods]
    lines = [f"wrote {result['out']}: {len(mods)} modules, rank {ranks[0]}..{ranks[-1]} "
             f"(median {ranks[len(ranks) // 2]}), {result['adapter_params']:,} parameters",
             f"relative Frobenius error |dW - B·A| / |dW|: mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}"]
    if result["not_extracted"]:
        rel = [v for v in result["not_extracted"].values() if v is not None]
        lines.append(f"changed but not representable by LoRA on Linear layers: {len(result['not_extracted'])} "
                     f"tensors ({', '.join(list(result['not_extracted'])[:4])}"
                     f"{', ...' if len(result['not_extracted']) > 4 else ''})"
                     + (f"; largest relative change {max(rel):.4f}" if rel else ""))
    if result["eval_loss"]:
        ev = result["eval_loss"]
        lines.append(f"eval loss: base {ev['base']:.4f}, tuned {ev['tuned']:.4f}, base+extracted {ev['extracted']:.4f}")
    return "\n".join(lines)
