"""The student's activations on calibration sets against held-out real images: ranges, coverage, KL, SQNR.

Activations come from ORT's own augmented model (every float tensor made an output), streamed
batch by batch, so memory stays flat however many images there are (see ``report.py``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgeseg.calibration.quantize import batches_of, quantize_qdq
from edgeseg.calibration.config import CalibratedConfig
from edgeseg.runtime.preprocess import normalise_batch
from edgeseg.runtime.sessions import cpu_session

_FINE_BINS = 1024  # real-activation histogram resolution (percentiles, coverage)
_KL_BINS = 128
_SAMPLES_PER_BATCH = 1 << 16  # activation values per tensor and batch that histograms and coverage look at


def activation_statistics(cfg: CalibratedConfig, student, sets: dict[str, np.ndarray],
                          held_out: np.ndarray) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Per student tensor, each set against the held-out images; and each set's per-tensor SQNR (dB).

    1. export the student to ONNX and ORT's augmented model; 2. activation ranges (held-out and
    each set) and the histogram edges spanning them; 3. histograms, coverage and KL per tensor;
    4. each set calibrates a symmetric int8 Q/DQ model: its SQNR per tensor on the held-out images.

    Args:
        student: the UNet whose activations are judged (eval mode).
        sets: name -> (N, H, W, 3) uint8 calibration images.
        held_out: (M, H, W, 3) uint8 real images the sets stand in for.
    """
    import torch
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    from edgeseg.distill.onnx_export import export_module

    hw = tuple(cfg.data.image_size)
    to_input = lambda b: normalise_batch(b, cfg.data.mean, cfg.data.std)
    with tempfile.TemporaryDirectory(prefix="edgeseg-report-") as tmp:
        tmp = Path(tmp)
        fp32 = export_module(student, tmp / "student.onnx", torch.zeros(1, 3, *hw), ["images"], ["mask_logits"])
        aug = tmp / "student.aug.onnx"
        modify_model_output_intermediate_tensors(str(fp32), str(aug))
        session = cpu_session(aug, optimize=False)
        real_batches = batches_of(held_out, to_input)
        set_batches = {k: batches_of(v, to_input) for k, v in sets.items()}
        set_rng, edges = _ranges_and_edges(session, real_batches, set_batches)
        per_tensor = _per_tensor(session, real_batches, set_batches, set_rng, edges)
        sqnr, float_acts = {}, None
        for s, batches in set_batches.items():
            q = quantize_qdq(fp32, tmp / f"q_{s}.onnx", batches, cfg.export.calibration_method, "s8s8",
                             percentile=cfg.export.percentile)
            sqnr[s], float_acts = sqnr_per_tensor(aug, q, real_batches, float_acts)
        for row in per_tensor:
            for s in sets:
                row[f"sqnr_db_{s}"] = sqnr[s].get(row["tensor"])
    return per_tensor, sqnr


def _ranges_and_edges(session, real_batches, set_batches):
    """Each set's activation range per tensor, and histogram edges spanning held-out real and every set."""
    real_rng = _ranges(session, real_batches)
    set_rng = {k: _ranges(session, b) for k, b in set_batches.items()}
    edges = {}
    for name, (lo, hi) in real_rng.items():
        lo = min([lo] + [r[name][0] for r in set_rng.values() if name in r])
        hi = max([hi] + [r[name][1] for r in set_rng.values() if name in r])
        if hi > lo:
            edges[name] = np.linspace(lo, hi, _FINE_BINS + 1)
    return set_rng, edges


def _per_tensor(session, real_batches, set_batches, set_rng, edges) -> list[dict]:
    """One row per tensor: the real 99.99th percentile, and per set coverage, calibrated max and histogram KL."""
    real_hist, outside, totals = _histograms(session, real_batches, edges, set_rng)
    set_hist = {k: _histograms(session, b, edges, {})[0] for k, b in set_batches.items()}
    rows = []
    for name in sorted(edges):
        row = {"tensor": name, "real_p9999": _percentile_from_hist(real_hist[name], edges[name], 99.99)}
        for s in set_batches:
            row[f"coverage_{s}"] = 1 - outside[name][s] / max(totals[name], 1)
            row[f"max_{s}"] = set_rng[s][name][1]
            row[f"kl_{s}"] = _kl(real_hist[name], set_hist[s][name])
        rows.append(row)
    return rows


def _run_augmented(session, batches):
    """Yield {tensor name: flat values} per batch."""
    from onnxruntime.quantization.qdq_loss_debug import _TENSOR_SAVE_POSTFIX

    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    wanted = [o for o in outputs if o.endswith(_TENSOR_SAVE_POSTFIX)]
    for b in batches:
        values = session.run(wanted, {input_name: b})
        yield {n[: -len(_TENSOR_SAVE_POSTFIX)]: v for n, v in zip(wanted, values)}


def _ranges(session, batches) -> dict[str, tuple[float, float]]:
    out: dict[str, list[float]] = {}
    for acts in _run_augmented(session, batches):
        for name, v in acts.items():
            if v.size == 0:
                continue
            lo, hi = float(v.min()), float(v.max())
            r = out.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _histograms(session, batches, edges: dict[str, np.ndarray], ranges: dict[str, dict[str, tuple[float, float]]]):
    """Histograms over uniform ``edges`` (outer values into the end bins) and, per named range, values outside it.

    Both are estimated from a fixed strided sample of each tensor (at most 65536 values per batch).
    """
    hists = {k: np.zeros(len(e) - 1, np.int64) for k, e in edges.items()}
    outside = {k: {s: 0 for s in ranges} for k in edges}
    totals = {k: 0 for k in edges}
    for acts in _run_augmented(session, batches):
        for name, v in acts.items():
            if name not in edges:
                continue
            v = v[:: max(1, v.size // _SAMPLES_PER_BATCH)]  # a strided sample: shares, not extremes, are wanted here
            e = edges[name]
            width = (e[-1] - e[0]) / (len(e) - 1)
            idx = np.clip(((v - e[0]) / width).astype(np.int64), 0, len(e) - 2)
            hists[name] += np.bincount(idx, minlength=len(e) - 1)
            totals[name] += v.size
            for s, rng in ranges.items():
                lo, hi = rng.get(name, (-np.inf, np.inf))
                outside[name][s] += int(np.count_nonzero((v < lo) | (v > hi)))
    return hists, outside, totals


def _kl(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    p = p_counts.reshape(_KL_BINS, -1).sum(1).astype(np.float64) + 1e-3
    q = q_counts.reshape(_KL_BINS, -1).sum(1).astype(np.float64) + 1e-3
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


def _percentile_from_hist(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    c = np.cumsum(hist)
    k = np.searchsorted(c, q / 100 * c[-1])
    return float(edges[min(k + 1, len(edges) - 1)])


def sqnr_per_tensor(fp32_aug: Path, qdq_path: Path, real_batches, float_acts=None) -> tuple[dict[str, float], dict]:
    """Per-tensor SQNR (dB) of a Q/DQ model vs the float model on ``real_batches`` (ORT's qdq_loss_debug)."""
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    from edgeseg.calibration.quantize import ArrayReader, input_name

    name = input_name(fp32_aug)
    if float_acts is None:
        float_acts = collect_activations(str(fp32_aug), ArrayReader(name, real_batches))
    qdq_aug = qdq_path.with_name(qdq_path.stem + ".aug.onnx")
    modify_model_output_intermediate_tensors(str(qdq_path), str(qdq_aug))
    qdq_acts = collect_activations(str(qdq_aug), ArrayReader(name, real_batches))
    matching = {k: v for k, v in create_activation_matching(qdq_acts, float_acts).items() if "float" in v}
    errors = compute_activation_error(matching)
    return {k: v["xmodel_err"] for k, v in errors.items() if np.isfinite(v["xmodel_err"])}, float_acts
