"""The serving engine: one base model, many adapters, requests batched across adapters in a worker thread.

Requests wait in a queue; the worker takes the first, gathers more for up to ``batch_window_ms`` (or
until ``max_batch_size``), and generates for all of them in one mixed-adapter batch
(``lorakit.mixed_batch``), each row with its own adapter and sampling settings. Adapters are
loaded at start or at runtime; past ``max_adapters`` the least recently used idle one is unloaded.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, LorakitError
from ..lora.adapters import delete_adapter, list_adapters
from ..lora.io import load_adapter
from ..lora.layer import ModulesToSave
from ..lora.merge import merged_adapters
from .decode import Event, Row, SamplingParams, run_batch

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


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


@dataclass
class Limits:
    """What the engine accepts.

    Args:
        max_prompt_tokens: longest prompt, in tokens.
        max_tokens: largest ``max_tokens`` a request may ask for.
        max_adapters: adapters held at once; loading one more unloads the least recently used idle one.
        max_batch_size: requests generated together at most.
        batch_window_ms: how long the worker waits for more requests after the first one arrives.
    """

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_adapters: int = 16
    max_batch_size: int = 8
    batch_window_ms: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_adapters", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ServeError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ServeError(f"Limits.batch_window_ms must be >= 0, got {self.batch_window_ms}")


@dataclass
class _Slot:
    """An adapter the engine holds: where it came from and how many queued or running requests use it."""

    path: str
    created: int = field(default_factory=lambda: int(time.time()))
    pending: int = 0


@dataclass
class Stats:
    """Counters for tests and /health: batches run and the largest batch so far."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0


class Engine:
    """Batched multi-adapter generation over one base model.

    Args:
        model: a causal LM (eval mode); adapters already in it are served under their names.
        tokenizer: its tokenizer.
        name: the id the base model is served under (``model`` field of a request).
        limits: request and capacity limits.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, name: str = "base", limits: Limits | None = None):
        if merged_adapters(model):
            raise ServeError(f"adapters {merged_adapters(model)} are merged into the model; unmerge them first "
                             "(the engine adds each request's adapter to the base weights itself)")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.limits = limits or Limits()
        self.stats = Stats()
        self.created = int(time.time())
        self._slots: OrderedDict[str, _Slot] = OrderedDict((n, _Slot("")) for n in list_adapters(model))
        self._registry = threading.Lock()  # guards _slots and stats (held briefly)
        self._model_lock = threading.Lock()  # guards the model: a batch, or an adapter load/unload
        self._queue: queue.Queue[Row | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.context_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the worker thread (idempotent); returns self."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the batch it is running; queued requests get an error event."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None
        while not self._queue.empty():
            row = self._queue.get_nowait()
            if row is not None:
                self._release([row])
                row.finish("error", "the server is shutting down")

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- adapters ------------------------------------------------------------------------------

    def adapters(self) -> dict[str, int]:
        """Adapter name -> load time (unix seconds), least recently used first."""
        with self._registry:
            return {n: s.created for n, s in self._slots.items()}

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT-format adapter under ``name``; past ``max_adapters`` evict the LRU idle adapter.

        Args:
            name: letters, digits, '-' and '_'; not the base model's name nor a loaded adapter's.
            path: adapter directory (trusted here: the HTTP layer checks it against --adapter-root).
        """
        if not name or not set(name) <= _NAME_CHARS or len(name) > 64:
            raise ServeError(f"adapter name {name!r} must be 1-64 letters, digits, '-' or '_'")
        with self._model_lock:
            with self._registry:
                if name == self.name or name in self._slots:
                    raise ConflictError(f"model {name!r} is already loaded; unload it first or pick another name")
                victim = self._eviction_candidate()
            if victim is not None:
                self._unload_locked(victim)
            load_adapter(self.model, path, name, activate=False)
            if any(isinstance(m, ModulesToSave) and name in m.adapters for m in self.model.modules()):
                delete_adapter(self.model, name)
                raise ServeError(f"adapter {name!r} replaces whole modules (modules_to_save), which a "
                                 "mixed-adapter batch cannot run per row; serve it merged as its own model")
            with self._registry:
                self._slots[name] = _Slot(str(path))

    def _eviction_candidate(self) -> str | None:
        if len(self._slots) < self.limits.max_adapters:
            return None
        idle = [n for n, s in self._slots.items() if s.pending == 0]  # OrderedDict: least recently used first
        if not idle:
            raise ConflictError(f"all {self.limits.max_adapters} adapter slots are in use by requests; "
                                "retry later or raise --max-adapters")
        return idle[0]

    def unload_adapter(self, name: str) -> None:
        """Unload adapter ``name`` and free its memory; refused while requests for it are queued or running."""
        with self._model_lock:
            with self._registry:
                slot = self._slots.get(name)
                if slot is None:
                    raise NotFoundError(f"no adapter named {name!r}; loaded: {list(self._slots) or 'none'}")
                if slot.pending:
                    raise ConflictError(f"adapter {name!r} is used by {slot.pending} request(s); retry when they end")
            self._unload_locked(name)

    def _unload_locked(self, name: str) -> None:
        delete_adapter(self.model, name)
        with self._registry:
            self._slots.pop(name, None)

    # ---- requests ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt, refused when longer than max_prompt_tokens or empty."""
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise ServeError("the prompt is empty (0 tokens)", "prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise ServeError(f"the prompt has {len(ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)", "prompt")
        return ids

    def submit(self, prompt_ids: list[int], model: str, params: SamplingParams, sink: Callable[[Event], None],
               index: int = 0) -> Row:
        """Queue a generation; ``sink`` gets its Events from the worker thread. Returns the Row (to cancel).

        Args:
            prompt_ids: token ids (see :meth:`encode`).
            model: the base model's name or an adapter's name.
            params: sampling settings (max_tokens is checked against the limits).
            sink: called with each Event; must not block.
            index: the choice index put on the Events.
        """
        if params.max_tokens < 1 or params.max_tokens > self.limits.max_tokens:
            raise ServeError(f"max_tokens={params.max_tokens} is out of range; this server allows 1 to "
                             f"{self.limits.max_tokens} (--max-tokens)", "max_tokens")
        if self.context_length and len(prompt_ids) + params.max_tokens > self.context_length:
            raise ServeError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context length of {self.context_length} tokens", "max_tokens")
        with self._registry:
            adapter = self._pin(model)
            self.stats.requests += 1
        row = Row(list(prompt_ids), adapter, params, sink, index)
        row.on_finish = lambda: self._release([row])
        self._queue.put(row)
        return row

    def _pin(self, model: str) -> str | None:
        if model == self.name:
            return None
        slot = self._slots.get(model)
        if slot is None:
            raise NotFoundError(f"model {model!r} not found; available: {[self.name, *self._slots]}", "model")
        slot.pending += 1
        self._slots.move_to_end(model)  # most recently used
        return model

    def _release(self, rows: list[Row]) -> None:
        """Unpin each row's adapter once: when the row finishes, or at the end of its batch at the latest."""
        with self._registry:
            for row in rows:
                if row.adapter is not None and not row.unpinned and row.adapter in self._slots:
                    self._slots[row.adapter].pending -= 1
                row.unpinned = True

    def generate(self, prompt: str, model: str | None = None, timeout: float = 300.0, **params) -> Event:
        """Blocking convenience: generate for one prompt and return one Event with the whole text.

        Args:
            prompt: prompt text (tokenized with special tokens, as /v1/completions does).
            model: adapter name, or None / the base name for the base model.
            timeout: seconds to wait for the result.
            **params: SamplingParams fields (max_tokens, temperature, top_p, seed, stop).
        """
        if "stop" in params:
            params["stop"] = tuple(params["stop"])
        events: queue.Queue[Event] = queue.Queue()
        self.submit(self.encode(prompt), model or self.name, SamplingParams(**params), events.put)
        parts, deadline = [], time.monotonic() + timeout
        while True:
            try:
                event = events.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise ServeError(f"no result within {timeout} s") from None
            parts.append(event.text)
            if event.finish_reason is not None:
                event.text = "".join(parts)
                if event.error:
                    raise ServeError(event.error)
                return event

    # ---- the worker ----------------------------------------------------------------------------

    def _next_batch(self) -> list[Row] | None:
        """Block for a first request, then gather more for the batching window. None: shut down."""
        first = self._queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.limits.batch_window_ms / 1000
        while len(batch) < self.limits.max_batch_size:
            try:
                row = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if row is None:
                self._queue.put(None)  # shut down after this batch
                break
            batch.append(row)
        return batch

    def _worker(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [r for r in batch if not r.cancelled.is_set()]
            try:
                if live:
                    with self._registry:  # counted before running: a request's last event may come first
                        self.stats.batches += 1
                        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
                    with self._model_lock:
                        run_batch(self.model, self.tokenizer, live, self.eos_ids, self.pad_id)
            except Exception as exc:  # a failing batch fails its requests, never the worker
                message = str(exc) if isinstance(exc, AdapterError) else f"{type(exc).__name__}: {exc}"
                for row in live:
                    row.finish("error", f"generation failed: {message}")
            finally:
                self._release(batch)


def engine_from_spec(spec: str, adapters: dict[str, str] | None = None, *, name: str | None = None,
                     limits: Limits | None = None, dtype: str = "float32", device: str = "cpu") -> Engine:
    """Load a base model once and the given adapters into a (not yet started) Engine.

    Args:
        spec: model spec as :func:`lorakit.models.load_model` takes it.
        adapters: {name: adapter directory} to load at start.
        name: the id the base model is served under (default: the spec's last path component).
        limits: request and capacity limits.
        dtype: parameter dtype of the base model.
        device: where to run.
    """
    from ..models.load import load_model

    limits = limits or Limits()
    if len(adapters or {}) > limits.max_adapters:
        raise ServeError(f"{len(adapters)} adapters given but max_adapters is {limits.max_adapters}; "
                         "raise --max-adapters")
    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    engine = Engine(model, tokenizer, name=name or Path(spec.rstrip("/")).name or spec, limits=limits)
    for adapter, path in (adapters or {}).items():
        engine.load_adapter(adapter, path)
    return engine
