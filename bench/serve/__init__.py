"""Serving benchmarks: the HTTP server under load and attack, continuous against window batching."""
