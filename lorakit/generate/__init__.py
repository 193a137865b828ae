"""Generation in process: given a causal LM (and its adapters), prompts and sampling settings, completions.

This subpackage owns the decoding machinery that serving and training share, and nothing of HTTP,
threads or queues:

- ``sampling``: :class:`SamplingParams`; temperature, top-k, top-p, seeded per-row generators, the
  log-probabilities of the chosen tokens;
- ``stops``: stop strings and the text held back while it may still start one;
- ``rows``: the decoding state of one row (one completion of one prompt), its streamed Events;
- ``kvcache``: the slotted KV cache that rows enter and leave between decoding steps;
- ``prefix``: prefix sharing (rows whose prompts begin alike prefill that block once);
- ``continuous``: the iteration-level scheduler core (admit / step / drop done), mixed per-row adapters;
- ``window``: a batch generated to completion (a server's window scheduler);
- ``api``: :func:`generate`, n completions per prompt, synchronous.

It imports only ``lora`` (and the error types); ``serve`` is the HTTP layer over it, and ``train`` may
call :func:`generate` (GRPO, online DPO).
"""

from .api import Completion, generate
from .rows import Event, Row
from .sampling import SamplingParams

__all__ = ["Completion", "Event", "Row", "SamplingParams", "generate"]
