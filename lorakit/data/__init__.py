"""Training data: formats (text, prompt/completion, messages), validation with ``file:line``
errors, chat templates, loss masking, tokenization, batching; packaged tasks (``data.tasks``).

Imports: the foundation only (a tokenizer is passed in, never loaded here).
"""
