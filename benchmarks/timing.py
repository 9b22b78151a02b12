"""Interleaved timing: every variant runs once per round, rounds repeat, medians are reported.

These machines are shared and their speed swings 2-3x within seconds; timing variants one
after another would compare machine states, not code. Interleaving spreads every slow spell
over all variants, and the median ignores the worst of them.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(variants: dict[str, Callable[[], object]], rounds: int = 20, warmup: int = 2) -> dict[str, dict]:
    """{name: {"median_ms", "p10_ms", "p90_ms", "n"}} over ``rounds`` interleaved calls of each variant."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    out = {}
    for name, t in times.items():
        q = statistics.quantiles(t, n=10) if len(t) >= 2 else [t[0]] * 9
        out[name] = {"median_ms": statistics.median(t), "p10_ms": q[0], "p90_ms": q[-1], "n": len(t)}
    return out


def ratio(results: dict[str, dict], slow: str, fast: str) -> float:
    """How many times faster ``fast`` is than ``slow`` (median over median)."""
    return results[slow]["median_ms"] / results[fast]["median_ms"]
