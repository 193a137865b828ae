"""The LoRA core: ``LoraConfig``, the layers that wrap a frozen base (``LoraLinear``,
``LoraEmbedding``, ``LoraConv`` for nn.Conv1d, ``ModulesToSave``, ``TrainableTokens`` for rows of an
embedding), the fast autograd paths (``ops``), sibling fusion, strict
injection with PEFT's matching rules, adapter bookkeeping (activate / delete / combine / count),
PEFT-format files (``io``), merging and mixed-adapter batches.

Imports: the foundation (``lorakit.errors``, ``lorakit.fileio``) only. Never transformers, never
a higher subpackage: this is what ``import lorakit`` loads, and it works on any ``nn.Module``.
"""
