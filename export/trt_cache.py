"""TensorRT implicit-INT8 calibration caches, written from the same ranges as the Q/DQ model.

JetPack 6 devices stay on TensorRT 10, where DLA (and ``IInt8*Calibrator``-based builds) still
use implicit INT8 with a calibration cache. The cache is text: a header
``TRT-<version code>-EntropyCalibration2`` and one ``<tensor>: <scale>`` line per tensor, the
scale being the IEEE-754 float32 ``amax / 127`` as 8 big-endian hex digits. We write it from the
Q/DQ model's own activation scales, so both artifacts carry one calibration.
"""
from __future__ import annotations

import struct
from pathlib import Path

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import write_text_atomic

DEFAULT_TRT_VERSION = "10.3.0"  # JetPack 6.1 / 6.2


def version_code(trt_version: str) -> int:
    """TensorRT's NV_TENSORRT_VERSION code: 8.6.1 -> 8601, 10.3.0 -> 100300."""
    try:
        parts = [int(p) for p in trt_version.split(".")[:3]]
    except ValueError:
        raise InputError(f"TensorRT version must look like 10.3.0, got {trt_version!r}") from None
    major, minor, patch = (parts + [0, 0, 0])[:3]
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def encode_scale(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def decode_scale(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text))[0]


def write_cache(scales: dict[str, float], path: str | Path, trt_version: str = DEFAULT_TRT_VERSION,
                algorithm: str = "EntropyCalibration2") -> Path:
    """Write ``tensor -> scale`` as a TensorRT calibration cache (atomically)."""
    if not scales:
        raise InputError("no activation scales to write: the Q/DQ model has no quantized activations")
    lines = [f"TRT-{version_code(trt_version)}-{algorithm}"]
    lines += [f"{name}: {encode_scale(s)}" for name, s in scales.items()]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def read_cache(path: str | Path) -> tuple[str, dict[str, float]]:
    """(header, tensor -> scale) of a cache file."""
    text = Path(path).read_text().splitlines()
    if not text or not text[0].startswith("TRT-"):
        raise InputError(f"{path}: not a TensorRT calibration cache (no TRT- header)")
    scales = {}
    for line in text[1:]:
        if line.strip():
            name, _, hexval = line.rpartition(": ")
            scales[name] = decode_scale(hexval.strip())
    return text[0], scales
