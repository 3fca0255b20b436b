"""Benchmarks and one-off measurements; not part of the installed package."""
