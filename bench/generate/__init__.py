"""Generation benchmarks: the in-process core (lorakit.generate), e.g. prefix sharing for n completions."""
