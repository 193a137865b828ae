"""Data benchmarks: packed / padded / length-grouped training against TRL and PEFT, the tokenized set's
memory, and the generated long-tailed chat set they read (the JSONL files beside this one)."""
