"""Serving over the generation core (:mod:`lorakit.generate`): the HTTP app (``lorakit.serve.app``), the
``Engine`` that runs the core in a worker thread (``engine``, ``scheduler``), the adapter registry (load on
first use, LRU eviction), admission order (``admission``), limits (``limits``), Prometheus metrics
(``metrics``), request bodies (``schemas``) and the playground page. No decoding logic of its own."""

from ..generate import Event, SamplingParams
from .engine import Engine, Limits, ServeError, engine_from_spec

__all__ = ["Engine", "Event", "Limits", "SamplingParams", "ServeError", "engine_from_spec"]
