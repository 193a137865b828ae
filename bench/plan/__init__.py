"""Planning benchmarks: the memory planner's prediction against measured training runs."""
