"""Benchmarks of scribblejax: ``python -m benchmarks.speed`` (see :mod:`benchmarks.speed`)."""
