"""`lorakit count | plan`: exact parameter counts and memory / time / cost plans before a run."""

from __future__ import annotations

import argparse
import json

from .common import add_lora_args, dtype_type, lora_config_from_args, meta_model


def cmd_count(args: argparse.Namespace) -> int:
    """Exact LoRA parameter count and adapter file size (meta device), or the formula for one --shape."""
    from ..errors import ConfigError
    from ..plan.count import count_spec, format_count, format_shape, parse_shape, shape_count

    if (args.model is None) == (args.shape is None):
        raise ConfigError("give a model (preset, config.json or model spec) or --shape DxK, one of the two")
    if args.shape is not None:
        view = shape_count(*parse_shape(args.shape), args.r)
        print(json.dumps(view, indent=2) if args.json else format_shape(view))
        return 0
    report = count_spec(args.model, lora_config_from_args(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_count(report, args.model))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Memory, FLOPs, time and cost of full fine-tuning vs LoRA vs LoRA on a 4-bit base."""
    from ..plan.count import count_model
    from ..plan.gpus import parse_count, select_gpus
    from ..plan.inputs import PlanInputs
    from ..plan.report import build_plan, format_plan

    seq_len = args.seq_len
    if args.objective == "grpo" and args.prompt_len is not None:
        seq_len = args.prompt_len + args.max_completion_length
    inputs = PlanInputs(batch_size=args.batch_size, seq_len=seq_len, dtype=args.dtype, optimizer=args.optimizer,
                        grad_checkpointing=args.grad_checkpointing, label_fraction=args.label_fraction,
                        padded=not args.no_padding, nproc=args.nproc, fsdp=args.fsdp,
                        quantize=args.quantize or "nf4", double_quant=args.double_quant, objective=args.objective,
                        precompute_ref=args.precompute_ref, beta=args.beta, pair_layout=args.pair_layout,
                        prompt_len=args.prompt_len or 0 if args.objective != "grpo" else 0,
                        completion_len=args.max_completion_length, num_generations=args.num_generations,
                        rollout_rows=args.rollout_rows, grad_accum=args.grad_accum,
                        num_iterations=args.num_iterations)
    model, cfg = meta_model(args.model), lora_config_from_args(args)
    doc = build_plan(model, count_model(model, cfg), inputs, select_gpus(args.gpus, args.price),
                     parse_count(args.tokens), args.mfu, cfg.lora_dropout, grid=args.quantize is not None)
    print(json.dumps(doc, indent=2) if args.json else format_plan(doc, args.model, args.explain))
    return 0


def add_planner_verbs(sub) -> None:
    spec = "preset (llama-2-7b, qwen2-0.5b, ...), a config.json, or a model spec"
    p = sub.add_parser("count", help="exact LoRA parameter count and adapter size, no weights needed")
    p.add_argument("model", nargs="?", default=None, help=spec)
    p.add_argument("--shape", default=None, metavar="DxK", help="the formula for one d×k matrix instead")
    add_lora_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("plan", help="memory / FLOPs / time / cost: full FT vs LoRA vs 4-bit base, per GPU")
    p.add_argument("model", help=spec)
    add_lora_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--dtype", type=dtype_type(), default="bfloat16",
                   help="model dtype: bfloat16 / bf16 (default), float16 / fp16, float32 / fp32")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=512, help="tokens per sequence after padding")
    g.add_argument("--gradient-checkpointing", "--grad-checkpointing", dest="grad_checkpointing",
                   action="store_true", help="plan a run with lorakit train --gradient-checkpointing: each block "
                   "keeps only its input and is recomputed in backward")
    g.add_argument("--label-fraction", type=float, default=1.0, help="share of positions with a loss (logits "
                   "are computed there only)")
    g.add_argument("--no-padding", action="store_true", help="sequences in a batch have equal length")
    g.add_argument("--nproc", type=int, default=1, help="devices in a torchrun job: memory is per device, "
                   "--batch-size is the global batch")
    g.add_argument("--fsdp", action="store_true", help="with --nproc: FSDP2 shards weights, gradients and "
                   "optimizer state (default: DDP replicates them)")
    g.add_argument("--tokens", default="100M", help="tokens to train on, e.g. 2e9, 500M (default 100M)")
    g.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    g.add_argument("--quantize", choices=["nf4", "fp4", "int8"], default=None, help="the quantized-base column "
                   "as `lorakit train --quantize` runs it (default column: nf4), plus the largest batch that fits "
                   "each GPU at sequence lengths 512-4096")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="4-bit: double-quantized block scales (default on, as in training)")
    o = p.add_argument_group("objective (the flags of lorakit train --objective)")
    o.add_argument("--objective", choices=["sft", "dpo", "orpo", "simpo", "grpo"], default="sft",
                   help="sft (default); dpo, orpo, simpo: --batch-size counts pairs (2 rows each), --seq-len is "
                   "prompt + the longer completion, --label-fraction the completion share; grpo: --batch-size "
                   "counts completions per micro-batch, --seq-len is the longest prompt + --max-completion-length")
    o.add_argument("--pair-layout", choices=["padded", "packed", "shared"], default="padded",
                   help="dpo, orpo, simpo: padded (2 x batch rows, default), packed (one row, no padding) or shared "
                   "(one row, each prompt once: give --prompt-len)")
    o.add_argument("--precompute-ref", action="store_true", help="dpo: reference log-probs computed once before "
                   "training (no reference forward in a step)")
    o.add_argument("--beta", type=float, default=0.0, help="grpo: KL coefficient (> 0: a reference forward per "
                   "micro-batch during rollouts)")
    o.add_argument("--num-generations", type=int, default=8, help="grpo: completions per prompt (default 8)")
    o.add_argument("--max-completion-length", type=int, default=256, help="grpo: most tokens of a completion "
                   "(default 256)")
    o.add_argument("--prompt-len", type=int, default=None, help="grpo: the longest prompt in tokens; sets "
                   "--seq-len to it + --max-completion-length. Pairs, --pair-layout shared: a pair's prompt tokens")
    o.add_argument("--rollout-rows", type=int, default=64, help="grpo: completions generated at once, the rows "
                   "of the generation KV cache (default 64)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (grpo: a step's "
                   "rollouts generate batch-size x grad-accum completions)")
    o.add_argument("--num-iterations", type=int, default=1, help="grpo: optimizer steps per rollout batch (> 1: "
                   "an old-log-prob forward per micro-batch)")
    g.add_argument("--gpus", "--gpu", nargs="+", default=None, help="GPU presets (default: all)")
    g.add_argument("--price", nargs="+", default=None, metavar="[GPU=]USD", help="price per GPU-hour")
    p.add_argument("--json", action="store_true")
    p.add_argument("--explain", action="store_true", help="print each row's formula")
    p.set_defaults(func=cmd_plan)
