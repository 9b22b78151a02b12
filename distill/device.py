"""Device choice for the torch stages: the device a config's ``device`` names, and its CPU thread count.

distill and calibration both run torch on the device a config names; they share this one helper
(calibration imports it from here rather than from the trainer).
"""
from __future__ import annotations

import torch

from edgeseg.runtime.errors import InputError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device; ``cuda`` and ``auto`` take ``local_rank``'s GPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for but torch sees no CUDA GPU; use device: cpu or auto")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def apply_threads(threads: int) -> None:
    """Set torch's intra-op CPU threads when the config gives a count (0: torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def use_device(device: str, threads: int, local_rank: int = 0) -> torch.device:
    """The config's device, with its thread count applied: what every torch entry point starts with."""
    apply_threads(threads)
    return resolve_device(device, local_rank)


def peak_device_mb(device: torch.device) -> float | None:
    """The peak GPU memory torch has allocated on ``device`` so far, in MiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
