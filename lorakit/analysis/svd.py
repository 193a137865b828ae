"""How low-rank is a weight update? The singular values of ΔW, per module, from an adapter or two checkpoints.

For an adapter ΔW = scaling·B·A, the spectrum comes from two thin QR factorisations and an r×r SVD,
in O((d+k)·r²), without ever forming the d×k matrix. For a full fine-tune ΔW = W_tuned − W_base is
read tensor by tensor from the two safetensors checkpoints and reduced with ``torch.linalg.svdvals``.

Per module, with σ₁ ≥ σ₂ ≥ … the singular values of ΔW:

- energy at k: Σ_{i≤k} σᵢ² / Σ_i σᵢ², the fraction of ‖ΔW‖_F² that the best rank-k approximation keeps;
- k for p (p = 0.90, 0.95, 0.99): the smallest k whose energy is at least p;
- stable rank: ‖ΔW‖_F² / ‖ΔW‖₂² = Σ σᵢ² / σ₁²;
- effective rank (Roy & Vetterli, 2007): exp(H(p)) with pᵢ = σᵢ / Σⱼ σⱼ and H(p) = −Σ pᵢ ln pᵢ
  (natural log; terms with σᵢ = 0 contribute 0). It is 1 for a rank-one ΔW and n for n equal σᵢ;
- relative norm: ‖ΔW‖_F / ‖W_base‖_F (needs the base weights).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import AdapterFormatError, ConfigError, ShapeMismatchError
from ..lora.config import scaling_of
from ..models.modeldir import WeightDir, paired_keys

ENERGY_KS = (1, 2, 4, 8, 16, 32, 64)
THRESHOLDS = (0.90, 0.95, 0.99)
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


# ---- spectra and the numbers read from them ---------------------------------------------------

def lowrank_singular_values(b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values of scaling·B·A (B: (d, r), A: (r, k)) without forming the d×k product.

    B = Q_b·R_b and Aᵀ = Q_a·R_a (thin QR), so B·A = Q_b·(R_b·R_aᵀ)·Q_aᵀ with orthonormal Q's and
    σ(B·A) = σ(R_b·R_aᵀ), an r×r SVD. Cost O((d+k)·r²).

    Args:
        b: the (d, r) factor.
        a: the (r, k) factor.
        scaling: the factor on B·A (alpha / r for LoRA).

    Returns:
        float64 singular values, descending, min(d, k, r) of them.
    """
    _, r_b = torch.linalg.qr(b.double())  # (min(d, r), r)
    _, r_a = torch.linalg.qr(a.double().T)  # (min(k, r), r)
    return torch.linalg.svdvals(r_b @ r_a.T) * abs(scaling)


def energy_at(s: torch.Tensor, k: int) -> float:
    """Fraction of Σσ² held by the top ``k`` singular values (1.0 when k ≥ len(s))."""
    sq = s.double() ** 2
    return float(sq[:k].sum() / sq.sum())


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest k with energy_at(s, k) ≥ ``energy`` (0 < energy ≤ 1)."""
    if not 0 < energy <= 1:
        raise ConfigError(f"energy must be a fraction in (0, 1], got {energy!r}")
    sq = s.double() ** 2
    cum = torch.cumsum(sq, 0) / sq.sum()
    return int((cum >= energy - 1e-12).nonzero()[0]) + 1


def stable_rank(s: torch.Tensor) -> float:
    """Σσ² / σ₁²."""
    s = s.double()
    return float((s**2).sum() / s.max() ** 2)


def effective_rank(s: torch.Tensor) -> float:
    """exp(−Σ pᵢ ln pᵢ) with pᵢ = σᵢ / Σσ (Roy & Vetterli); zero σᵢ are left out."""
    s = s.double()
    p = s[s > 0] / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


# ---- per module and aggregated -----------------------------------------------------------------

@dataclass
class ModuleStats:
    """The spectrum of one module's ΔW and the numbers read from it.

    Args:
        name: module path (``model.layers.3.self_attn.q_proj``).
        shape: ΔW's shape as stored.
        singular_values: float64, descending, not all zero.
        base_norm: ‖W_base‖_F, when the base weights were given.
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    base_norm: float | None = None

    @property
    def module_type(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def layer(self) -> int | None:
        match = _LAYER.search(self.name)
        return int(match.group(1)) if match else None

    @property
    def delta_norm(self) -> float:
        return float(self.singular_values.double().pow(2).sum().sqrt())

    def rank_for_energy(self, energy: float) -> int:
        return rank_for_energy(self.singular_values, energy)

    def summary(self) -> dict:
        """The numbers of this module: energies, k for 90/95/99%, ranks, norms."""
        s = self.singular_values
        rel = self.delta_norm / self.base_norm if self.base_norm else None
        return {"energy": {k: energy_at(s, k) for k in ENERGY_KS},
                **{f"k{round(100 * p)}": rank_for_energy(s, p) for p in THRESHOLDS},
                "stable_rank": stable_rank(s), "effective_rank": effective_rank(s),
                "delta_norm": self.delta_norm, "base_norm": self.base_norm, "relative_norm": rel}

    def to_dict(self, max_values: int = 64) -> dict:
        """JSON-ready record; ``max_values`` caps the singular values listed (0: all)."""
        values = self.singular_values[:max_values] if max_values else self.singular_values
        return {"name": self.name, "type": self.module_type, "layer": self.layer, "shape": list(self.shape),
                **self.summary(), "singular_values": [float(v) for v in values]}


def _aggregate(summaries: list[dict]) -> dict:
    """Mean energies and ranks, median k's, over modules' summaries."""
    def mean(key):
        values = [s[key] for s in summaries]
        return None if any(v is None for v in values) else statistics.fmean(values)

    return {"modules": len(summaries),
            "energy": {k: statistics.fmean(s["energy"][k] for s in summaries) for k in ENERGY_KS},
            **{f"k{round(100 * p)}": statistics.median(s[f"k{round(100 * p)}"] for s in summaries)
               for p in THRESHOLDS},
            "stable_rank": mean("stable_rank"), "effective_rank": mean("effective_rank"),
            "relative_norm": mean("relative_norm")}


@dataclass
class Analysis:
    """The spectra of every changed module of an adapter or of a fine-tune.

    Args:
        source: what was analysed, for reports.
        modules: one record per changed 2-D weight, in natural name order.
        unchanged: 2-D weights whose ΔW is exactly zero.
        other_changed: tensors that are not matrices (norms, biases) and changed: name → ‖Δ‖/‖W‖
            (None when ‖W‖ = 0).
    """

    source: str
    modules: list[ModuleStats]
    unchanged: list[str] = field(default_factory=list)
    other_changed: dict[str, float | None] = field(default_factory=dict)

    def by_type(self) -> dict[str, dict]:
        """Aggregates per module type (q_proj, down_proj, ...): mean energies and ranks, median k's."""
        groups: dict[str, list[dict]] = {}
        for m in self.modules:
            groups.setdefault(m.module_type, []).append(m.summary())
        return {t: _aggregate(v) for t, v in groups.items()}

    def by_layer(self) -> dict[int, dict]:
        """Aggregates per layer index (modules without one, like lm_head, are left out)."""
        groups: dict[int, list[dict]] = {}
        for m in self.modules:
            if m.layer is not None:
                groups.setdefault(m.layer, []).append(m.summary())
        return {i: _aggregate(groups[i]) for i in sorted(groups)}

    def to_dict(self, max_values: int = 64) -> dict:
        return {"source": self.source, "energy_ks": list(ENERGY_KS),
                "modules": [m.to_dict(max_values) for m in self.modules],
                "by_type": self.by_type(), "by_layer": self.by_layer(),
                "unchanged": self.unchanged, "other_changed": self.other_changed}


def recommend_rank(analysis: Analysis, energy: float) -> dict[str, int]:
    """Per module type, the smallest rank that captures ``energy`` of ‖ΔW‖_F² in most (> half) of its modules.

    The result is a ``rank_pattern`` for LoraConfig: ``{"q_proj": 4, "down_proj": 16, ...}``.

    Args:
        analysis: the spectra, from :func:`analyze_adapter` or :func:`analyze_models`.
        energy: the fraction to capture, in (0, 1].
    """
    if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ConfigError(f"energy must be a fraction in (0, 1], got {energy!r}")
    ks: dict[str, list[int]] = {}
    for m in analysis.modules:
        ks.setdefault(m.module_type, []).append(m.rank_for_energy(energy))
    # sorted(v)[n // 2]: at least n // 2 + 1 of n modules, a strict majority, need no more than this
    return {t: sorted(v)[len(v) // 2] for t, v in ks.items()}


def natural_key(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ---- sources ----------------------------------------------------------------------------------

def _lora_factors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """{module path: (A, B, is_embedding)} from PEFT-format keys; other keys (modules_to_save) are skipped."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key.removeprefix("base_model.model.")
        linear = re.fullmatch(r"(.+)\.lora_([AB])\.weight", k)
        m = linear or re.fullmatch(r"(.+)\.lora_embedding_([AB])", k)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2) + ("" if linear else "e")] = t
    out = {}
    for path, p in parts.items():
        emb = "Ae" in p or "Be" in p
        a, b = p.get("Ae" if emb else "A"), p.get("Be" if emb else "B")
        if a is None or b is None or len(p) != 2 or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"{where}: module {path!r} needs an A (r, in) and a B (out, r) of one rank r; "
                                     f"found {sorted((k, tuple(v.shape)) for k, v in p.items())}")
        out[path] = (a, b, emb)
    if not out:
        raise AdapterFormatError(f"{where}: holds no LoRA factors")
    return out


def _base_norm(weights: WeightDir, name: str, shape: tuple[int, int]) -> float:
    key = f"{name}.weight"
    found = weights.shapes.get(key)
    if found is None:
        raise ShapeMismatchError(f"base {weights.path} has no tensor {key!r}; is the adapter for another model?")
    if found not in (shape, shape[::-1]):
        raise ShapeMismatchError(f"module {name!r}: the adapter's ΔW is {shape[0]}x{shape[1]} but base tensor "
                                 f"{key!r} in {weights.path} is {tuple(found)}; is the adapter for another model?")
    return float(weights.get(key).norm())


def analyze_adapter(path: str | Path, base: str | Path | None = None) -> Analysis:
    """Spectra of ΔW = scaling·B·A for every module of a PEFT-format adapter, never forming ΔW.

    Args:
        path: adapter directory (adapter_config.json + adapter_model.safetensors).
        base: optional base model (directory, .gguf or the embedded default) for ‖ΔW‖/‖W‖.
    """
    from ..lora.io import read_adapter

    cfg, tensors, _ = read_adapter(path)
    weights = WeightDir(base) if base is not None else None
    modules, unchanged = [], []
    for name, (a, b, emb) in sorted(_lora_factors(tensors, str(path)).items(), key=lambda kv: natural_key(kv[0])):
        r = a.shape[0]
        if r != cfg.rank_for(name):
            raise AdapterFormatError(f"{path}: module {name!r} has rank {r} but adapter_config.json says "
                                     f"r={cfg.rank_for(name)}")
        s = lowrank_singular_values(b, a, scaling_of(r, cfg.alpha_for(name), cfg.use_rslora))
        shape = (a.shape[1], b.shape[0]) if emb else (b.shape[0], a.shape[1])
        if not bool(s.any()):
            unchanged.append(name)
            continue
        base_norm = _base_norm(weights, name, shape) if weights is not None else None
        modules.append(ModuleStats(name, shape, s, base_norm))
    return Analysis(f"adapter {path}", modules, unchanged)


def analyze_models(base: str | Path, tuned: str | Path, progress: bool = True) -> Analysis:
    """Spectra of ΔW = W_tuned − W_base for every 2-D weight of two checkpoints of one architecture.

    Args:
        base: the base model (directory with safetensors, .gguf, or the embedded default).
        tuned: the fine-tuned model directory.
        progress: show a tqdm bar over the matrices.

    Raises:
        ModelLoadError: a path is not a safetensors model, or the two differ in a tensor's name or shape.
    """
    b, t = WeightDir(base), WeightDir(tuned)
    keys = paired_keys(b, t)
    shapes = b.shapes
    analysis = Analysis(f"{b.path} -> {t.path}", [])
    mats = [k for k in keys if len(shapes[k]) == 2]
    for key in tqdm(sorted(mats, key=natural_key), desc="svd", disable=not progress, dynamic_ncols=True):
        w = b.get(key)
        delta = t.get(key) - w  # (out, in), float32
        name = key.removesuffix(".weight")
        if not bool(delta.any()):
            analysis.unchanged.append(name)
            continue
        s = torch.linalg.svdvals(delta).double()
        analysis.modules.append(ModuleStats(name, tuple(delta.shape), s, float(w.norm())))
    for key in sorted(set(keys) - set(mats), key=natural_key):
        w = b.get(key)
        delta = t.get(key) - w
        if bool(delta.any()):
            norm = float(w.norm())
            analysis.other_changed[key] = float(delta.norm()) / norm if norm else None
    return analysis
