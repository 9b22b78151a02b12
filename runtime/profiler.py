"""Latency profiling of a Segmenter: percentiles, throughput and the per-stage split per batch size."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeseg.runtime.segmenter import STAGES, Segmenter

log = logging.getLogger(__name__)


def sample_images(n: int, hw: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Smooth random RGB images (camera-sized by default): realistic work for resize and copy."""
    rng = np.random.default_rng(seed)
    h, w = hw
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = np.repeat(np.repeat(low, 16, axis=0), 16, axis=1)[:h, :w]
        out.append(np.ascontiguousarray(img))
    return out


def profile(seg: Segmenter, batches: Sequence[int], iters: int = 30, warmup: int = 3,
            image_hw: tuple[int, int] = (480, 640), seed: int = 0) -> dict:
    """Time ``seg.predict`` per batch size, the batch sizes interleaved (noisy machines), warm-up excluded."""
    batches = list(batches)
    if any(b < 1 or b > seg.max_batch for b in batches):
        raise ValueError(f"batch sizes must be in 1..{seg.max_batch}, got {batches}")
    images = sample_images(max(batches), image_hw, seed)
    totals: dict[int, list[float]] = {b: [] for b in batches}
    stages: dict[int, dict[str, list[float]]] = {b: {s: [] for s in STAGES} for b in batches}
    for i in range(warmup + iters):
        for b in batches:
            t0 = time.perf_counter()
            seg.predict(images[:b])
            elapsed = (time.perf_counter() - t0) * 1000
            if i >= warmup:
                totals[b].append(elapsed)
                for s in STAGES:
                    stages[b][s].append(seg.last_timings_ms[s])
    result = {"backend": seg.backend, "device": seg.device, "model": str(seg.model_path), "iters": iters,
              "warmup": warmup, "input_image_size": list(image_hw), "model_input_size": list(seg.spec.image_size),
              "batches": {}}
    for b in batches:
        t = np.asarray(totals[b])
        st = {s: float(np.median(v)) for s, v in stages[b].items()}
        stage_sum = sum(st.values()) or 1.0
        result["batches"][str(b)] = {
            "p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()),
            "throughput_ips": b / (float(np.percentile(t, 50)) / 1000),
            "stages_ms": st, "stage_share": {s: v / stage_sum for s, v in st.items()},
            "pre_post_share": (st["preprocess"] + st["postprocess"]) / stage_sum,
        }
    return result


def print_table(result: dict, stream=sys.stderr) -> None:
    print(f"{result['backend']} on {result['device']} ({Path(result['model']).name}), {result['iters']} iterations, "
          f"inputs {result['input_image_size'][0]}x{result['input_image_size'][1]} -> "
          f"{result['model_input_size'][0]}x{result['model_input_size'][1]}", file=stream)
    head = f"{'batch':>5s}{'p50 ms':>9s}{'p90 ms':>9s}{'p99 ms':>9s}{'img/s':>9s}  " + "".join(f"{s:>11s}" for s in STAGES)
    print(head, file=stream)
    for b, r in result["batches"].items():
        print(f"{b:>5s}{r['p50_ms']:9.2f}{r['p90_ms']:9.2f}{r['p99_ms']:9.2f}{r['throughput_ips']:9.1f}  "
              + "".join(f"{r['stages_ms'][s]:11.2f}" for s in STAGES), file=stream)


def plot(result: dict, path: str | Path) -> Path:
    """latency.png: p50/p90/p99 latency and throughput against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = [int(b) for b in result["batches"]]
    rows = list(result["batches"].values())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
        ax1.plot(bs, [r[key] for r in rows], style, label=key.replace("_ms", ""))
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("latency per call (ms)")
    ax1.set_xticks(bs)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(bs, [r["throughput_ips"] for r in rows], "o-", color="tab:green")
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("throughput (images/s, at p50)")
    ax2.set_xticks(bs)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{result['backend']} on {result['device']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB (Linux and macOS report ``ru_maxrss`` in KiB and bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
