"""Planning before a run: exact parameter counts on the meta device, memory / FLOP / time /
cost estimates, GPU presets and architecture presets (``plan/presets``).

Imports: the foundation, ``lora``, ``models``, ``train`` (to follow the trainer's loss path).
"""
