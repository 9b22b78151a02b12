"""What the Triton Python models share: tensors in and out through DLPack, and the bundle's spec.

Imported inside Triton's Python stub, where ``triton_python_backend_utils`` exists (tests put a
stand-in in ``sys.modules``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from edgeseg.runtime.spec import ModelSpec


def get_array(request, name: str) -> np.ndarray:
    """The request's input ``name`` as a numpy array."""
    # DLPack, not as_numpy(): the backend's numpy bridge is built against NumPy 1's ABI and, under
    # NumPy 2, reads inputs as zeros and sends outputs empty without an error. DLPack is ABI-stable.
    return np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name))


def make_tensor(name: str, array: np.ndarray):
    """An output tensor ``name`` holding ``array`` (made contiguous)."""
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


def response(**outputs: np.ndarray):
    """A response carrying ``outputs`` (name -> array) as its output tensors."""
    return pb_utils.InferenceResponse(output_tensors=[make_tensor(name, array) for name, array in outputs.items()])


def error_response(message: str):
    """A response that fails its request with ``message`` (the server keeps serving)."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def version_folder(args: dict) -> Path:
    """The model's version folder (``<repository>/<model>/1``) from Triton's ``initialize`` arguments."""
    return Path(args["model_repository"]) / args["model_version"]


class WithSpec:
    """A model that reads the bundle's I/O contract from ``spec.json`` in its version folder and
    answers each request on its own (:meth:`respond`)."""

    def initialize(self, args: dict) -> None:
        self.spec = ModelSpec.from_dict(json.loads((version_folder(args) / "spec.json").read_text()))

    def execute(self, requests: list) -> list:
        return [self.respond(request) for request in requests]

    def respond(self, request):
        """The response to one request."""
        raise NotImplementedError
