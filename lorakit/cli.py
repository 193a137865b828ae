"""`lorakit <verb>`: argument parsing only; each verb calls library functions that tests call too."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import LorakitError


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
    from .config import LoraConfig, target_modules_from_flags

    target = target_modules_from_flags(args.target_modules)
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=target,
                      exclude_modules=args.exclude_modules, layers_to_transform=args.layers,
                      use_rslora=bool(args.rslora), **extra)


def meta_model(spec: str):
    """Build ``spec``'s architecture (preset | config.json | model spec) on the meta device: no memory, no weights."""
    from .count import meta_model as build

    return build(spec)


# ---- verbs --------------------------------------------------------------------------------------

def cmd_targets(args: argparse.Namespace) -> int:
    """List the modules a LoRA config adapts, with shapes and parameter counts; changes nothing."""
    from .inject import plan_injection

    model = meta_model(args.model)
    plan = plan_injection(model, lora_config_from_args(args))
    total = sum(p.numel() for p in model.parameters())
    if args.json:
        print(json.dumps([{"name": t.name, "kind": t.kind, "shape": list(t.shape), "r": t.r,
                           "lora_alpha": t.lora_alpha, "params": t.lora_params} for t in plan], indent=2))
        return 0
    width = max(len(t.name) for t in plan)
    print(f"{'module':<{width}}  {'kind':<9} {'d_out x d_in':>13} {'r':>4} {'LoRA params':>12}")
    for t in plan:
        shape = f"{t.shape[0]}x{t.shape[1]}"
        print(f"{t.name:<{width}}  {t.kind:<9} {shape:>13} {t.r:>4} {t.lora_params:>12,}")
    lora = sum(t.lora_params for t in plan)
    print(f"{len(plan)} modules, {lora:,} LoRA parameters = {100 * lora / (total + lora):.4f}% of "
          f"{total + lora:,} (base {total:,})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base model and write a plain transformers model directory."""
    from .export import merge_to_directory

    report = merge_to_directory(args.base, args.adapter, args.out, dtype=args.dtype)
    print(f"wrote {args.out} ({report['dtype']}); max |logits(merged) - logits(unmerged)| on a check "
          f"batch = {report['max_abs_diff']:.3g}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe an adapter directory: config, modules, ranks, parameters, bytes."""
    from .io import read_adapter

    cfg, tensors, metadata = read_adapter(args.adapter)
    params = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    info = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora,
            "target_modules": cfg.target_modules, "modules": len(modules), "tensors": len(tensors),
            "parameters": params, "payload_bytes": nbytes,
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
            "base_model_name_or_path": cfg.base_model_name_or_path,
            "lorakit_format_version": metadata.get("lorakit_format_version")}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>24}: {v}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune with a recipe (YAML) overridden by flags; prints the before/after table."""
    from .recipe import TrainConfig, load_recipe
    from .train import train

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .distributed import launch

        return launch(args.nproc, _without_nproc(args.argv))
    fields = TrainConfig.__dataclass_fields__
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    cfg = load_recipe(args.recipe, overrides)
    summary = train(cfg)
    if "paused_at" in summary:
        print(f"paused after step {summary['paused_at']}; checkpoint {summary['checkpoint']}; continue with --resume")
    elif summary:  # empty on ranks other than 0
        print_summary(summary)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append("--lora-r" if a == "--r" else "--lora-r=" + a[4:] if a.startswith("--r=") else a)
    return out


def print_summary(s: dict) -> None:
    """The before/after table of a finished run."""
    def em(block):
        return f"{100 * block['exact_match']:.1f}%" if block else "n/a"

    rows = [("held-out exact match", em(s["before"]), em(s["after"])),
            ("eval loss (final / best)", "", f"{s['final_eval_loss'] or float('nan'):.4f} / "
                                              f"{s['best_eval_loss'] or float('nan'):.4f}"),
            ("trainable params", "", f"{s['trainable_params']:,} ({s['trainable_percent']:.3f}%)"),
            ("train wall time", "", f"{s['train_wall_s']:.1f} s over {s['steps']} steps"),
            ("throughput", "", f"{s['tokens_per_s'] or 0:.0f} tokens/s"),
            ("peak memory", "", f"{s['peak_memory_mb']:.0f} MB")]
    print(f"\n{'':<26} {'before':>10} {'after':>24}")
    for name, before, after in rows:
        print(f"{name:<26} {before:>10} {after:>24}")
    print(f"\n{s['mode']} result: {s['output']}")


def _load_for_inference(model_spec: str, adapter: str | None):
    from .models import load_model

    if adapter:
        from .io import read_adapter

        cfg, _, _ = read_adapter(adapter)
        model_spec = model_spec or cfg.base_model_name_or_path
    model, tokenizer = load_model(model_spec or "smollm2-135m-instruct")
    if adapter:
        from .io import load_adapter

        load_adapter(model, adapter)
    return model, tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    """Eval loss and greedy exact match of a model (+ adapter) on a task's test split."""
    from .data import load_jsonl, tokenize_examples
    from .evaluate import eval_loss, exact_match_score
    from .tasks import task_names, task_path

    model, tokenizer = _load_for_inference(args.model, args.adapter)
    data = Path(args.data) if Path(args.data).exists() or args.data not in task_names() else task_path(args.data, "test")
    examples = load_jsonl(data)[: args.limit or None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = eval_loss(model, tokenize_examples(examples, tokenizer, args.max_seq_len), 16, pad)
    em = exact_match_score(model, tokenizer, examples, args.max_new_tokens, progress=True)
    result = {"data": str(data), "eval_loss": loss, **em}
    print(json.dumps(result, indent=2) if args.json else
          f"{data}: eval loss {loss:.4f}, exact match {100 * em['exact_match']:.1f}% of {em['n']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer a prompt (chat template applied unless --raw) with a model and optional adapter."""
    from .evaluate import generate

    model, tokenizer = _load_for_inference(args.model, args.adapter)
    prompt = args.prompt
    if not args.raw and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    kwargs = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    if args.temperature > 0:
        import torch

        torch.manual_seed(args.seed)
    print(generate(model, tokenizer, [prompt], args.max_new_tokens, **kwargs)[0])
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Singular values of ΔW per module, from an adapter or from --base and --tuned model directories."""
    from .analysis import analyze_adapter, analyze_models, recommend_rank
    from .analysis_report import format_table, save_plots
    from .errors import ConfigError

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
    from .extract import extract, format_extract

    result = extract(args.base, args.tuned, args.out, r=args.r, energy=args.energy, data=args.data,
                     batches=args.batches)
    print(json.dumps(result, indent=2) if args.json else format_extract(result))
    return 0


def _add_analysis_verbs(sub) -> None:
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


def cmd_count(args: argparse.Namespace) -> int:
    """Exact LoRA parameter count and adapter file size (meta device), or the formula for one --shape."""
    from .count import count_spec, format_count, format_shape, parse_shape, shape_count
    from .errors import ConfigError

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
    from .count import count_model
    from .gpus import parse_count, select_gpus
    from .plan import PlanInputs
    from .plan_report import build_plan, format_plan

    inputs = PlanInputs(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, optimizer=args.optimizer,
                        grad_checkpointing=args.grad_checkpointing, label_fraction=args.label_fraction,
                        padded=not args.no_padding, nproc=args.nproc, fsdp=args.fsdp)
    model, cfg = meta_model(args.model), lora_config_from_args(args)
    doc = build_plan(model, count_model(model, cfg), inputs, select_gpus(args.gpus, args.price),
                     parse_count(args.tokens), args.mfu, cfg.lora_dropout)
    print(json.dumps(doc, indent=2) if args.json else format_plan(doc, args.model, args.explain))
    return 0


def _add_planner_verbs(sub) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit for PyTorch")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("targets", help="list the modules a LoRA config adapts (dry run)")
    p.add_argument("model", help="model spec: smollm2-135m-instruct, a local model dir, a .gguf, or a config.json")
    add_lora_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("merge", help="merge an adapter into its base and save a plain model directory")
    p.add_argument("--base", required=True, help="base model spec")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--out", required=True, help="output directory (transformers format, safetensors)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="describe an adapter directory")
    p.add_argument("adapter")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    from .recipe import add_train_args

    p = sub.add_parser("train", help="fine-tune a model with LoRA (or --full) from a YAML recipe + flags")
    p.add_argument("recipe", nargs="?", default=None, help="YAML recipe (default: the packaged demo recipe)")
    add_train_args(p)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine: relaunches itself under "
                   "torchrun (DDP; with --fsdp, FSDP2). Multi-node: run torchrun -m lorakit train yourself")
    p.set_defaults(func=cmd_train)

    for verb, helptext in (("eval", "eval loss + greedy exact match on a test split"),
                           ("generate", "generate an answer to a prompt")):
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("--model", default=None, help="base model spec (default: the adapter's base, else "
                                                      "smollm2-135m-instruct)")
        p.add_argument("--adapter", default=None, help="adapter directory; omit for the base model alone")
        p.add_argument("--max-new-tokens", type=int, default=32 if verb == "generate" else 16)
        if verb == "eval":
            p.add_argument("--data", default="dates", help="JSONL file or packaged task (its test split)")
            p.add_argument("--limit", type=int, default=0, help="score at most N examples (0: all)")
            p.add_argument("--max-seq-len", type=int, default=256)
            p.add_argument("--json", action="store_true")
            p.set_defaults(func=cmd_eval)
        else:
            p.add_argument("prompt")
            p.add_argument("--raw", action="store_true", help="do not apply the chat template")
            p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
            p.add_argument("--seed", type=int, default=0)
            p.set_defaults(func=cmd_generate)
    _add_analysis_verbs(sub)
    _add_serve_verb(sub)
    _add_planner_verbs(sub)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a base model and its adapters over an OpenAI-compatible HTTP API until interrupted."""
    import uvicorn

    from .errors import ConfigError
    from .serve.app import create_app
    from .serve.engine import Limits, engine_from_spec

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


def _add_serve_verb(sub) -> None:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except LorakitError as exc:
        print(f"lorakit {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

