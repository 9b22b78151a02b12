"""Interleaved timing: every variant runs once per round, rounds repeat, medians are reported.

These machines are shared and their speed swings 2-3x within seconds; timing variants one
after another would compare machine states, not code. Interleaving spreads every slow spell
over all variants, and the median ignores the worst of them.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

# A pause longer than ONNX Runtime's ~50 ms of spinning after a call (see ``interleaved``).
SETTLE_S = 0.08


def interleaved(variants: dict[str, Callable[[], object]], rounds: int = 20, warmup: int = 2,
                settle_s: float = 0.0) -> dict[str, dict]:
    """{name: {"median_ms", "p10_ms", "p90_ms", "n", "samples_ms"}} over ``rounds`` interleaved calls of each.

    ``settle_s``: an untimed pause before every call. ONNX Runtime's intra-op threads spin for
    about 50 ms after each call (measured here: 49 ms of CPU in a 100 ms sleep after one), so a
    variant timed right after another session's call shares the cores with its spinning threads;
    a pause of more than that times each variant on a machine its predecessor has left.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            if settle_s:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    out = {}
    for name, t in times.items():
        q = statistics.quantiles(t, n=10) if len(t) >= 2 else [t[0]] * 9
        out[name] = {"median_ms": statistics.median(t), "p10_ms": q[0], "p90_ms": q[-1], "n": len(t), "samples_ms": t}
    return out


def ratio(results: dict[str, dict], slow: str, fast: str) -> float:
    """How many times faster ``fast`` is than ``slow`` (median over median)."""
    return results[slow]["median_ms"] / results[fast]["median_ms"]


def ratio_spread(results: dict[str, dict], slow: str, fast: str) -> dict[str, float]:
    """The ratio ``slow / fast`` per round (both ran in the same round), as median, p10 and p90.

    A reader sees whether 1.0x means "equal": when p10 < 1 < p90 the two are within noise.
    """
    per_round = [a / b for a, b in zip(results[slow]["samples_ms"], results[fast]["samples_ms"])]
    q = statistics.quantiles(per_round, n=10) if len(per_round) >= 2 else [per_round[0]] * 9
    return {"median": statistics.median(per_round), "p10": q[0], "p90": q[-1]}


def with_spread(out: dict, key: str, results: dict[str, dict], slow: str, fast: str) -> None:
    """Set ``out[key]`` (median over medians) and ``out[key + '_p10' / '_p90']`` (per-round ratio spread)."""
    out[key] = ratio(results, slow, fast)
    spread = ratio_spread(results, slow, fast)
    out[key + "_p10"], out[key + "_p90"] = spread["p10"], spread["p90"]


def strip_samples(results: dict[str, dict]) -> dict[str, dict]:
    """The results without their raw samples (for the JSON files)."""
    return {k: {f: v for f, v in r.items() if f != "samples_ms"} for k, r in results.items()}
