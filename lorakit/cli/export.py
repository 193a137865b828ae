"""`lorakit export`: an adapter as a GGUF LoRA for llama.cpp, a merged GGUF model, an Ollama Modelfile;
`lorakit export native ADAPTER --model SPEC --out FILE`: merged into a custom model's own checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def cmd_export(args: argparse.Namespace) -> int:
    """Write the GGUF files (and Modelfile) asked for; at least one of --gguf, --merged-gguf, --ollama."""
    from ..errors import ConfigError

    if args.adapter == "native" and args.native_adapter:
        return _export_native(args)
    if args.native_adapter:
        raise ConfigError(f"unexpected argument {args.native_adapter!r}; a native export is: lorakit export native "
                          "ADAPTER --model MODULE:FUNCTION --out FILE.safetensors")
    from ..export.gguf import export_adapter_gguf
    from ..export.gguf_merged import export_merged_gguf, gguf_source

    if not (args.gguf or args.merged_gguf or args.ollama):
        raise ConfigError("say what to write: --gguf OUT.gguf (a LoRA adapter for llama.cpp), --merged-gguf "
                          "OUT.gguf (the merged model) and/or --ollama DIR (a Modelfile)")
    base = args.base or _adapter_base(args.adapter)
    adapter_out, merged_out = args.gguf, args.merged_gguf
    if args.ollama and not adapter_out and not merged_out:  # the Modelfile needs GGUF files to point to
        if gguf_source(base) is not None:
            adapter_out = str(Path(args.ollama) / "adapter.gguf")
        else:
            merged_out = str(Path(args.ollama) / "model.gguf")
    if args.ollama and not merged_out and gguf_source(base) is None:  # checked before anything is written
        raise ConfigError(f"--ollama with --gguf needs a GGUF base for FROM, and {base} is not one; "
                          "add --merged-gguf OUT.gguf to build the Modelfile on the merged model")
    if adapter_out:
        r = export_adapter_gguf(args.adapter, adapter_out, base=base, outtype=args.outtype or "f32")
        print(f"wrote {r['out']}: GGUF LoRA adapter for {r['architecture']}, {r['pairs']} tensor pairs, "
              f"alpha {r['alpha']:g}, types {', '.join(r['types'])}")
    if merged_out:
        r = export_merged_gguf(args.adapter, merged_out, base=base, outtype=args.outtype)
        kinds = sorted(set(r["types"].values()))
        print(f"wrote {r['out']}: merged {r['architecture']} model from {r['source']}, {r['adapted']} adapted "
              f"tensors written as {', '.join(kinds)}" + (f", added {', '.join(r['added'])}" if r["added"] else ""))
    if args.ollama:
        _write_modelfile(args.ollama, base, adapter_out, merged_out)
    return 0


def _export_native(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..export.native import export_native
    from ..lora.io import read_adapter
    from ..models.custom import is_custom_spec

    spec = args.model or read_adapter(args.native_adapter)[0].base_model_name_or_path
    if not is_custom_spec(spec) or not args.out:
        raise ConfigError("lorakit export native needs --model MODULE:FUNCTION (or file.py:FUNCTION; default: the "
                          "adapter's base_model_name_or_path when it is one) and --out FILE.safetensors or FILE.pt")
    r = export_native(args.native_adapter, spec, args.out, weights=args.weights, allow_missing=args.allow_missing_keys,
                      inputs=args.inputs)
    tied = "; tied: " + ", ".join(" = ".join(g) for g in r["tied"]) if r["tied"] else ""
    print(f"wrote {r['out']}: {r['keys']} tensors under the model's own names, merged; a fresh build loads it "
          f"strictly and matches the adapted model to {r['max_diff']:.2g}{tied}")
    return 0


def _adapter_base(adapter: str) -> str:
    from ..lora.io import read_adapter
    from ..models.load import DEFAULT_MODEL

    cfg, _, _ = read_adapter(adapter)
    return cfg.base_model_name_or_path or DEFAULT_MODEL


def _write_modelfile(folder: str, base: str, adapter_out: str | None, merged_out: str | None) -> None:
    from ..export.gguf_merged import gguf_source
    from ..export.ollama import write_modelfile

    if merged_out:
        path = write_modelfile(folder, merged_out)
    else:
        path = write_modelfile(folder, gguf_source(base), adapter_out)
    print(f"wrote {path}; build it with: ollama create NAME -f {path}")


def add_export_verb(sub) -> None:
    p = sub.add_parser("export", help="write an adapter as GGUF (llama.cpp), a merged GGUF model, an Ollama Modelfile")
    p.add_argument("adapter", help="adapter directory (PEFT format); or 'native' followed by the adapter directory")
    p.add_argument("native_adapter", nargs="?", metavar="ADAPTER", help=argparse.SUPPRESS)
    p.add_argument("--gguf", metavar="OUT.gguf", help="a GGUF LoRA adapter llama.cpp and Ollama load onto the base")
    p.add_argument("--merged-gguf", metavar="OUT.gguf",
                   help="the base with the adapter merged, one GGUF model (metadata and tokenizer of the base)")
    p.add_argument("--ollama", metavar="DIR", help="write DIR/Modelfile (FROM base + ADAPTER, or FROM the merged "
                   "model); with neither --gguf nor --merged-gguf the GGUF goes into DIR too")
    p.add_argument("--base", help="base model spec: a .gguf, a model directory or the embedded default "
                   "(default: the adapter's base_model_name_or_path, else the embedded model)")
    p.add_argument("--outtype", choices=OUTTYPES, default=None,
                   help="type of the written LoRA / adapted tensors (adapter default f32; merged default: a float "
                        "base tensor keeps its type, a quantized one becomes f16; never 4-bit)")
    native = p.add_argument_group("lorakit export native ADAPTER: merge into a custom model's own checkpoint")
    native.add_argument("--model", metavar="MODULE:FUNCTION", help="the builder the adapter was trained on "
                        "(also path/to/file.py:FUNCTION)")
    native.add_argument("--weights", metavar="FILE", help="its pretrained weights (.safetensors, or a torch "
                        "checkpoint read weights-only)")
    native.add_argument("--allow-missing-keys", action="store_true", help="accept model keys --weights lacks")
    native.add_argument("--inputs", metavar="FILE", help="named tensors (the forward's keyword arguments) to check "
                        "the merge on; default: example_inputs(model) beside the builder")
    native.add_argument("--out", metavar="FILE", help="FILE.safetensors or FILE.pt (a plain dict of tensors)")
    p.set_defaults(func=cmd_export)
