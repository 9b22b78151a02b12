"""Atomic checkpoint files and RNG state capture for exact resume."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path


def save_atomic(obj: dict, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict written by :func:`save_atomic` (one-line error if missing or corrupt)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}); delete it to start over") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj


def capture_rng() -> dict:
    """Every RNG stream that training touches (python, numpy, torch CPU and CUDA).

    Stored as tensors and plain Python values only, so checkpoints load with ``weights_only``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
