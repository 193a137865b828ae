"""GPU presets and what a run costs on them: FLOPs per token, hours, dollars, and whether it fits.

Peak throughputs are the vendors' dense (no 2:4 sparsity) tensor-core figures; memory is what the
card reports. Prices are assumptions (typical on-demand cloud prices per GPU-hour, 2024–2025) and can
be overridden per GPU (``--price H100=2.10``) or for all (``--price 1.5``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

CUDA_OVERHEAD_GIB = 1.0  # CUDA context + kernels + allocator slack, added before the fits verdict
DEFAULT_MFU = 0.4  # model FLOPs utilisation: achieved / peak


@dataclass(frozen=True)
class GPU:
    """One accelerator: memory (GiB), peak dense TFLOP/s for half precision and fp32, price per hour."""

    name: str
    memory_gib: float
    half_tflops: float  # bf16 (fp16 for the T4, which has no bf16 tensor cores)
    fp32_tflops: float  # plain fp32 (PyTorch does not use TF32 for matmuls by default)
    price_per_hour: float
    note: str = ""

    def tflops(self, dtype: str) -> float:
        return self.fp32_tflops if dtype == "float32" else self.half_tflops


GPUS = {g.name: g for g in (
    GPU("T4", 15.0, 65.0, 8.1, 0.35, "no bf16: fp16 figure"),
    GPU("RTX-3090", 24.0, 71.0, 35.6, 0.25),
    GPU("RTX-4090", 24.0, 165.2, 82.6, 0.40),
    GPU("A100-40GB", 40.0, 312.0, 19.5, 1.30),
    GPU("A100-80GB", 80.0, 312.0, 19.5, 1.80),
    GPU("H100", 79.6, 989.4, 66.9, 2.50, "SXM, 80 GB"),
    GPU("H200", 140.4, 989.4, 66.9, 3.50, "SXM, 141 GB"),
)}


def gpu_names() -> list[str]:
    return list(GPUS)


def select_gpus(names: list[str] | None, prices: list[str] | None = None) -> list[GPU]:
    """The GPUs to report on, with prices overridden.

    Args:
        names: preset names (case-insensitive); None for all.
        prices: ``"USD"`` for every GPU or ``"NAME=USD"`` for one.

    Raises:
        ConfigError: an unknown GPU name (the presets are listed) or a malformed price.
    """
    lookup = {n.lower(): g for n, g in GPUS.items()}
    chosen = []
    for name in names or list(GPUS):
        if name.lower() not in lookup:
            raise ConfigError(f"unknown GPU {name!r}; presets: {', '.join(GPUS)}")
        chosen.append(lookup[name.lower()])
    for item in prices or []:
        name, _, value = item.rpartition("=")
        try:
            usd = float(value)
        except ValueError:
            raise ConfigError(f"--price {item!r}: expected USD per GPU-hour, as 2.5 or H100=2.5") from None
        if usd < 0 or (name and name.lower() not in lookup):
            raise ConfigError(f"--price {item!r}: unknown GPU or negative price; presets: {', '.join(GPUS)}")
        chosen = [_priced(g, usd) if not name or g.name.lower() == name.lower() else g for g in chosen]
    return chosen


def _priced(gpu: GPU, usd: float) -> GPU:
    return GPU(gpu.name, gpu.memory_gib, gpu.half_tflops, gpu.fp32_tflops, usd, gpu.note)


@dataclass(frozen=True)
class Flops:
    """Training FLOPs per token: 2 per weight forward, 2 more for the input gradient, 2 for the weight gradient."""

    matmul_params: float  # N: weights in matmuls per token (the head scaled by the labelled share)
    lora_params: int
    attention: float  # score and value matmuls, forward + backward

    @property
    def full(self) -> float:
        """6N + attention."""
        return 6 * self.matmul_params + self.attention

    @property
    def lora(self) -> float:
        """4N + 6·N_lora + attention: frozen weights need no weight-gradient GEMM."""
        return 4 * self.matmul_params + 6 * self.lora_params + self.attention


def training_flops(arch, lora_params: int, seq_len: int, label_fraction: float = 1.0) -> Flops:
    """FLOPs per trained token for an :class:`lorakit.plan.Arch`.

    Args:
        arch: the architecture (matmul weights, head, layers, attention width, causality).
        lora_params: trainable adapter parameters.
        seq_len: T; causal attention looks at T/2 keys per query on average.
        label_fraction: share of positions whose logits lorakit computes.
    """
    n = arch.matmul - arch.head * (1 - label_fraction)
    keys = seq_len / 2 if arch.causal else seq_len
    attention = 3 * arch.layers * 2 * 2 * arch.q_dim * keys  # QKᵀ and A·V, 2 FLOPs per MAC, ×3 for backward
    return Flops(n, lora_params, attention)


def parse_count(text: str) -> float:
    """'2e9', '500M', '1.5B', '20k' → a number (token counts on the command line)."""
    units = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    try:
        value = float(s[:-1]) * units[s[-1]] if s and s[-1] in units else float(s)
    except ValueError:
        raise ConfigError(f"expected a number such as 2e9, 500M or 1.5B, got {text!r}") from None
    if value <= 0:
        raise ConfigError(f"expected a positive number, got {text!r}")
    return value


def run_cost(flops_per_token: float, tokens: float, gpu: GPU, dtype: str, mfu: float) -> dict[str, float]:
    """Hours and dollars for ``tokens`` at ``mfu`` of the GPU's peak for ``dtype``."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu must be within (0, 1], got {mfu!r}")
    seconds = flops_per_token * tokens / (gpu.tflops(dtype) * 1e12 * mfu)
    return {"hours": seconds / 3600, "cost_usd": seconds / 3600 * gpu.price_per_hour}


def fits(peak_bytes: float, gpu: GPU) -> bool:
    """Peak + CUDA_OVERHEAD_GIB within the card's memory."""
    return peak_bytes / 2**30 + CUDA_OVERHEAD_GIB <= gpu.memory_gib
