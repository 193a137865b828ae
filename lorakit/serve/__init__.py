"""Serving: the batched multi-adapter ``Engine`` here, the OpenAI-compatible HTTP app in ``lorakit.serve.app``."""

from ..generate.decode import Event, SamplingParams
from .engine import Engine, Limits, ServeError, engine_from_spec

__all__ = ["Engine", "Event", "Limits", "SamplingParams", "ServeError", "engine_from_spec"]
