"""An Analysis for people: text tables, and PNG plots (spectra per module type, k-for-95% heat map)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..plots import _figure, save_png
from .svd import ENERGY_KS, THRESHOLDS, Analysis

_KEYS = [f"k{round(100 * p)}" for p in THRESHOLDS]


def _row(label: str, width: int, s: dict, count: str = "") -> str:
    energies = " ".join(f"{100 * s['energy'][k]:5.1f}" for k in ENERGY_KS)
    ks = " ".join(f"{s[k]:>4g}" for k in _KEYS)
    rel = f"{s['relative_norm']:8.4f}" if s["relative_norm"] is not None else f"{'-':>8}"
    return (f"{label:<{width}} {count:>4} {energies}  {ks} {s['stable_rank']:7.2f} {s['effective_rank']:7.2f} "
            f"{rel}")


def _header(first: str, width: int) -> str:
    energies = " ".join(f"{'E@' + str(k):>5}" for k in ENERGY_KS)
    ks = " ".join(f"{k:>4}" for k in _KEYS)
    return f"{first:<{width}} {'n':>4} {energies}  {ks} {'srank':>7} {'erank':>7} {'|dW|/|W|':>8}"


def format_table(analysis: Analysis, per_module: bool = True) -> str:
    """The analysis as text: per module type, per layer, then (optionally) per module.

    E@k is the % of ‖ΔW‖_F² in the top k singular values; k90/k95/k99 the smallest k reaching
    that % (medians in the aggregate rows); srank/erank the stable and effective ranks (means).

    Args:
        analysis: from analyze_adapter or analyze_models.
        per_module: include one row per module.
    """
    lines = [f"ΔW spectra of {analysis.source}: {len(analysis.modules)} changed matrices"]
    if analysis.unchanged:
        lines.append(f"unchanged (ΔW = 0): {len(analysis.unchanged)} matrices")
    types, layers = analysis.by_type(), analysis.by_layer()
    width = max([len(t) for t in types] + [len("module type")])
    lines += ["", _header("module type", width)]
    lines += [_row(t, width, s, str(s["modules"])) for t, s in types.items()]
    if layers:
        lines += ["", _header("layer", width)]
        lines += [_row(str(i), width, s, str(s["modules"])) for i, s in layers.items()]
    if per_module and analysis.modules:
        width = max(len(m.name) for m in analysis.modules)
        lines += ["", _header("module", width)]
        lines += [_row(m.name, width, m.summary()) for m in analysis.modules]
    if analysis.other_changed:
        rel = [v for v in analysis.other_changed.values() if v is not None]
        most = f", largest |d|/|W| {max(rel):.4f}" if rel else ""
        lines += ["", f"other changed tensors (not matrices: norms, biases): {len(analysis.other_changed)}{most}"]
    return "\n".join(lines)


def plot_spectra(analysis: Analysis, path: str | Path) -> None:
    """Two panels per module type: mean σᵢ/σ₁ against i, and mean cumulative energy against k."""
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[str, list[torch.Tensor]] = {}
    for m in analysis.modules:
        groups.setdefault(m.module_type, []).append(m.singular_values)
    for name, spectra in groups.items():
        n = max(len(s) for s in spectra)
        padded = torch.stack([torch.nn.functional.pad(s, (0, n - len(s))) for s in spectra])  # (modules, n)
        idx = torch.arange(1, n + 1)
        left.plot(idx, (padded / padded[:, :1]).mean(0), label=name, lw=1.2)
        sq = padded**2
        right.plot(idx, (sq.cumsum(1) / sq.sum(1, keepdim=True)).mean(0), label=name, lw=1.2)
    left.set(xscale="log", yscale="log", xlabel="index i", ylabel="σᵢ / σ₁ (mean over layers)",
             title="spectrum of ΔW per module type")
    right.set(xscale="log", xlabel="rank k", ylabel=r"fraction of $\|\Delta W\|_F^2$ in the top k",
              title="energy captured at rank k", ylim=(0, 1.01))
    for p in THRESHOLDS:
        right.axhline(p, color="grey", lw=0.6, ls=":")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    save_png(fig, path)
    plt.close(fig)


def plot_k95_heatmap(analysis: Analysis, path: str | Path) -> bool:
    """Heat map of the smallest k reaching 95% energy, layer × module type; False when no module has a layer."""
    cells: dict[tuple[int, str], int] = {}
    for m in analysis.modules:
        if m.layer is not None:
            cells[(m.layer, m.module_type)] = m.rank_for_energy(0.95)
    if not cells:
        return False
    layers = sorted({i for i, _ in cells})
    types = list(dict.fromkeys(t for _, t in cells))
    grid = torch.full((len(layers), len(types)), float("nan"))
    for (i, t), k in cells.items():
        grid[layers.index(i), types.index(t)] = k
    plt = _figure()
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(types), 1.0 + 0.28 * len(layers)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    if grid.numel() <= 400:
        mid = (min(cells.values()) + max(cells.values())) / 2
        for (i, t), k in cells.items():
            ax.text(types.index(t), layers.index(i), str(k), ha="center", va="center", fontsize=7,
                    color="black" if k > mid else "white")  # dark text on viridis' bright end
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set(xlabel="module type", ylabel="layer", title=r"smallest k holding 95% of $\|\Delta W\|_F^2$")
    fig.colorbar(image, ax=ax, label="k")
    save_png(fig, path)
    plt.close(fig)
    return True


def save_plots(analysis: Analysis, folder: str | Path) -> list[Path]:
    """Write spectra.png and k95_heatmap.png (when modules have layer indices) into ``folder``.

    Args:
        analysis: from analyze_adapter or analyze_models.
        folder: created if missing.

    Returns:
        The paths written.
    """
    folder = Path(folder)
    written = []
    if analysis.modules:
        plot_spectra(analysis, folder / "spectra.png")
        written.append(folder / "spectra.png")
    if plot_k95_heatmap(analysis, folder / "k95_heatmap.png"):
        written.append(folder / "k95_heatmap.png")
    return written
