"""`lorakit serve`: the OpenAI-compatible multi-adapter server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import dtype_type


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a base model and its adapters over an OpenAI-compatible HTTP API until interrupted."""
    import uvicorn

    from ..errors import ConfigError
    from ..models.dtype import resolve_dtype
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
    dtype, why = resolve_dtype(args.dtype, args.device)
    print(f"lorakit serve: base weights in {dtype} ({why})", file=sys.stderr)
    limits = Limits(**{k: v for k, v in vars(args).items() if k in Limits.__dataclass_fields__ and v is not None})
    engine = engine_from_spec(args.model, adapters, name=args.served_model_name, limits=limits,
                              dtype=dtype, device=args.device)
    print(f"lorakit serve: {engine.name} with adapters {list(adapters) or 'none'} on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    app = create_app(engine, args.adapter_root, load_on_first_use=args.load_on_first_use)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_serve_verb(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base model, many adapters, batched")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model spec (default: the embedded model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="adapter to load at start (repeatable); requests select it with \"model\": NAME")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="runtime loading (POST /v1/adapters, /v1/load_lora_adapter, and a request naming a "
                        "directory of DIR: load on first use) reads only directories inside DIR (omit: none)")
    p.add_argument("--no-load-on-first-use", dest="load_on_first_use", action="store_false",
                   help="a request for an adapter that is not loaded is refused (404) even when --adapter-root "
                        "holds a directory of that name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="id of the base model (default: the spec's name)")
    p.add_argument("--dtype", type=dtype_type(allow_auto=True), default="auto",
                   help="base weights: auto (default: bfloat16 where the device computes it natively, else "
                        "float32), float32 / fp32, bfloat16 / bf16, float16 / fp16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    g = p.add_argument_group("limits (defaults: lorakit.serve.Limits)")
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (2048)")
    g.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for (512)")
    g.add_argument("--max-adapters", type=int, default=None,
                   help="adapters held at once; the least recently used idle one is unloaded past it (16)")
    g.add_argument("--max-batch-size", type=int, default=None, help="rows (prompts x n) in flight at most (8)")
    g.add_argument("--batch-window-ms", type=float, default=None,
                   help="--scheduler window: how long to wait for more requests to batch with the first (10)")
    g.add_argument("--scheduler", choices=["continuous", "window"], default=None,
                   help="continuous: rows join and leave the batch at every decoding step (default); "
                        "window: batches gathered for --batch-window-ms, each generated to completion")
    g.add_argument("--admission", choices=["shortest", "fcfs"], default=None,
                   help="--scheduler continuous: which waiting requests join the batch first. shortest "
                        "(default): the highest (decoding steps waited + 1) / max_tokens, so short requests go "
                        "first and long ones cannot starve; fcfs: oldest first")
    g.add_argument("--max-request-bytes", type=int, default=None,
                   help="request bodies larger than this get 413 before parsing (1048576)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
