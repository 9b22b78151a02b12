"""ONNX Runtime sessions: the one place that sets session options and opens a session.

Every stage opens its ONNX files here (evaluation, parity checks, the feature teacher, the
calibration report, the runtime's backend), so logging, optimisation level and thread count are
set the same way everywhere. ``onnxruntime`` is imported when a session is made.
"""
from __future__ import annotations

from pathlib import Path

from edgeseg.runtime.errors import InputError

CPU = ["CPUExecutionProvider"]


def session_options(threads: int = 0, optimize: bool = True, spin_after_run: bool = True):
    """``ort.SessionOptions``: warnings and below silenced; ``threads`` intra-op threads (0: ORT's
    default); ``optimize`` False disables graph optimisation (tensor names and metadata as written);
    ``spin_after_run`` False stops the intra-op threads spinning as soon as a call returns
    (``session.force_spinning_stop``; they still spin between a call's operators, where it pays).
    Left spinning, they hold a core for about 50 ms after each call, which the runtime's own
    letterboxing and masks, and any other session, then lack (docs/runtime.md; the figures: docs/results.md)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if not spin_after_run:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def cpu_session(path: str | Path | bytes, threads: int = 0, optimize: bool = True):
    """A CPU ``ort.InferenceSession`` of ``path`` (or a serialised model) with :func:`session_options`;
    ORT's errors propagate."""
    import onnxruntime as ort

    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, session_options(threads, optimize), providers=CPU)


def open_session(path: str | Path, options, providers: list, problem: str = "ONNX Runtime cannot load it",
                 limit: int = 160):
    """An ``ort.InferenceSession`` of a user's file; a file ORT cannot load is an InputError naming it.

    The message is ``<path>: <problem> (<ORT's first line, cut to limit characters>)``.
    """
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT's own exception types; the file is the user's
        raise InputError(f"{path}: {problem} ({str(e).splitlines()[0][:limit]})") from None
