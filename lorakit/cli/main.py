"""`lorakit <verb>`: the parser, assembled from one module per group of verbs, and the entry point.

Parsing only: each verb calls library functions that tests call too.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LorakitError
from .adapters import add_adapter_verbs
from .analysis import add_analysis_verbs
from .export import add_export_verb
from .plan import add_planner_verbs
from .serve import add_serve_verb
from .train import add_train_verbs, bind_switch_values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit for PyTorch")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_adapter_verbs(sub)
    add_train_verbs(sub)
    add_analysis_verbs(sub)
    add_export_verb(sub)
    add_serve_verb(sub)
    add_planner_verbs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``lorakit`` with ``argv`` (None: the process's own command line, which a verb may restart with
    another environment; a list, as tests pass, never is)."""
    command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        argv = bind_switch_values(argv)
    args = build_parser().parse_args(argv)
    args.argv, args.command_line = argv, command_line
    try:
        return args.func(args)
    except LorakitError as exc:
        print(f"lorakit {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
