"""Loading a model and its tokenizer: the embedded SmolLM2 default, a transformers directory,
a GGUF file, an offline hub cache; reading model directories' weights (``modeldir``).

Imports: the foundation and ``lorakit.lora`` (the contiguous-head-input hook).
"""
