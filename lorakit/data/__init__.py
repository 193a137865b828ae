"""Training data: record formats and their validation (``formats``), reading files with
``file:line`` errors (``readers``), chat templates, loss masking and tokenization (``tokenize``),
the tokenized-set cache (``cache``), batching (``batching``), packing (``packing``); packaged tasks (``data.tasks``);
pre-tokenized rows (``pretokenized``: token ids and numeric columns, 1-D or streams × time, no tokenizer).

Imports: the foundation only (a tokenizer is passed in, never loaded here).
"""
