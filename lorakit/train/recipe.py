"""TrainConfig: a training recipe. YAML files override the defaults, CLI flags override YAML.

The CLI flags of ``lorakit train`` are generated from the fields below (litgpt style), so a
field, its flag (``max_steps`` → ``--max-steps``) and its YAML key never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..models.dtype import parse_dtype

PAIR_LAYOUTS = ("auto", "shared", "packed", "padded")  # preference objectives: data.preference.collate_pairs

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass
class TrainConfig:
    """Everything a training run needs. Field docs double as ``lorakit train --help``."""

    model: str = "smollm2-135m-instruct"
    """Model spec: smollm2-135m-instruct (embedded), a local transformers dir, a .gguf, a hub id, or a model of your
    own: MODULE:FUNCTION or path/to/file.py:FUNCTION returning an nn.Module (docs/custom-models.md)."""
    data: str = "dates"
    """Training data: a JSONL file (core install), or JSON, CSV, Parquet or a datasets save_to_disk directory
    (pip install 'lorakit[data]'), in format text, prompt/completion, messages, alpaca or sharegpt (detected per
    file); or the name of a packaged task (its train split)."""
    eval_data: str | None = None
    """Validation data (the inputs and formats of data); default: the packaged task's valid split."""
    test_data: str | None = None
    """Held-out data scored by greedy exact match before and after training (any format but text)."""
    out: str = "runs/demo"
    """Output directory: adapter/, checkpoints/, metrics.jsonl, loss.png, config.yaml, summary.json."""
    objective: str = "sft"
    """What training minimises: sft (causal-LM cross-entropy on the completions; the default), grpo (online RL
    on prompts with --reward functions), or dpo, orpo, simpo (preference pairs: prompt, chosen, rejected; see
    docs/preference.md). Checked when the run starts, before any data or model is loaded (train/objectives/)."""
    loss: str | None = None
    """Your own loss (with objective sft): MODULE:FUNCTION or path/to/file.py:FUNCTION, called as fn(model, batch)
    with the batch's columns by name; returns the mean over the micro-batch's rows, or a dict holding it under
    'loss' and sub-losses logged beside it (docs/custom-models.md). Default: causal-LM cross-entropy."""
    reward: str | None = None
    """GRPO: reward functions, MODULE:FUNCTION or path/to/file.py:FUNCTION, comma-separated; each is called as
    fn(prompts, completions, completion_ids, **columns) and returns one float (or None) per completion, TRL's
    signature (docs/grpo.md)."""
    reward_weights: list[float] = field(default_factory=list)
    """GRPO: one weight per reward function, comma-separated (default 1 each); a completion's reward is the sum."""
    num_generations: int = 8
    """GRPO: completions sampled per prompt (a group); batch_size (completions per micro-batch) × grad_accum must
    be a multiple of it."""
    max_completion_length: int = 256
    """GRPO: most tokens of a completion (an eos counts)."""
    temperature: float = 1.0
    """GRPO: sampling temperature of the rollouts (> 0); log-probs are scored at the same temperature."""
    top_p: float = 1.0
    """GRPO: nucleus sampling of the rollouts (1: off)."""
    beta: float = 0.0
    """GRPO: KL coefficient towards the base model (adapters off; TRL's default 0: no reference forward at all).
    DPO, ORPO, SimPO: the preference loss's beta; 0 means the objective's default (0.1, 0.1, 2.0)."""
    epsilon: float = 0.2
    """GRPO: clipping range of the probability ratio, lower side (ratio >= 1 - epsilon)."""
    epsilon_high: float = 0.0
    """GRPO: clipping range, upper side (ratio <= 1 + epsilon_high; DAPO uses 0.28); 0: epsilon."""
    grpo_loss_type: str = "dapo"
    """GRPO: how per-token terms are averaged: dapo (token mean over the global batch, TRL's default), grpo
    (per-sequence token mean, then mean), bnpo (token mean per micro-batch), dr_grpo (÷ rows × max length)."""
    scale_rewards: str = "group"
    """GRPO: advantages divided by the std of the group's rewards (group), of the batch's (batch), or not (none)."""
    num_iterations: int = 1
    """GRPO: optimizer steps per rollout batch (PPO-style clipping binds from the second)."""
    mask_truncated_completions: bool = False
    """GRPO: completions cut at max_completion_length take no loss (DAPO's overlong filtering)."""
    rollout_rows: int = 64
    """GRPO: completions generated at once (the generation KV cache holds this many rows)."""
    pass_reward: float = 1.0
    """GRPO: a held-out completion passes when its reward reaches this (the before/after pass_rate)."""
    loss_type: str = "sigmoid"
    """DPO: the pair loss, sigmoid (the paper's), ipo (squared, per-token log-ratios) or hinge (SLiC)
    (docs/preference.md). beta sets its strength: 0 (the default) means the objective's own, 0.1 for dpo and
    orpo (ORPO's lambda), 2.0 for simpo."""
    label_smoothing: float = 0.0
    """DPO sigmoid and SimPO: the share of pairs assumed mislabelled, in [0, 0.5) (conservative DPO)."""
    simpo_gamma: float = 1.0
    """SimPO: the target reward margin gamma (gamma / beta = 0.5 at beta 2, the paper's setting)."""
    precompute_ref: bool = False
    """DPO: compute the reference (base model) log-probs of every pair once before training, cached beside the
    token cache, so each step runs one model pass per pair instead of two."""
    pair_layout: str = "auto"
    """DPO, ORPO, SimPO: how a micro-batch of pairs meets the model. shared: one row, each prompt computed once for
    both its completions (lorakit's packed attention: transformers models on SDPA or eager attention); packed: one
    row without padding, the prompt twice (any packed attention, flash-attention included); padded: 2·batch_size
    padded rows, TRL's layout; auto: shared where the model allows it, else padded. All give the same numbers."""
    skip_bad_pairs: bool = False
    """Preference data: skip (and count) malformed rows, prompts that fill max_seq_len, empty or identical
    completions, instead of stopping at the first with its file:line."""
    weights: str | None = None
    """With --model MODULE:FUNCTION: the pretrained state dict to load before LoRA is injected (safetensors, or a
    torch checkpoint read weights-only); every key must match."""
    allow_missing_keys: bool = False
    """With --weights: keys the model has and the file lacks keep the values the builder gave them."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained whole and saved with the adapter (PEFT's modules_to_save), e.g. a new head or embedding."""
    trainable_token_indices: list[str] = field(default_factory=list)
    """Rows of an embedding trained in full and saved with the adapter, e.g. new tokens (PEFT's
    trainable_token_indices): token ids of the input embedding (3 5 7), or EMBEDDING=ID,ID,... per embedding."""
    pad_value: list[str] = field(default_factory=list)
    """Pre-tokenized rows: the value padding writes into a column, COLUMN=V ... (default: input_ids the pad id
    (0 without a tokenizer), labels -100, attention_mask 0, any other column 0)."""
    full: bool = False
    """Train every weight (full fine-tuning baseline) instead of LoRA; saves a model directory."""
    max_steps: int = 0
    """Optimizer steps (exclusive with epochs; with neither set: 200)."""
    epochs: float = 0.0
    """Passes over the training data (fractions allowed); sets the number of optimizer steps from the data's
    size, batch size and grad_accum. Exclusive with max_steps."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = batch_size × grad_accum)."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr × min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    max_seq_len: int = 128
    """Examples longer than this keep their first max_seq_len tokens (counted and reported); with --packing, the
    tokens of one packed row."""
    columns: list[str] = field(default_factory=list)
    """Map other column names onto a format's fields: FIELD=COLUMN ... (e.g. prompt=question completion=answer)."""
    num_proc: int = 1
    """Processes that tokenize the data (a set found in the token cache is not tokenized again)."""
    data_cache: str = ""
    """Tokenized-set cache directory ('': tokenized/ in lorakit's cache folder, $LORAKIT_CACHE or
    ~/.cache/lorakit by default; 'off': none)."""
    packing: bool = False
    """Pack whole examples into rows of max_seq_len tokens (best-fit decreasing; attention never crosses an
    example): batch_size then counts rows. Off by default: see the README."""
    group_by_length: bool = False
    """Without packing: batches of examples of similar lengths (less padding); order still seeded and resumable."""
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha (scaling = alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt: names (suffix match), one regex, or all-linear."""
    rslora: bool = False
    """Scale by alpha / sqrt(r) (rank-stabilised LoRA)."""
    dora: bool = False
    """DoRA: learn a magnitude per output feature on top of the LoRA direction (PEFT's use_dora)."""
    init_lora_weights: str = "true"
    """Adapter initialisation (PEFT's init_lora_weights): true, false, gaussian, pissa, pissa_niter_K or olora.
    pissa/olora move the top part of W into the adapter; the result is saved converted (see convert_to_lora)."""
    convert_to_lora: bool = True
    """For pissa/olora: save adapter/ as the plain rank-2r LoRA on the original base (PEFT's conversion);
    --no-convert-to-lora keeps the trained factors, which need the loader to redo the decomposition."""
    bias: str = "none"
    """Biases trained and saved with the adapter (PEFT's bias): none, all, or lora_only (the adapted modules')."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+: B's learning rate is this times A's (PEFT's create_loraplus_optimizer; 0: off, else >= 1)."""
    loraplus_lr_embedding: float = 1e-6
    """LoRA+: the learning rate of adapters on embeddings (PEFT's default 1e-6)."""
    neftune_alpha: float = 0.0
    """NEFTune: uniform noise of scale alpha / sqrt(L·d) on the input embeddings while training (never in
    evaluation or generation); 5 is the paper's usual value (0: off)."""
    seed: int = 0
    """Seed for LoRA init, data order and dropout."""
    eval_every: int = 50
    """Evaluate validation loss every N steps (0: only at the end)."""
    eval_batches: int = 0
    """Limit validation to this many batches (0: the whole set)."""
    patience: int = 0
    """Early stopping: stop after this many evaluations without a better validation loss (0: off)."""
    save_every: int = 100
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    resume: bool = False
    """Continue from the latest complete checkpoint in out/checkpoints."""
    stop_after: int = 0
    """Pause after this many steps (a checkpoint is written, the schedule still spans max_steps); continue
    later with --resume. For time-sliced or preemptible jobs (0: off)."""
    log_every: int = 10
    """Write a metrics.jsonl record every N steps."""
    max_new_tokens: int = 16
    """Generation length for the exact-match score."""
    score_limit: int = 0
    """Score at most this many test examples (0: all)."""
    dtype: str = "auto"
    """Frozen base dtype: auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16); LoRA weights stay float32.
    auto: bfloat16 where the device computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX:
    about 2x faster steps), else float32; --full trains float32 weights unless you choose."""
    lora_compute: str = "auto"
    """Dtype of the LoRA matmuls on a bf16 base: auto or bfloat16 (A·x and B·h in bf16 with fp32
    accumulation, as PEFT under autocast, TRL's bf16=True: the activations are never upcast, ~3% faster DPO
    steps on SmolLM2 on a CPU with AVX512-BF16) or float32 (the activations upcast to the adapter's fp32). The LoRA weights,
    their gradients and the optimizer stay fp32 either way; fp32/fp16 bases and DoRA always compute in fp32."""
    threads: int = 0
    """torch CPU threads (0: all cores)."""
    gradient_checkpointing: bool | str = False
    """Keep only each block's input and recompute the block in backward (non-reentrant, so it works
    with a frozen base whose inputs need no gradient): less activation memory, about a third more compute.
    --gradient-checkpointing auto: on only if the planner's peak for the longest batch exceeds the device's
    free memory (checked before the first step by lorakit train; without auto it warns)."""
    quantize: str | None = None
    """Quantize the frozen base's Linears (all but the output head) with bitsandbytes before LoRA is
    injected: nf4 or fp4 (4-bit: QLoRA) or int8 (LLM.int8()). The base is quantized the same way at
    every start, so --resume continues exactly. Needs: pip install 'lorakit[qlora]'."""
    double_quant: bool = True
    """With a 4-bit --quantize: quantize the per-block scales too (QLoRA's double quantization)."""
    fsdp: bool = False
    """Under torchrun: shard the frozen base and the adapters with FSDP2 instead of replicating (DDP)."""
    dist_timeout: int = 300
    """Seconds a collective may wait before the run fails (a dead rank must not hang the others)."""
    cpu_allocator: str = "auto"
    """The C allocator on CPU: auto uses tcmalloc where it is installed (lorakit train restarts itself with it
    preloaded: 0.70x glibc's peak RSS at no step-time cost, bench/results/allocator.md), else glibc's malloc;
    tcmalloc requires it; glibc keeps the C library's."""
    low_cpu_memory: bool = False
    """On CPU (glibc): fix malloc's mmap threshold at 128 KiB so freed activations go back to the system at
    once instead of piling up in the heap: about 0.67x the peak RSS on padded batches of varying length, but
    about 1.5x the step time (every large block is mapped and zero-filled anew; bench/results/allocator.md)."""
    report_to: list[str] = field(default_factory=list)
    """Also send metrics (Hugging Face Trainer names: train/loss, eval/loss ...) and the recipe to trackers:
    tensorboard, wandb, mlflow, comma-separated (each an optional extra; default none). Rank 0 reports."""

    def __post_init__(self) -> None:
        at_least = {1: ("batch_size", "grad_accum", "max_seq_len", "r", "keep_checkpoints", "max_new_tokens",
                        "num_proc"),
                    0: ("max_steps", "eval_every", "save_every", "patience", "eval_batches", "warmup_steps", "log_every",
                        "score_limit", "threads", "dist_timeout", "stop_after")}
        for minimum, names in at_least.items():
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                    raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) or not self.epochs >= 0:
            raise ConfigError(f"epochs must be a number >= 0, got {self.epochs!r}")
        if self.epochs and self.max_steps:
            raise ConfigError(f"max_steps ({self.max_steps}) and epochs ({self.epochs}) both size the run; give one")
        if not self.epochs and not self.max_steps:
            self.max_steps = 200
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be within [0, 1], got {self.min_lr_ratio!r}")
        self.dtype = parse_dtype(self.dtype, allow_auto=True)  # short names too: bf16, fp16, fp32
        try:
            self.lora_compute = parse_dtype(self.lora_compute, allow_auto=True)
        except ConfigError as exc:
            raise ConfigError(f"lora_compute: {exc}") from None
        if self.lora_compute == "float16":
            raise ConfigError("lora_compute float16 is not supported (its gradients would need loss scaling): "
                              "use auto, bfloat16 or float32")
        if self.quantize is not None:
            self._check_quantize()
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.gradient_checkpointing = _on_off_auto(self.gradient_checkpointing)
        if isinstance(self.reward_weights, str):  # a flag's "1,0.5"
            from .rewards import parse_weights

            self.reward_weights = parse_weights(self.reward_weights)
        for name in ("columns", "modules_to_save", "pad_value", "trainable_token_indices"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, getattr(self, name).split())
        if self.loss and self.objective != "sft":
            raise ConfigError(f"--loss replaces the sft objective's loss; objective {self.objective!r} has its own")
        if self.packing and self.group_by_length:
            raise ConfigError("packing and group_by_length exclude each other: packed rows are already full")
        if self.pair_layout not in PAIR_LAYOUTS:
            raise ConfigError(f"pair_layout must be one of {', '.join(PAIR_LAYOUTS)}, got {self.pair_layout!r}")
        self._check_variants()
        # lazy: trackers import fileio (torch); a recipe loads without it
        from .trackers import parse_report_to

        self.report_to = parse_report_to(self.report_to)

    def _check_variants(self) -> None:
        from ..lora.config import BIAS_CHOICES, check_init, token_indices_from_flags

        token_indices_from_flags(self.trainable_token_indices)  # a malformed value fails with the recipe

        if isinstance(self.init_lora_weights, bool):  # YAML's true / false
            self.init_lora_weights = str(self.init_lora_weights).lower()
        try:
            check_init(self.lora_init())
        except ConfigError as exc:
            raise ConfigError(f"init_lora_weights: {exc}") from None
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {', '.join(BIAS_CHOICES)}, got {self.bias!r}")
        if self.loraplus_lr_ratio and not self.loraplus_lr_ratio >= 1:
            raise ConfigError(f"loraplus_lr_ratio must be 0 (off) or >= 1, got {self.loraplus_lr_ratio!r}")
        if not self.loraplus_lr_embedding > 0:
            raise ConfigError(f"loraplus_lr_embedding must be > 0, got {self.loraplus_lr_embedding!r}")
        if not self.neftune_alpha >= 0:
            raise ConfigError(f"neftune_alpha must be >= 0, got {self.neftune_alpha!r}")
        lora_only = {"dora": self.dora, "init_lora_weights": self.lora_init() is not True, "bias": self.bias != "none",
                     "loraplus_lr_ratio": bool(self.loraplus_lr_ratio),
                     "trainable_token_indices": bool(self.trainable_token_indices)}
        if self.full and any(lora_only.values()):
            raise ConfigError(f"{', '.join(k for k, v in lora_only.items() if v)} apply to LoRA adapters; drop them "
                              "or --full (full fine-tuning trains every weight)")

    def lora_init(self) -> bool | str:
        """init_lora_weights as LoraConfig takes it ("true"/"false" become booleans)."""
        value = str(self.init_lora_weights)
        return {"true": True, "false": False}.get(value.lower(), value)

    def _check_quantize(self) -> None:
        if self.quantize not in ("nf4", "fp4", "int8"):
            raise ConfigError(f"quantize must be nf4, fp4 or int8, got {self.quantize!r}")
        from importlib.util import find_spec

        if find_spec("bitsandbytes") is None:  # fail before any data or model is loaded
            raise ConfigError("--quantize needs bitsandbytes, which is not installed. Install it with: "
                              "pip install 'lorakit[qlora]'")
        if self.full:
            raise ConfigError("--quantize freezes the base in 4/8 bits, which --full would train; drop one of them")
        if self.fsdp:
            raise ConfigError("--quantize with --fsdp is not supported: FSDP2 shards each parameter as a DTensor, but "
                              "a quantized weight's block scales and shape live outside the parameter (bitsandbytes' "
                              "quant_state), so a shard cannot be dequantized. Drop --fsdp: DDP replicates the "
                              "quantized base, which is what makes it fit in the first place")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _on_off_auto(value: Any) -> bool | str:
    """gradient_checkpointing's values: True / False (also on/off/true/false) or "auto"."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    choices = {"true": True, "on": True, "yes": True, "false": False, "off": False, "no": False, "auto": "auto"}
    if word not in choices:
        raise ConfigError(f"gradient_checkpointing must be on, off or auto, got {value!r}")
    return choices[word]


def _field_docs() -> dict[str, str]:
    """Docstrings under each field, read from this file's source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; default None means 'keep the recipe's value'."""
    docs = _field_docs()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        # --lora-r: torchrun's own parser takes a bare --r for an ambiguous abbreviation of its flags
        flags = [flag, "--lora-r"] if f.name == "r" else [flag]
        if f.name == "gradient_checkpointing":  # a switch that also takes "auto"
            p.add_argument(flag, nargs="?", const=True, default=None, type=_on_off_auto, metavar="auto",
                           help=docs.get(f.name))
            p.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", default=None)
        elif f.type in ("bool", bool):
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=docs.get(f.name))
        elif f.name in ("target_modules", "columns", "modules_to_save", "pad_value", "trainable_token_indices"):
            p.add_argument(*flags, nargs="+", default=None, help=docs.get(f.name))
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(*flags, type=kind, default=None, help=docs.get(f.name))


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults ← YAML recipe ← overrides (CLI flags). Unknown YAML keys are an error listing valid ones.

    Args:
        path: a YAML file, or None for the packaged demo recipe.
        overrides: {field: value}; None values are ignored.
    """
    path = Path(path) if path else DEFAULT_RECIPE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"recipe {path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of settings, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"recipe {path}: unknown key {key!r}{hint}. Valid keys: {', '.join(valid)}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for mine, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
        if overrides.get(mine) and other not in overrides:
            data.pop(other, None)  # a flag that sizes the run replaces the recipe's other way of sizing it
    data.update(overrides)
    try:
        return TrainConfig(**data)
    except TypeError as exc:
        raise ConfigError(f"recipe {path}: {exc}") from None


def save_recipe(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    from ..fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
