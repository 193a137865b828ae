"""Training benchmarks: lorakit's step time and memory against PEFT and full fine-tuning, QLoRA, DoRA,
the LoRA variants at equal settings, and the allocators."""
