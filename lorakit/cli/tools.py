"""`lorakit` verbs beyond training and trying adapters: analyze, extract, count, plan, serve; and
the LoRA flags the verbs share. Parsing only: each verb calls library functions that tests call too."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_lora_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The LoRA flags shared by train, targets and count (None = keep the recipe's value)."""
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=8 if defaults else None, help="rank (default 8)")
    g.add_argument("--alpha", type=float, default=16.0 if defaults else None, help="lora_alpha (default 16)")
    g.add_argument("--dropout", type=float, default=0.0 if defaults else None, help="lora_dropout")
    g.add_argument("--target-modules", nargs="+", default=["all-linear"] if defaults else None,
                   help="module names (suffix match), one regex, or all-linear (default)")
    g.add_argument("--exclude-modules", nargs="+", default=None, help="module names never adapted")
    g.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices to adapt (layers_to_transform)")
    g.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r) instead of alpha/r")


def lora_config_from_args(args: argparse.Namespace, **extra):
    """Build a LoraConfig from add_lora_args flags."""
    from ..lora.config import LoraConfig, target_modules_from_flags

    target = target_modules_from_flags(args.target_modules)
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=target,
                      exclude_modules=args.exclude_modules, layers_to_transform=args.layers,
                      use_rslora=bool(args.rslora), **extra)


def meta_model(spec: str):
    """Build ``spec``'s architecture (preset | config.json | model spec) on the meta device: no memory, no weights."""
    from ..plan.count import meta_model as build

    return build(spec)



# ---- analysis ------------------------------------------------------------------------------------

def cmd_analyze(args: argparse.Namespace) -> int:
    """Singular values of ΔW per module, from an adapter or from --base and --tuned model directories."""
    from ..analysis.report import format_table, save_plots
    from ..analysis.svd import analyze_adapter, analyze_models, recommend_rank
    from ..errors import ConfigError

    if (args.adapter is None) == (args.tuned is None) or (args.tuned and not args.base):
        raise ConfigError("give an ADAPTER_DIR (optionally with --base for |dW|/|W|), or --base DIR and --tuned DIR")
    if args.tuned:
        result = analyze_models(args.base, args.tuned)
    else:
        result = analyze_adapter(args.adapter, base=args.base)
    pattern = recommend_rank(result, args.recommend_rank) if args.recommend_rank is not None else None
    plots = save_plots(result, args.plots) if args.plots else []
    if args.json:
        out = {**result.to_dict(), "plots": [str(p) for p in plots]}
        if pattern is not None:
            out["rank_pattern"] = pattern
        print(json.dumps(out, indent=2))
    elif pattern is not None:
        print(f"# smallest rank per module type holding {args.recommend_rank:g} of |dW|_F^2 in most layers "
              "(LoraConfig rank_pattern):", file=sys.stderr)
        print(json.dumps(pattern))
    else:
        print(format_table(result))
    for p in plots:
        print(f"wrote {p}", file=sys.stderr)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """A PEFT-format adapter from base + tuned models by truncated SVD of each Linear's ΔW."""
    from ..analysis.extract import extract, format_extract

    result = extract(args.base, args.tuned, args.out, r=args.r, energy=args.energy, data=args.data,
                     batches=args.batches)
    print(json.dumps(result, indent=2) if args.json else format_extract(result))
    return 0


def add_analysis_verbs(sub) -> None:
    p = sub.add_parser("analyze", help="SVD of the weight update: energy at rank k, effective rank, per module")
    p.add_argument("adapter", nargs="?", default=None, help="adapter directory (PEFT format)")
    p.add_argument("--base", default=None, help="base model directory (for --tuned, or |dW|/|W| of an adapter)")
    p.add_argument("--tuned", default=None, help="fully fine-tuned model directory (compared with --base)")
    p.add_argument("--json", action="store_true", help="print every number as JSON")
    p.add_argument("--plots", default=None, metavar="DIR", help="write spectra.png and k95_heatmap.png here")
    p.add_argument("--recommend-rank", type=float, default=None, metavar="ENERGY",
                   help="print a rank_pattern: per module type the smallest rank holding ENERGY (e.g. 0.9)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("extract", help="turn a full fine-tune into a LoRA adapter (truncated SVD of each ΔW)")
    p.add_argument("--base", required=True, help="base model directory (or smollm2-135m-instruct, a .gguf)")
    p.add_argument("--tuned", required=True, help="fine-tuned model directory of the same architecture")
    rank = p.add_mutually_exclusive_group(required=True)
    rank.add_argument("--r", type=int, help="fixed rank for every module")
    rank.add_argument("--energy", type=float, help="per module, the smallest rank holding this fraction of |dW|^2")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--data", default=None, help="JSONL or packaged task (valid split): eval loss of base, tuned, "
                                                "base+adapter")
    p.add_argument("--batches", type=int, default=4, help="batches of 8 examples to evaluate (default 4)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_extract)


# ---- planners ------------------------------------------------------------------------------------

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
    from ..plan.memory import PlanInputs
    from ..plan.report import build_plan, format_plan

    inputs = PlanInputs(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, optimizer=args.optimizer,
                        grad_checkpointing=args.grad_checkpointing, label_fraction=args.label_fraction,
                        padded=not args.no_padding, nproc=args.nproc, fsdp=args.fsdp)
    model, cfg = meta_model(args.model), lora_config_from_args(args)
    doc = build_plan(model, count_model(model, cfg), inputs, select_gpus(args.gpus, args.price),
                     parse_count(args.tokens), args.mfu, cfg.lora_dropout)
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
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=512, help="tokens per sequence after padding")
    g.add_argument("--grad-checkpointing", action="store_true")
    g.add_argument("--label-fraction", type=float, default=1.0, help="share of positions with a loss (logits "
                   "are computed there only)")
    g.add_argument("--no-padding", action="store_true", help="sequences in a batch have equal length")
    g.add_argument("--nproc", type=int, default=1, help="devices in a torchrun job: memory is per device, "
                   "--batch-size is the global batch")
    g.add_argument("--fsdp", action="store_true", help="with --nproc: FSDP2 shards weights, gradients and "
                   "optimizer state (default: DDP replicates them)")
    g.add_argument("--tokens", default="100M", help="tokens to train on, e.g. 2e9, 500M (default 100M)")
    g.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    g.add_argument("--gpus", nargs="+", default=None, help="GPU presets (default: all)")
    g.add_argument("--price", nargs="+", default=None, metavar="[GPU=]USD", help="price per GPU-hour")
    p.add_argument("--json", action="store_true")
    p.add_argument("--explain", action="store_true", help="print each row's formula")
    p.set_defaults(func=cmd_plan)


# ---- serving -------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a base model and its adapters over an OpenAI-compatible HTTP API until interrupted."""
    import uvicorn

    from ..errors import ConfigError
    from ..serve.app import create_app
    from ..serve.engine import Limits, engine_from_spec

    adapters: dict[str, str] = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in adapters:
            raise ConfigError(f"--adapter {item!r}: give NAME=DIR, each name once")
        adapters[name] = path
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        raise ConfigError(f"--adapter-root {args.adapter_root}: not a directory")
    limits = Limits(**{k: v for k, v in vars(args).items() if k in Limits.__dataclass_fields__ and v is not None})
    engine = engine_from_spec(args.model, adapters, name=args.served_model_name, limits=limits,
                              dtype=args.dtype, device=args.device)
    print(f"lorakit serve: {engine.name} with adapters {list(adapters) or 'none'} on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(engine, args.adapter_root), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_serve_verb(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base model, many adapters, batched")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model spec (default: the embedded model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="adapter to load at start (repeatable); requests select it with \"model\": NAME")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="POST /v1/adapters may load only directories inside DIR (omit: no runtime loading)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="id of the base model (default: the spec's name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    g = p.add_argument_group("limits (defaults: lorakit.serve.Limits)")
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (2048)")
    g.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for (512)")
    g.add_argument("--max-adapters", type=int, default=None,
                   help="adapters held at once; the least recently used idle one is unloaded past it (16)")
    g.add_argument("--max-batch-size", type=int, default=None, help="requests generated together at most (8)")
    g.add_argument("--batch-window-ms", type=float, default=None,
                   help="how long to wait for more requests to batch with the first (10)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
