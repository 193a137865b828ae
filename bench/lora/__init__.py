"""Adapter benchmarks: forward latency unmerged and merged, adapter load and merge times, mixed-adapter
batches, each against PEFT."""
