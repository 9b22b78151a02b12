"""Peak memory of serving: the runtime vs a bare ONNX Runtime session of the same model, each in its own process.

Each measurement runs in a fresh child (``python -m benchmarks.memory KIND BUNDLE BATCH``) that imports
only what it serves with (no torch), warms up, serves VGA batches and reports its RSS and its peak
(``VmHWM``). The bare session is the floor: the same model file with its own input arrays, no
letterboxing, no masks at the frames' size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def _vm(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_model(bundle: Path) -> Path:
    """The model file the CPU runtime serves from a bundle (the u8s8 INT8 model where there is one)."""
    return next(p for p in (bundle / "model.int8-cpu.onnx", bundle / "model.onnx") if p.is_file())


def measure_child(kind: str, bundle: Path, batch: int = 8, calls: int = 20) -> dict:
    """In this (fresh) process: serve ``calls`` VGA batches of ``batch`` with the runtime or a bare session."""
    from edgeseg.runtime.profiler import sample_images

    frames = sample_images(batch, (480, 640))
    base = _vm("VmRSS")
    if kind == "runtime":
        from edgeseg.runtime import Segmenter

        seg = Segmenter(bundle, backend="onnxruntime-cpu")
        run = lambda: seg.predict(frames)  # noqa: E731
    else:
        from edgeseg.runtime.sessions import cpu_session

        sess = cpu_session(cpu_model(bundle))
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal((batch, 3, inp.shape[2], inp.shape[3])).astype(np.float32)
        run = lambda: sess.run(None, {inp.name: x})  # noqa: E731
    for _ in range(3):
        run()
    warm = _vm("VmRSS")
    for _ in range(calls):
        run()
    return {"kind": kind, "pid": os.getpid(), "model": str(cpu_model(bundle)), "rss_start_mb": base, "rss_after_warmup_mb": warm,
            "peak_rss_mb": _vm("VmHWM"), "batches": calls + 3, "torch_imported": "torch" in sys.modules}


def serving_memory(bundle: Path, batch: int = 8) -> dict:
    """``runtime_peak_rss_mb`` (serving VGA batches) beside ``bare_session_peak_rss_mb`` (the floor) and their ratio."""
    import onnx

    res = {}
    for kind in ("runtime", "bare"):
        r = subprocess.run([sys.executable, "-m", "benchmarks.memory", kind, str(bundle), str(batch)],
                           capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        res[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    dims = onnx.load(str(cpu_model(bundle)), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    h, w = dims[-2].dim_value, dims[-1].dim_value
    # the runtime's own buffers: the letterboxed float batch, its logits, and the masks at the frames' size
    buffers = (batch * 3 * h * w * 4 + batch * h * w * 4 + batch * 480 * 640) / 2**20
    return {"runtime_peak_rss_mb": res["runtime"]["peak_rss_mb"],
            "bare_session_peak_rss_mb": res["bare"]["peak_rss_mb"],
            "runtime_vs_bare_peak_rss": res["runtime"]["peak_rss_mb"] / res["bare"]["peak_rss_mb"],
            "runtime_batch_buffers_mb": buffers,
            "target": "runtime <= 1.3 x bare + its batch buffers", "processes": res}


if __name__ == "__main__":
    print(json.dumps(measure_child(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))))
