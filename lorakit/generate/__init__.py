"""Generation: per-row decoding state and token choice (``decode``), the slotted KV cache rows enter and
leave (``kvcache``) and continuous-batching rows (``continuous``); the serving engine runs over them."""
