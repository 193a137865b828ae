"""Analysis benchmarks: why low rank works, full fine-tuning against LoRA and an extracted adapter."""
