"""Benchmarks of callbot against the physical limit; ``python benchmarks/run.py`` runs them all."""
