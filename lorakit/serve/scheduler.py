"""The engine's worker thread: continuous batching (rows join and leave at every decoding step) or
window batching (a batch gathered for ``batch_window_ms``, generated to completion).

These loops own the engine's queue, its waiting rows (:mod:`lorakit.serve.admission` picks which join)
and its running batch while they run; the engine's adapter loads and
unloads take the model between two steps (``Engine._writers``), and finished rows unpin their adapters
through ``Engine._release``.
"""

from __future__ import annotations

import queue
import time

from ..errors import AdapterError
from ..generate.window import run_batch
from .rows import ClientRow


def run_worker(engine) -> None:
    """The engine's worker thread: the continuous loop, or the window loop (``Limits.scheduler``).

    Args:
        engine: the :class:`lorakit.serve.engine.Engine` that started it (not imported here: the engine
            imports this module; the loops below read its queue, waiting rows, running batch and locks).
    """
    if engine.limits.scheduler == "window":
        return _window_worker(engine)
    stopping = False
    while not stopping or len(engine._running):
        joiners, stopping = _admissions(engine, stopping)
        try:
            with engine._model_lock:
                _iteration(engine, joiners)
        except Exception as exc:  # a failing step fails its rows, never the worker
            message = str(exc) if isinstance(exc, AdapterError) else f"{type(exc).__name__}: {exc}"
            for row in joiners:
                row.finish("error", f"generation failed: {message}")
            engine._release(joiners + engine._running.fail(f"generation failed: {message}"))
        with engine._registry:
            engine.stats.running = len(engine._running)
        while engine._writers:  # let a waiting adapter load/unload take the model between two steps
            time.sleep(0.0005)


def _admissions(engine, stopping: bool) -> tuple[list[ClientRow], bool]:
    """The waiting rows that join now, in the order of ``Limits.admission``, up to max_batch_size in flight;
    blocks while nothing runs or waits."""
    waiting, step = engine._waiting, engine.stats.steps  # the worker is the only writer of both
    if not stopping:  # after the shutdown marker: finish the rows in flight, admit no more
        stopping = waiting.take(engine._queue, step, block=not (engine._running.rows or waiting.rows))
    engine._release(waiting.drop_cancelled())
    if stopping:
        return [], True
    return waiting.pick(engine.limits.max_batch_size - len(engine._running), step), False


def _iteration(engine, joiners: list[ClientRow]) -> None:
    """Prefill the joiners, drop who is done, one decoding step for the rest, drop who is done."""
    running = engine._running
    if joiners:
        with engine._registry:
            engine.stats.batches += 1
        running.admit(joiners)
        with engine._registry:
            engine.stats.prefill_tokens, engine.stats.shared_prefix_tokens = running.prefill_tokens, running.shared_tokens
        engine._release([r for r in joiners if r.done])
    _gone(engine, running.drop_done())
    with engine._registry:
        engine.stats.largest_batch = max(engine.stats.largest_batch, len(running) + sum(r.done for r in joiners))
    if len(running):
        t0 = time.perf_counter()
        running.step()
        engine.metrics.step(time.perf_counter() - t0, len(running))
        with engine._registry:
            engine.stats.steps += 1
        _gone(engine, running.drop_done())


def _gone(engine, rows: list[ClientRow]) -> None:
    """Rows that left the batch: unpin their adapters; count the cancelled ones (finished ones counted already)."""
    engine._release(rows)
    for row in rows:
        if row.finish_reason is None:
            engine.metrics.finished(row)


def _next_batch(engine) -> list[ClientRow] | None:
    """Window scheduler: block for a first request, then gather more for the window. None: shut down."""
    first = engine._queue.get()
    if first is None:
        return None
    batch, deadline = [first], time.monotonic() + engine.limits.batch_window_ms / 1000
    while len(batch) < engine.limits.max_batch_size:
        try:
            row = engine._queue.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            break
        if row is None:
            engine._queue.put(None)  # shut down after this batch
            break
        batch.append(row)
    return batch


def _window_worker(engine) -> None:
    while (batch := _next_batch(engine)) is not None:
        live = [r for r in batch if not r.cancelled.is_set()]
        try:
            if live:
                with engine._registry:  # counted before running: a request's last event may come first
                    engine.stats.batches += 1
                    engine.stats.largest_batch = max(engine.stats.largest_batch, len(live))
                with engine._model_lock:
                    for row in live:
                        row.admitted_at = time.monotonic()
                    run_batch(engine.model, engine.tokenizer, live, engine.eos_ids, engine.pad_id)
        except Exception as exc:  # a failing batch fails its requests, never the worker
            message = str(exc) if isinstance(exc, AdapterError) else f"{type(exc).__name__}: {exc}"
            for row in live:
                row.finish("error", f"generation failed: {message}")
        finally:
            engine._release(batch)
