"""What the serving engine accepts (Limits, the adapters it refuses to serve next to others, prompt
characters), the errors it answers with, and its counters (Stats)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LorakitError


class ServeError(LorakitError):
    """A request the engine refuses; ``status`` is the HTTP status the server answers with, ``param`` the
    request field at fault (if one is)."""

    status = 400

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class NotFoundError(ServeError):
    status = 404


class ForbiddenError(ServeError):
    status = 403


class ConflictError(ServeError):
    status = 409


SCHEDULERS = ("continuous", "window")
ADMISSIONS = ("shortest", "fcfs")  # lorakit.serve.admission


@dataclass
class Limits:
    """What the engine accepts.

    Args:
        max_prompt_tokens: longest prompt, in tokens.
        max_tokens: largest ``max_tokens`` a request may ask for.
        max_adapters: adapters held at once; loading one more unloads the least recently used idle one.
        max_batch_size: rows (prompt x n) in flight at most; the KV cache holds at most this many rows.
        batch_window_ms: window scheduler only: how long to wait for more requests after the first one.
        scheduler: "continuous" (rows join and leave at every decoding step) or "window" (a batch
            gathered for batch_window_ms, generated to completion).
        admission: continuous scheduler only: which waiting rows join first. "shortest" (highest response
            ratio next: (decoding steps waited + 1) / max_tokens, so short requests go first and long ones
            cannot starve) or "fcfs" (oldest first). See :mod:`lorakit.serve.admission`.
        max_request_bytes: largest HTTP request body; larger ones get 413 before they are parsed.
    """

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_adapters: int = 16
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    scheduler: str = "continuous"
    admission: str = "shortest"
    max_request_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_adapters", "max_batch_size", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ServeError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ServeError(f"Limits.batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.scheduler not in SCHEDULERS:
            raise ServeError(f"Limits.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.admission not in ADMISSIONS:
            raise ServeError(f"Limits.admission must be one of {ADMISSIONS}, got {self.admission!r}")


@dataclass
class Stats:
    """Counters for tests and /health: requests submitted, batches prefilled (window: run), the most rows
    in flight at once, decoding steps run (continuous scheduler), rows in flight now, and prompt tokens
    prefilled and saved by prefix sharing (a request's n choices, prompts that begin alike)."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    steps: int = 0
    running: int = 0
    prefill_tokens: int = 0
    shared_prefix_tokens: int = 0


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (byte-level BPE spells each byte as one character)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(t) for t in vocab), default=0) or 64


def refuse_unservable(name: str, path: Path) -> None:
    """Adapters a shared base with per-row adapters cannot run exactly: DoRA (its magnitude rescales the
    base output per row), PiSSA/OLoRA (they rewrite the base) and trained biases (they replace the base's)."""
    import json

    from ..lora.config import moves_base

    try:
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # load_adapter names what is wrong with the directory
    if not isinstance(cfg, dict):
        return
    why = ("it uses DoRA, whose magnitude rescales the base output per row" if cfg.get("use_dora") else
           f"it was initialised with init_lora_weights={cfg['init_lora_weights']!r}, which rewrites the shared base "
           "weights (save it with convert_to_lora=True for a plain LoRA)" if moves_base(cfg.get("init_lora_weights"))
           else f"it trains biases (bias={cfg['bias']!r}), which replace the shared base's" if
           cfg.get("bias", "none") != "none" else None)
    if why:
        raise ServeError(f"adapter {name!r} cannot be served next to others: {why}; merge it into its own model "
                         "(lorakit merge) and serve that")
