"""Loading a model and its tokenizer (``load``): the embedded SmolLM2 default, a transformers directory,
a GGUF file, a hub id (``hub``: online or the offline HF cache); reading model directories' weights
(``modeldir``); dtype names and what ``auto`` picks on a device (``dtype``); your own module from a
``MODULE:FUNCTION`` builder and its weights, safetensors or weights-only torch checkpoints (``custom``).

Imports: the foundation and ``lorakit.lora`` (the contiguous-head-input hook).
"""
