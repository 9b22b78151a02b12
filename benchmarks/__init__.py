"""Benchmarks (make bench): interleaved, median-of-many timings written to benchmarks/results/*.json."""
