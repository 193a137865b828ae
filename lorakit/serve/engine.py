"""The serving engine: one base model, many adapters, the generation core (:mod:`lorakit.generate`) in a
worker thread. Two schedulers (``Limits.scheduler``):

- ``"continuous"`` (default): iteration-level scheduling over the core's ``Running`` batch. At every
  decoding step finished rows leave and waiting ones join, up to ``max_batch_size`` in flight, in the
  order of ``Limits.admission`` (:mod:`lorakit.serve.admission`); a request's n choices join together
  and prefill their prompt once. A short request waits for a long one only when ``max_batch_size`` rows
  are in flight (nothing is preempted).
- ``"window"``: the worker gathers requests for ``batch_window_ms`` and generates that batch to
  completion (the core's ``window.run_batch``; kept for comparison: ``bench/serve/load.py``).

The worker thread's loops are in :mod:`lorakit.serve.scheduler`. Adapters are loaded at start, at
runtime, or on a request's first use of them (:meth:`Engine.hold`); past ``max_adapters`` the least
recently used idle one is unloaded. Loading and unloading happen between decoding steps.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..generate.continuous import Running
from ..generate.kvcache import kv_bytes_per_token, splice_error
from ..generate.rows import Event, special_ids
from ..generate.sampling import SamplingParams
from ..lora.adapters import delete_adapter, list_adapters
from ..lora.apply import load_adapter
from ..lora.layer import ModulesToSave
from ..lora.merge import merged_adapters
from .admission import Waiting
from .limits import (
    SCHEDULERS,
    ConflictError,
    ForbiddenError,
    Limits,
    NotFoundError,
    ServeError,
    Stats,
    longest_token_chars,
    refuse_unservable,
)
from .metrics import Metrics
from .rows import ClientRow
from .scheduler import run_worker

__all__ = ["SCHEDULERS", "ConflictError", "Engine", "ForbiddenError", "Limits", "NotFoundError", "ServeError", "Stats",
           "engine_from_spec"]  # the errors and Limits live in limits.py, re-exported here where callers look

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


@dataclass
class _Slot:
    """An adapter the engine holds: where it came from and how many queued or running requests use it."""

    path: str
    created: int = field(default_factory=lambda: int(time.time()))
    pending: int = 0


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
        self._queue: queue.Queue[ClientRow | list[ClientRow] | None] = queue.Queue()
        self._waiting = Waiting(self.limits.admission)  # taken from _queue by the continuous worker
        self._thread: threading.Thread | None = None
        self.eos_ids, self.pad_id = special_ids(model, tokenizer)
        self.context_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_prompt_chars = self.limits.max_prompt_tokens * longest_token_chars(tokenizer)
        if self.limits.scheduler == "continuous" and (why := splice_error(model.config)):
            raise ServeError(why)
        self.kv_bytes_per_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
        self._running = Running(model, tokenizer, self.eos_ids, self.pad_id)
        self._writers = 0  # adapter loads/unloads waiting for the model: the worker yields to them
        self.metrics = Metrics(self)

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the worker thread (idempotent); returns self."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=run_worker, args=(self,), name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the batch it is running; queued requests get an error event."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None
        left, self._waiting.rows = list(self._waiting.rows), []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            left += item if isinstance(item, list) else [item]
        for row in left:
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

    def load_adapter(self, name: str, path: str | Path, *, pinned: bool = False) -> None:
        """Load a PEFT-format adapter under ``name``; past ``max_adapters`` evict the LRU idle adapter.

        Args:
            name: letters, digits, '-' and '_'; not the base model's name nor a loaded adapter's.
            path: adapter directory (trusted here: the HTTP layer checks it against --adapter-root).
            pinned: hold it as if one request used it (no eviction) until :meth:`hold`'s release runs.
        """
        if not name or not set(name) <= _NAME_CHARS or len(name) > 64:
            raise ServeError(f"adapter name {name!r} must be 1-64 letters, digits, '-' or '_'")
        with self._model_between_steps():
            with self._registry:
                if name == self.name or name in self._slots:
                    raise ConflictError(f"model {name!r} is already loaded; unload it first or pick another name")
                self._eviction_candidate()  # every slot busy: refuse before reading anything
            refuse_unservable(name, Path(path))  # before loading: a PiSSA load would rewrite the shared base
            load_adapter(self.model, path, name, activate=False)  # a broken adapter evicts nothing
            if any(isinstance(m, ModulesToSave) and name in m.adapters for m in self.model.modules()):
                delete_adapter(self.model, name)
                raise ServeError(f"adapter {name!r} replaces whole modules (modules_to_save), which a "
                                 "mixed-adapter batch cannot run per row; serve it merged as its own model")
            with self._registry:  # the victim is chosen and dropped at once: no request can pin it in between
                try:
                    victim = self._eviction_candidate()
                except ConflictError:
                    delete_adapter(self.model, name)  # the slots filled up while it loaded
                    raise
                if victim is not None:
                    self._slots.pop(victim)
                self._slots[name] = _Slot(str(path), pending=int(pinned))
            if victim is not None:
                delete_adapter(self.model, victim)

    @contextlib.contextmanager
    def _model_between_steps(self):
        """Hold the model between two decoding steps (the worker yields to a waiting load or unload)."""
        with self._registry:
            self._writers += 1
        try:
            with self._model_lock:
                self._running.adapters.close()  # the running rows' stacked factors are rebuilt next step
                yield
        finally:
            with self._registry:
                self._writers -= 1

    def hold(self, model: str, locate: Callable[[str], Path | None]) -> Callable[[], None]:
        """Keep ``model`` loaded until the returned release is called; load it first if it is not loaded yet
        and ``locate`` finds its directory (load on first use). Concurrent callers for one adapter load it
        once: the others wait for that load and use it. Call before :meth:`submit`; an unknown model holds
        nothing (submit then answers 404).

        Args:
            model: the base model's name or an adapter's name.
            locate: adapter name -> its directory, or None when there is none to load.
        """
        if model == self.name:
            return lambda: None
        if not self._pin_loaded(model):
            path = locate(model)
            if path is None:
                return lambda: None
            try:  # load_adapter checks the name under the model lock: of concurrent first requests, one loads
                self.load_adapter(model, path, pinned=True)
            except ConflictError:
                if not self._pin_loaded(model):  # not "loaded meanwhile" but "every slot busy"
                    raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._unpin(model)
        return release

    def _pin_loaded(self, model: str) -> bool:
        with self._registry:
            if model not in self._slots:
                return False
            self._pin(model)
            return True

    def _unpin(self, model: str) -> None:
        with self._registry:
            if model in self._slots:  # always true: a pinned adapter is neither unloaded nor evicted
                self._slots[model].pending -= 1

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
        with self._model_between_steps():
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

    def check_chars(self, chars: int) -> None:
        """Refuse a prompt of ``chars`` characters that cannot fit max_prompt_tokens, before tokenizing it.

        No token of the tokenizer spans more characters than its longest vocabulary entry, so a longer
        text needs more tokens than allowed: refusing it costs nothing, tokenizing it costs seconds.
        """
        if chars > self.max_prompt_chars:
            raise ServeError(f"the prompt has {chars} characters, more than {self.limits.max_prompt_tokens} tokens "
                             f"of this tokenizer can hold ({self.max_prompt_chars}); this server accepts at most "
                             f"{self.limits.max_prompt_tokens} tokens (--max-prompt-tokens)", "prompt")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt, refused when longer than max_prompt_tokens (characters first) or empty."""
        self.check_chars(len(text))
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise ServeError("the prompt is empty (0 tokens)", "prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise ServeError(f"the prompt has {len(ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)", "prompt")
        return ids

    def submit(self, prompt_ids: list[int], model: str, params: SamplingParams, sink: Callable[[Event], None],
               index: int = 0) -> ClientRow:
        """Queue one generation (:meth:`submit_choices` with one choice); returns its row (to cancel)."""
        return self.submit_choices(prompt_ids, model, [params], sink, index)[0]

    def submit_choices(self, prompt_ids: list[int], model: str, params: list[SamplingParams],
                       sink: Callable[[Event], None], first_index: int = 0) -> list[ClientRow]:
        """Queue completions of one prompt side by side (a request's ``n`` choices): the continuous
        scheduler admits them together, so they prefill the prompt once. Returns the rows (to cancel).

        Args:
            prompt_ids: token ids (see :meth:`encode`).
            model: the base model's name or an adapter's name.
            params: sampling settings per choice (max_tokens is checked against the limits).
            sink: called with each Event, from the worker thread; must not block.
            first_index: the choice index put on the first row's Events (the next rows count on).
        """
        for p in params:
            if p.max_tokens < 1 or p.max_tokens > self.limits.max_tokens:
                raise ServeError(f"max_tokens={p.max_tokens} is out of range; this server allows 1 to "
                                 f"{self.limits.max_tokens} (--max-tokens)", "max_tokens")
            if self.context_length and len(prompt_ids) + p.max_tokens > self.context_length:
                raise ServeError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({p.max_tokens}) exceeds the "
                                 f"model's context length of {self.context_length} tokens", "max_tokens")
        with self._registry:
            adapter = self._pin(model, len(params))
            self.stats.requests += len(params)
        rows = [ClientRow(list(prompt_ids), adapter, p, sink, first_index + j) for j, p in enumerate(params)]
        for row in rows:
            row.on_finish = functools.partial(self._finished, row)
        for item in [rows] if self.limits.scheduler == "continuous" else rows:  # window batches count rows
            self._queue.put(item)
        return rows

    def _pin(self, model: str, rows: int = 1) -> str | None:
        if model == self.name:
            return None
        slot = self._slots.get(model)
        if slot is None:
            raise NotFoundError(f"model {model!r} not found; available: {[self.name, *self._slots]}", "model")
        slot.pending += rows
        self._slots.move_to_end(model)  # most recently used
        return model

    def _finished(self, row: ClientRow) -> None:
        self._release([row])
        self.metrics.finished(row)

    def _release(self, rows: list[ClientRow]) -> None:
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

    # ---- memory --------------------------------------------------------------------------------

    def kv_cache(self) -> dict:
        """KV cache figures (bytes): per token of a row, a row at its longest, the cap over all rows, and
        what the running rows hold now (padding included) and use (real tokens)."""
        per_row = self.limits.max_prompt_tokens + self.limits.max_tokens
        if self.context_length:
            per_row = min(per_row, self.context_length)
        held = self._running.kv.held_bytes()
        return {"bytes_per_token": self.kv_bytes_per_token, "row_max_bytes": per_row * self.kv_bytes_per_token,
                "cap_bytes": self.limits.max_batch_size * per_row * self.kv_bytes_per_token,
                "held_bytes": held, "used_bytes": self._running.kv.used_tokens() * self.kv_bytes_per_token,
                "rows": self._running.kv.rows, "max_rows": self.limits.max_batch_size}

    def waiting(self) -> int:
        """Rows queued and not yet running (approximate: the queue may change meanwhile); a request's n
        choices are one item of the queue and n rows."""
        with self._queue.mutex:
            queued = sum(len(i) if isinstance(i, list) else i is not None for i in self._queue.queue)
        return queued + len(self._waiting)


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
