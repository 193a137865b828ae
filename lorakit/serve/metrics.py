"""Prometheus metrics of one engine (text format at GET /metrics), named as vLLM and TGI name theirs.

Counters and histograms are updated by the engine as rows finish and steps run; gauges (rows running
and waiting, adapters loaded, KV cache bytes) are read from the engine when scraped. Each engine has
its own registry, so two engines in one process (tests) do not collide.
"""

from __future__ import annotations

import time

from .rows import ClientRow

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STEP_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """The engine's Prometheus collectors.

    Args:
        engine: the :class:`lorakit.serve.engine.Engine`, read for the gauges when scraped (not imported
            here: the engine builds its metrics).
    """

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "Generations finished (one per prompt x n), by finish reason",
                                ["finish_reason"], registry=reg)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens of finished generations", registry=reg)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated (rate(): tokens/s)",
                                         registry=reg)
        self.queue_time = Histogram("lorakit_request_queue_seconds", "From submission to the start of prefill",
                                    buckets=_SECONDS, registry=reg)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "From submission to the first token",
                              buckets=_SECONDS, registry=reg)
        self.latency = Histogram("lorakit_request_latency_seconds", "From submission to the last token",
                                 buckets=_SECONDS, registry=reg)
        self.step_time = Histogram("lorakit_decode_step_seconds", "One decoding step of every row in flight",
                                   buckets=_STEP_SECONDS, registry=reg)
        self.step_rows = Histogram("lorakit_decode_step_rows", "Rows in flight per decoding step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=reg)
        gauges = {
            "lorakit_rows_running": ("Rows (prompt x n) in flight", lambda: engine.stats.running),
            "lorakit_rows_waiting": ("Rows queued, not yet admitted", engine.waiting),
            "lorakit_max_batch_size": ("Rows in flight at most", lambda: engine.limits.max_batch_size),
            "lorakit_adapters_loaded": ("Adapters held by the engine", lambda: len(engine.adapters())),
            "lorakit_kv_cache_bytes_per_token": ("KV cache bytes per token of one row",
                                                 lambda: engine.kv_bytes_per_token),
            "lorakit_kv_cache_row_max_bytes": ("KV cache bytes of one row at max prompt + max tokens",
                                               lambda: engine.kv_cache()["row_max_bytes"]),
            "lorakit_kv_cache_cap_bytes": ("KV cache bytes at most (max_batch_size rows at their longest)",
                                           lambda: engine.kv_cache()["cap_bytes"]),
            "lorakit_kv_cache_held_bytes": ("KV cache bytes held now, padding included",
                                            lambda: engine.kv_cache()["held_bytes"]),
            "lorakit_kv_cache_used_bytes": ("KV cache bytes of real tokens now", lambda: engine.kv_cache()["used_bytes"]),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=reg).set_function(read)

    def finished(self, row: ClientRow) -> None:
        """Record a row that ended (any reason, cancelled rows included)."""
        self.requests.labels(row.finish_reason or "cancelled").inc()
        self.prompt_tokens.inc(len(row.prompt_ids))
        self.generation_tokens.inc(len(row.tokens))
        if row.admitted_at is not None:
            self.queue_time.observe(row.admitted_at - row.submitted_at)
        if row.first_token_at is not None:
            self.ttft.observe(row.first_token_at - row.submitted_at)
            self.latency.observe(time.monotonic() - row.submitted_at)

    def step(self, seconds: float, rows: int) -> None:
        self.step_time.observe(seconds)
        self.step_rows.observe(rows)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

