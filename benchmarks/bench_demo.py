"""The two commands a newcomer runs, timed: ``make demo`` (its stages) and ``make test``.

``make demo`` writes each stage's wall time to ``<run_dir>/demo_times.tsv`` as it runs; this reads
that file (point ``run_dir`` at a fresh clone's run to time a first run) and times ``make test`` in
this checkout, and writes ``benchmarks/results/demo.json``: ``stages_seconds``, ``total_seconds``,
``total_minutes``, ``make_test_seconds``, with where the demo ran.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MINUTES = 30  # make demo on 2 cores, a fresh clone (install excluded: demo_times.tsv starts after it)


def read_demo_times(path: Path) -> dict[str, float]:
    """stage -> seconds from a ``demo_times.tsv`` (its ``total`` row included)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no demo timing; run `make demo` (it writes the file) or point --set run_dir at one")
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if "\t" in line]
    return {name: float(seconds) for name, seconds, *_ in rows}


def time_make_test(cwd: Path = ROOT) -> dict:
    """``make test`` in ``cwd``, timed; its exit status and the pytest summary line."""
    t0 = time.perf_counter()
    r = subprocess.run(["make", "test"], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    summary = next((l for l in reversed(r.stdout.splitlines()) if " passed" in l or " failed" in l), "")
    return {"make_test_seconds": seconds, "make_test_returncode": r.returncode, "make_test_summary": summary.strip("= ")}


def run(cfg, with_test: bool = True) -> dict:
    times = read_demo_times(Path(cfg.run_dir) / "demo_times.tsv")
    total = times.pop("total")
    out = {"run_dir": str(Path(cfg.run_dir).resolve()), "stages_seconds": times, "total_seconds": total,
           "total_minutes": total / 60, "target_minutes": TARGET_MINUTES,
           "note": "from the demo's own demo_times.tsv: wall time per stage from an empty run folder, install excluded"}
    if with_test:
        out.update(time_make_test())
    return out


if __name__ == "__main__":
    print(read_demo_times(Path(sys.argv[1])))
