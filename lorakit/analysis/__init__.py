"""Analysis of weight updates: SVD spectra of ΔW (from an adapter or two checkpoints), energy
at rank k, rank recommendations, their report and plots, and extraction of an adapter from a
fine-tuned model by truncated SVD.

Imports: the foundation, ``lora``, ``models``, ``data``, ``train`` (to score an extracted adapter).
"""
