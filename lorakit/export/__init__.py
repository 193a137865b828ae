"""Exporting for other runtimes: merged model directories (safetensors).

Imports: the foundation, ``lora``, ``models``.
"""
