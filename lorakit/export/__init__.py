"""Exporting for other runtimes: merged model directories (safetensors), GGUF LoRA adapters and merged
GGUF models for llama.cpp, Ollama Modelfiles; a custom model's own merged checkpoint (``native``).

Imports: the foundation, ``lora``, ``models``, ``plan`` (meta-device models for shape checks).
"""
