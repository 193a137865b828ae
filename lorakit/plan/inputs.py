"""What a memory plan is computed from and what it returns: a training setup (``PlanInputs``, with the modes,
objectives, dtypes and optimizers it knows) and rows of bytes with their formulas (``Row``, ``MemoryPlan``).
Shared by ``memory`` (the SFT plan and the modes) and ``objectives`` (DPO/ORPO/SimPO, GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..models.dtype import parse_dtype
from .arch import Arch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = {"adamw": 2, "sgd": 0}  # state tensors per trainable parameter (SGD: plain, no momentum)
QUANT_METHODS = ("nf4", "fp4", "int8")
MODES = ("full", "lora", "qlora")
PAIR_OBJECTIVES = ("dpo", "orpo", "simpo")
OBJECTIVES = ("sft", *PAIR_OBJECTIVES, "grpo")
PAIR_LAYOUTS = ("padded", "packed", "shared")


@dataclass
class PlanInputs:
    """One training setup.

    Args:
        batch_size: sequences per micro-batch (B).
        seq_len: tokens per sequence after padding (T).
        dtype: model dtype: float32, bfloat16 or float16 (the compute dtype of the 4-bit base).
        optimizer: "adamw" (two states per trainable parameter) or "sgd" (none).
        grad_checkpointing: keep only each layer's input and recompute the layer in backward.
        label_fraction: share of positions that predict a labelled token (logits are computed there only).
        padded: batches are right-padded (lorakit's collate): SDPA then gets a mask.
        device: "cuda" (AdamW's foreach path: one temporary the size of all trainable parameters) or
            "cpu" (per-tensor path: two temporaries the size of the largest trainable tensor).
        nproc: processes (devices) in a torchrun job; batch_size is the global batch, each device
            gets ceil(batch_size / nproc) rows of it, as lorakit's trainer splits it.
        fsdp: FSDP2 shards weights, gradients and optimizer state over the nproc devices (one
            block is gathered whole at a time); otherwise DDP replicates them and adds its
            gradient buckets (a second copy of the trainable gradients).
        quantize: what the quantized column's base is (``lorakit train --quantize``): nf4, fp4 or int8.
        double_quant: 4-bit: double-quantized block scales (``--double-quant``, the default).
        objective: what ``lorakit train --objective`` minimises (:mod:`lorakit.plan.objectives`): sft; dpo, orpo,
            simpo (batch_size counts pairs: a micro-batch runs 2·batch_size rows, chosen and rejected; seq_len
            is the longer of prompt + chosen and prompt + rejected; label_fraction the completion share);
            grpo (batch_size counts completions; seq_len is the longest prompt + completion_len).
        pair_layout: dpo, orpo, simpo (``--pair-layout``): padded (2·batch_size rows of seq_len), packed (one
            row of the pairs' tokens, no padding: at most 2·batch_size·seq_len) or shared (one row, each prompt
            once: batch_size·(2·seq_len − prompt_len)).
        prompt_len: dpo, orpo, simpo: a pair's prompt tokens (the shared layout runs them once; 0: unknown,
            planned as packed).
        precompute_ref: DPO with ``--precompute-ref``: no reference forward during a step.
        beta: GRPO's KL coefficient (> 0: a reference forward per micro-batch during rollouts).
        completion_len: GRPO's ``max_completion_length`` (the positions scored per row).
        num_generations: GRPO: completions per prompt (the G rows of a prompt share one prefill).
        rollout_rows: GRPO: completions generated at once (rows of the generation KV cache).
        grad_accum: micro-batches per optimizer step (GRPO: rollouts generate all of a step's completions).
        num_iterations: GRPO: optimizer steps per rollout batch (> 1: old log-probs, one more forward each).
    """

    batch_size: int = 8
    seq_len: int = 512
    dtype: str = "bfloat16"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    label_fraction: float = 1.0
    padded: bool = True
    device: str = "cuda"
    nproc: int = 1
    fsdp: bool = False
    quantize: str = "nf4"
    double_quant: bool = True
    objective: str = "sft"
    pair_layout: str = "padded"
    prompt_len: int = 0
    precompute_ref: bool = False
    beta: float = 0.0
    completion_len: int = 256
    num_generations: int = 8
    rollout_rows: int = 64
    grad_accum: int = 1
    num_iterations: int = 1

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)  # short names too: bf16, fp16, fp32
        if self.quantize not in QUANT_METHODS:
            raise ConfigError(f"quantize must be one of {', '.join(QUANT_METHODS)}, got {self.quantize!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("batch_size", "seq_len", "nproc", "completion_len", "num_generations", "rollout_rows",
                     "grad_accum", "num_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"label_fraction must be within (0, 1], got {self.label_fraction!r}")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.pair_layout not in PAIR_LAYOUTS:
            raise ConfigError(f"pair_layout must be one of {', '.join(PAIR_LAYOUTS)}, got {self.pair_layout!r}")
        if self.objective == "grpo" and self.completion_len >= self.seq_len:
            raise ConfigError(f"grpo: seq_len ({self.seq_len}) is the longest prompt + max_completion_length "
                              f"({self.completion_len}); it must be larger")

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def rows(self) -> int:
        """Sequences per device: each process takes its share of the global batch (a pair is two rows)."""
        return -(-self.batch_size // self.nproc) * (2 if self.objective in PAIR_OBJECTIVES else 1)

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def logit_positions(self) -> int:
        """B·K: lorakit asks for logits at the K labelled positions, or all T when every one is (GRPO: the
        completion_len positions of every row)."""
        if self.objective == "grpo":
            return self.rows * self.completion_len
        if self.label_fraction >= 1:
            return self.tokens
        return self.rows * max(1, round(self.label_fraction * (self.seq_len - 1)))


@dataclass
class Row:
    """One memory row of one mode: bytes and the formula that gave them."""

    bytes: float
    formula: str


@dataclass
class MemoryPlan:
    """Rows × modes: weights, gradients, optimizer, activations, logits, peak (bytes, with formulas)."""

    inputs: PlanInputs
    arch: Arch
    lora_params: int
    rows: dict[str, dict[str, Row]] = field(default_factory=dict)  # row → mode → Row

    def total(self, mode: str) -> float:
        return self.rows["peak"][mode].bytes

    def ratio(self, mode: str) -> float:
        return self.total(mode) / self.total("full")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _final_norm(arch: Arch, inp: PlanInputs, mode: str) -> int:
    """Bytes per token the final norm keeps."""
    return rms_norm_bytes(arch, inp, mode)


def rms_norm_bytes(arch: Arch, inp: PlanInputs, mode: str) -> int:
    """Bytes per token one norm keeps: an RMSNorm upcast to fp32 keeps the fp32 copy of its input and 1/rms (the
    normalized input too when its weight trains); the trainer's lean one (models/lean.py, a half-precision input)
    its input as it came and 1/rms; a native LayerNorm its input, mean and rstd."""
    e, h = inp.e, arch.hidden
    if not arch.rms_upcast:
        return e * h + 8
    if arch.lean_norm and e != 4:
        return e * h + 4
    return 4 * h + 4 + (e * h if mode == "full" else 0)

