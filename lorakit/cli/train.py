"""`lorakit train | eval | generate`: run a recipe, score a model (+ adapter), answer a prompt."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

from .common import dtype_type


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune with a recipe (YAML) overridden by flags; prints the before/after table."""
    from ..train.loop import train
    from ..train.recipe import TrainConfig, load_recipe

    fields = TrainConfig.__dataclass_fields__
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    cfg = load_recipe(args.recipe, overrides)
    if getattr(args, "command_line", False):
        restart_with_allocator(cfg.cpu_allocator, args.argv)  # before torchrun: its workers inherit it
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ..train.distributed import launch

        return launch(args.nproc, _without_nproc(args.argv))
    from ..plan.fit import check_fit

    summary = train(cfg, fit_check=check_fit)
    if "paused_at" in summary:
        print(f"paused after step {summary['paused_at']}; checkpoint {summary['checkpoint']}; continue with --resume")
    elif summary:  # empty on ranks other than 0
        print_summary(summary)
    return 0


def restart_with_allocator(choice: str, argv: list[str]) -> None:
    """Replace this process by the same ``lorakit train`` with tcmalloc preloaded, when ``choice`` asks
    for it and it is not loaded yet (``train/memory.py``: glibc's malloc inflates a CPU run's RSS). The
    torchrun workers of ``--nproc`` inherit the environment. Returns only when nothing is to be done."""
    from ..train.memory import preload_env

    env = preload_env(choice, dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "lorakit", *argv], env)


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
    from ..train.result import held_out_figures

    rows = [(f"held-out {name.replace('_', ' ')}", _figure(s["before"], name), _figure(s["after"], name))
            for name in held_out_figures(s)]
    def loss(value):
        return "n/a" if value is None else f"{value:.4f}"

    rows += [("eval loss (final / best)", "", f"{loss(s['final_eval_loss'])} / {loss(s['best_eval_loss'])}"),
            ("trainable params", "", f"{s['trainable_params']:,} ({s['trainable_percent']:.3f}%)"),
            ("train wall time", "", f"{s['train_wall_s']:.1f} s over {s['steps']} steps"),
            ("throughput", "", f"{s['tokens_per_s'] or 0:.0f} tokens/s"),
            ("peak memory", "", f"{s['peak_memory_mb']:.0f} MB")]
    print(f"\n{'':<26} {'before':>10} {'after':>24}")
    for name, before, after in rows:
        print(f"{name:<26} {before:>10} {after:>24}")
    print(f"\n{s['mode']} result: {s['output']}")


def _figure(block: dict | None, name: str) -> str:
    value = (block or {}).get(name)
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if name.endswith(("match", "accuracy", "rate")) else f"{value:.4f}"


def _load_for_inference(model_spec: str, adapter: str | None, dtype: str = "auto"):

    from ..models.dtype import resolve_dtype
    from ..models.load import load_model

    if adapter:
        from ..lora.io import read_adapter

        cfg, _, _ = read_adapter(adapter)
        model_spec = model_spec or cfg.base_model_name_or_path
    dtype, why = resolve_dtype(dtype, "cpu")
    print(f"lorakit: base weights in {dtype} ({why})", file=sys.stderr)
    model, tokenizer = load_model(model_spec or "smollm2-135m-instruct", dtype=dtype)
    if adapter:
        from ..lora.apply import load_adapter

        load_adapter(model, adapter)
    return model, tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    """Eval loss and greedy exact match of a model (+ adapter) on a task's test split."""
    from ..data.readers import read_records
    from ..data.tasks import task_names, task_path
    from ..data.tokenize import tokenize_examples
    from ..train.evaluate import eval_loss, exact_match_score

    model, tokenizer = _load_for_inference(args.model, args.adapter, args.dtype)
    data = Path(args.data) if Path(args.data).exists() or args.data not in task_names() else task_path(args.data, "test")
    records = read_records(data)  # JSONL, JSON, CSV, Parquet or a save_to_disk directory, in any format
    examples = list(itertools.islice(records, args.limit or None))
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

    model, tokenizer = _load_for_inference(args.model, args.adapter, args.dtype)
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


SWITCH_VALUES = {"--gradient-checkpointing": ("on", "off", "auto", "true", "false", "yes", "no")}


def bind_switch_values(argv: list[str]) -> list[str]:
    """``--gradient-checkpointing`` is a switch that also takes a value (``auto``); argparse would take
    whatever word follows it as that value, so ``train --gradient-checkpointing RECIPE.yaml`` lost its
    recipe. A following word that is none of the switch's values stays where it is (the switch means on)."""
    out = list(argv)
    for i, token in enumerate(argv[:-1]):
        nxt = argv[i + 1]
        if token in SWITCH_VALUES and not nxt.startswith("-") and nxt.lower() not in SWITCH_VALUES[token]:
            out[i] = token + "=on"
    return out


def add_train_verbs(sub) -> None:
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
        p.add_argument("--dtype", type=dtype_type(allow_auto=True), default="auto", help="base weights: auto "
                       "(default: bfloat16 where the CPU computes it natively, else float32), fp32, bf16, fp16")
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

