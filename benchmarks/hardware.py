"""How close a model runs to what the CPU can do: peak arithmetic read at run time, work counted from the graph.

The peak is a formula over what the machine reports (``/proc/cpuinfo``: cores, clock, ISA flags),
not a constant: per core and cycle an AVX-512 FMA unit does 16 FP32 multiply-adds, and with VNNI
(``VPDPBUSD``) 64 int8 multiply-adds into int32 (AVX2 halves both). The number of FMA units per
core cannot be read from the OS: server Xeons with AVX-512 have two, which is the default here
and a parameter. AMX (``amx_int8``) is reported beside it: its tile unit does 1,024 int8
multiply-adds per cycle, which ONNX Runtime's CPU kernels may or may not use for a model.

Work is counted from the ONNX graph at batch 1 (shape inference at the model's input size): a
Conv does ``out_elements * (C_in / groups) * k_h * k_w`` multiply-adds, a MatMul/Gemm ``M * N * K``;
each multiply-add is two operations. The op profile splits where the time goes by kind
(depthwise, pointwise, dense convolutions, the rest), from ONNX Runtime's own profiler.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

MACS_PER_CYCLE = {  # per FMA unit and core: (FP32 multiply-adds, int8 multiply-adds)
    "avx512_vnni": (16, 64), "avx512f": (16, 32), "avx_vnni": (8, 32), "avx2": (8, 16), "sse": (4, 8)}
AMX_INT8_MACS_PER_CYCLE = 1024  # one AMX tile unit per core (TDPBUSD on 16x64 int8 tiles)


def cpu_peak(cores: int | None = None, cpuinfo: str | None = None, fma_units: int = 2) -> dict:
    """Peak FP32 FLOP/s and int8 op/s of ``cores`` cores (default: all), from ``cpuinfo`` (default /proc).

    Returns the inputs too (clock, ISA, units), so a reader can check the formula.
    """
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M).group(1))
    cores = cores or os.cpu_count() or 1
    isa = next(k for k in ("avx512_vnni", "avx512f", "avx_vnni", "avx2", "sse") if k in flags or k == "sse")
    fp32_macs, int8_macs = MACS_PER_CYCLE[isa]
    hz = mhz * 1e6
    out = {"cores": cores, "clock_ghz": mhz / 1000, "isa": isa, "fma_units_per_core": fma_units,
           "fp32_peak_gflops": 2 * fp32_macs * fma_units * hz * cores / 1e9,
           "int8_peak_gops": 2 * int8_macs * fma_units * hz * cores / 1e9,
           "formula": "2 ops x multiply-adds per cycle per unit x units x clock x cores"}
    if "amx_int8" in flags:
        out["amx_int8_peak_gops"] = 2 * AMX_INT8_MACS_PER_CYCLE * hz * cores / 1e9
    return out


def _conv_kind(node, shapes: dict, inits: dict) -> str:
    groups = next((a.i for a in node.attribute if a.name == "group"), 1)
    w = inits.get(node.input[1]) or shapes.get(node.input[1])
    if groups > 1 and w is not None and w[1] == 1:
        return "depthwise"
    if w is not None and tuple(w[2:]) == (1, 1):
        return "pointwise"
    return "dense"


def model_macs(path: str | Path, input_hw: tuple[int, int]) -> dict:
    """Multiply-adds per image of a float ONNX model at ``input_hw``: total and by kind."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    for d, v in zip(dims, (1, 3, *input_hw)):
        d.ClearField("dim_param")
        d.dim_value = v
    model = shape_inference.infer_shapes(model)
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.output) + list(g.input)}
    inits = {t.name: list(numpy_helper.to_array(t).shape) for t in g.initializer}
    by_kind: dict[str, int] = defaultdict(int)
    node_kind = {}
    for node in g.node:
        if node.op_type == "Conv":
            w = inits.get(node.input[1]) or shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if not w or not out or 0 in out:
                continue
            macs = math.prod(out[1:]) * w[1] * math.prod(w[2:])  # w[1] = C_in / groups
            kind = _conv_kind(node, shapes, inits)
        elif node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]) or inits.get(node.input[0]), inits.get(node.input[1]) or shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if not a or not b or not out:
                continue
            macs, kind = math.prod(out[1:]) * a[-1], "matmul"
        else:
            continue
        by_kind[kind] += macs
        for name in (node.name, *node.output):  # ORT's optimised nodes are often named after their output
            node_kind[name] = kind
    return {"macs_per_image": int(sum(by_kind.values())), "by_kind": dict(by_kind), "node_kind": node_kind}


def share_of_peak(macs_per_image: int, batch: int, median_ms: float, peak_gops: float) -> float:
    """Achieved operations per second (2 per multiply-add) as a share of ``peak_gops``."""
    return 2 * macs_per_image * batch / (median_ms / 1000) / (peak_gops * 1e9)


def op_time_split(session_factory, feed: dict, node_kind: dict[str, str], runs: int = 10) -> dict:
    """Share of ONNX Runtime's node time by kind (depthwise / pointwise / dense / matmul / layout / other).

    ``session_factory(options)`` builds a session with the given ``SessionOptions`` (profiling on);
    quantized nodes are matched to their float node's kind by name prefix where ORT renamed them.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.log_severity_level = 3
    sess = session_factory(so)
    for _ in range(runs):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    time_by: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        kind = node_kind.get(name)
        if kind is None:  # renamed by an optimisation (``a_nchwc``, ``..._quant``): the longest known prefix
            prefix = max((n for n in node_kind if n and name.startswith(n)), key=len, default=None)
            kind = node_kind[prefix] if prefix else ("layout" if name.startswith("Reorder") else "other")
        time_by[kind] += e.get("dur", 0)
    total = sum(time_by.values()) or 1.0
    return {k: v / total for k, v in sorted(time_by.items(), key=lambda kv: -kv[1])}
