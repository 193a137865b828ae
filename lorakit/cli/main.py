"""`lorakit <verb>`: argument parsing only; each verb calls library functions that tests call too."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import LorakitError
from .tools import (
    add_analysis_verbs,
    add_lora_args,
    add_planner_verbs,
    add_serve_verb,
    lora_config_from_args,
    meta_model,
)

# ---- verbs --------------------------------------------------------------------------------------

def cmd_targets(args: argparse.Namespace) -> int:
    """List the modules a LoRA config adapts, with shapes and parameter counts; changes nothing."""
    from ..lora.inject import plan_injection

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
    from ..export.merged import merge_to_directory

    report = merge_to_directory(args.base, args.adapter, args.out, dtype=args.dtype)
    print(f"wrote {args.out} ({report['dtype']}); max |logits(merged) - logits(unmerged)| on a check "
          f"batch = {report['max_abs_diff']:.3g}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe an adapter directory: config, modules, ranks, parameters, bytes."""
    from ..lora.io import read_adapter

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
    from ..train.loop import train
    from ..train.recipe import TrainConfig, load_recipe

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ..train.distributed import launch

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
    from ..models.load import load_model

    if adapter:
        from ..lora.io import read_adapter

        cfg, _, _ = read_adapter(adapter)
        model_spec = model_spec or cfg.base_model_name_or_path
    model, tokenizer = load_model(model_spec or "smollm2-135m-instruct")
    if adapter:
        from ..lora.io import load_adapter

        load_adapter(model, adapter)
    return model, tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    """Eval loss and greedy exact match of a model (+ adapter) on a task's test split."""
    from ..data.core import load_jsonl, tokenize_examples
    from ..data.tasks import task_names, task_path
    from ..train.evaluate import eval_loss, exact_match_score

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
    from ..train.evaluate import generate

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

    from ..train.recipe import add_train_args

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
    add_analysis_verbs(sub)
    add_serve_verb(sub)
    add_planner_verbs(sub)
    return parser


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

