"""The LoRA flags that several verbs share, and the meta-device model they count on."""

from __future__ import annotations

import argparse


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
    g.add_argument("--dora", action="store_true", default=None, help="DoRA: count its magnitude vectors (use_dora)")
    g.add_argument("--bias", choices=("none", "all", "lora_only"), default=None, help="biases trained with the adapter")


def dtype_type(allow_auto: bool = False):
    """An argparse ``type=`` for dtype flags: short names too (bf16, fp16, fp32), as their canonical name."""
    def dtype(value: str) -> str:
        from ..errors import ConfigError
        from ..models.dtype import parse_dtype

        try:
            return parse_dtype(value, allow_auto=allow_auto)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return dtype


def lora_config_from_args(args: argparse.Namespace, **extra):
    """Build a LoraConfig from add_lora_args flags."""
    from ..lora.config import LoraConfig, target_modules_from_flags

    target = target_modules_from_flags(args.target_modules)
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=target,
                      exclude_modules=args.exclude_modules, layers_to_transform=args.layers,
                      use_rslora=bool(args.rslora), use_dora=bool(getattr(args, "dora", None)),
                      bias=getattr(args, "bias", None) or "none", **extra)


def meta_model(spec: str):
    """Build ``spec``'s architecture (preset | config.json | model spec) on the meta device: no memory, no weights."""
    from ..plan.count import meta_model as build

    return build(spec)
