"""Benchmarks, each runnable with ``python -m benchmarks.NAME`` from the repo root."""
