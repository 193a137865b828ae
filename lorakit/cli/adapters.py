"""`lorakit targets | merge | info`: which modules a config adapts, merging, describing an adapter."""

from __future__ import annotations

import argparse
import json

from .common import add_lora_args, dtype_type, lora_config_from_args, meta_model


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

    report = merge_to_directory(args.base, args.adapter, args.out, dtype=args.dtype, quantize=args.quantize,
                                double_quant=args.double_quant)
    q = report["quantization"]
    if q:
        print(f"merged into the {q['method']}-dequantized base: its {q['layers']} quantized Linear layers are saved "
              f"as plain {report['dtype']} weights, dequantize(W) + ΔW (re-quantizing would lose most of ΔW)")
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


def add_adapter_verbs(sub) -> None:
    p = sub.add_parser("targets", help="list the modules a LoRA config adapts (dry run)")
    p.add_argument("model", help="model spec: smollm2-135m-instruct, a local model dir, a .gguf, or a config.json")
    add_lora_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("merge", help="merge an adapter into its base and save a plain model directory")
    p.add_argument("--base", required=True, help="base model spec")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--out", required=True, help="output directory (transformers format, safetensors)")
    p.add_argument("--dtype", type=dtype_type(), default="float32",
                   help="dtype of the saved weights: float32 (default), bfloat16 / bf16, float16 / fp16")
    p.add_argument("--quantize", choices=["nf4", "fp4", "int8"], default=None,
                   help="the adapter was trained with --quantize: merge into the base quantized the same way "
                   "(its dequantized weights, what the adapter saw), not into the original weights")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="with a 4-bit --quantize: double-quantized scales, as in training (default on)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="describe an adapter directory")
    p.add_argument("adapter")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

