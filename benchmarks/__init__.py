"""Benchmark scripts (run them as files: ``python benchmarks/cost.py``); ``_measure`` holds their shared helpers."""
