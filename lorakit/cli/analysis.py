"""`lorakit analyze | extract`: spectra of weight updates, adapters extracted from fine-tuned models."""

from __future__ import annotations

import argparse
import json
import sys


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
