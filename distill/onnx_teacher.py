"""Running the frozen ONNX feature teacher on torch tensors through ONNX Runtime IOBinding.

The student's batch is already on the training device, normalised for the UNets. The feature
teacher wants plain [0, 1] RGB, so the normalisation is undone there (one fused multiply-add
on the device), and that tensor's memory is bound as the session's input; the output is bound
to a preallocated torch tensor that is reused while the batch shape stays the same. No numpy,
no host round trip. A model exported with a fixed input size (``Nx3x640x640``) gets the batch
resized to it on the device first (one bilinear interpolation into the bound buffer), so the
student may train at another size; the loss resizes the projected student feature to the
teacher's grid. On CUDA ORT runs on a dedicated stream ordered after torch's writes and
before torch's reads (``wait_stream`` both ways), on the CPU it reads and writes torch's memory
directly.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgeseg.runtime.errors import BackendUnavailableError, InputError
from edgeseg.runtime.sessions import open_session, session_options

log = logging.getLogger(__name__)

_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


class OnnxFeatureTeacher:
    """A one-input, one-output ONNX model run on torch tensors with IOBinding.

    Args:
        path: ONNX model whose only output is the feature to match (see ``expose_tensor``).
        device: where the student's tensors live (``cpu`` or ``cuda:N``).
        mean, std: the UNets' RGB normalisation, undone before binding.
        threads: ONNX Runtime intra-op threads on the CPU (0 = ORT's default).
    """

    def __init__(self, path: str | Path, device: torch.device | str, mean: Sequence[float], std: Sequence[float],
                 threads: int = 0):
        import onnxruntime as ort

        self.path = Path(path)
        self.device = torch.device(device)
        so = session_options(threads)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    "the feature teacher needs ONNX Runtime's CUDA provider on a CUDA device; "
                    "install it with `pip install edgeseg[gpu]` (onnxruntime-gpu) or set device: cpu")
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            # ORT runs on a dedicated stream of ours. Not torch's current stream: on the default
            # stream its handle is 0, which ORT reads as "no user stream" and then runs on a
            # non-blocking stream of its own that may read the bound input before torch wrote it.
            # Ordering is made explicit in __call__ (wait_stream both ways). ORT's CUDA EP option
            # `user_compute_stream` (ONNX Runtime CUDA EP docs, "Configuration Options").
            self._stream = torch.cuda.Stream(device=index)
            options = {"device_id": index, "user_compute_stream": str(self._stream.cuda_stream)}
            providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
            self._bind_device = ("cuda", index)
        else:
            providers = ["CPUExecutionProvider"]
            self._bind_device = ("cpu", 0)
            self._stream = None
        self.session = open_session(self.path, so, providers)
        inputs = [i for i in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InputError(f"{self.path}: a feature teacher needs one input and one output, it has "
                             f"{len(inputs)} and {len(outputs)}; expose the wanted tensor first "
                             "(edgeseg distill expose-feature MODEL --layer NAME --out OUT)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        if inputs[0].type not in _ORT_TO_TORCH or outputs[0].type not in _ORT_TO_TORCH:
            raise InputError(f"{self.path}: input/output types {inputs[0].type}/{outputs[0].type} unsupported; need float or float16")
        from edgeseg.distill.feature_onnx import static_input_size

        self.input_hw = static_input_size(inputs)  # (H, W) the model is fixed at, or None (any size)
        self._told_resize = False
        self.input_dtype = _ORT_TO_TORCH[inputs[0].type]
        self.output_dtype = _ORT_TO_TORCH[outputs[0].type]
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._binding = self.session.io_binding()
        self._grid: dict[tuple[int, int], tuple[int, int, int]] = {}  # input (H, W) -> output (C, h, w)
        self._in: torch.Tensor | None = None  # the bound input buffer ([0, 1] RGB), reused per shape
        self._out: torch.Tensor | None = None  # the bound output buffer, reused per shape

    def model_input_hw(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """The (H, W) the model runs at for a batch of ``input_hw``: its static size, or the batch's own."""
        return self.input_hw or (int(input_hw[0]), int(input_hw[1]))

    def feature_shape(self, input_hw: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the feature for a batch of ``input_hw`` (resized to a static input first), read once."""
        key = self.model_input_hw(input_hw)
        if key not in self._grid:
            probe = np.zeros((1, 3, *key), _TORCH_TO_NUMPY[self.input_dtype])
            try:
                out = self.session.run([self.output_name], {self.input_name: probe})[0]
            except Exception as e:  # ORT's own exception types
                raise InputError(f"{self.path}: cannot run on a {key[0]}x{key[1]} input ({str(e).splitlines()[0][:160]})") from None
            if out.ndim != 4:
                raise InputError(f"{self.path}: output {self.output_name} has shape {out.shape}; a feature map (N, C, h, w) is needed")
            self._grid[key] = tuple(out.shape[1:])
        return self._grid[key]

    @property
    def output_buffer(self) -> torch.Tensor | None:
        """The preallocated output tensor that the last call returned (None before the first)."""
        return self._out

    def unnormalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> contiguous [0, 1] RGB in the model's input dtype, on the device."""
        return torch.addcmul(self._mean, images, self._std).to(self.input_dtype).contiguous()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images on ``device`` -> (B, C, h, w) teacher features.

        Input and output buffers are allocated and bound once per batch shape; a call writes
        the un-normalised batch into the bound input and runs. The returned tensor is the
        reused output buffer: consume it before the next call.
        """
        if images.device != self.device:
            raise InputError(f"feature teacher: input is on {images.device}, expected {self.device}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"feature teacher: input must be (B, 3, H, W), got {tuple(images.shape)}")
        model_hw = self.model_input_hw(tuple(images.shape[2:]))
        in_shape = (images.shape[0], 3, *model_hw)
        if self._in is None or tuple(self._in.shape) != in_shape:  # (re)bind only when the shape changes
            if model_hw != tuple(images.shape[2:]) and not self._told_resize:
                log.info("feature teacher %s takes %dx%d inputs: resizing each %dx%d batch on %s before binding",
                         self.path.name, *model_hw, *images.shape[2:], self.device)
                self._told_resize = True
            self._in = torch.empty(in_shape, dtype=self.input_dtype, device=self.device)
            shape = (images.shape[0], *self.feature_shape(tuple(images.shape[2:])))
            self._out = torch.empty(shape, dtype=self.output_dtype, device=self.device)
            kind, index = self._bind_device
            b = self._binding
            b.bind_input(self.input_name, kind, index, _TORCH_TO_NUMPY[self.input_dtype], tuple(self._in.shape),
                         self._in.data_ptr())
            b.bind_output(self.output_name, kind, index, _TORCH_TO_NUMPY[self.output_dtype], shape, self._out.data_ptr())
        if tuple(images.shape[2:]) != model_hw:  # a static-size model: one interpolation on the device
            self._in.copy_(self._resized(torch.addcmul(self._mean, images, self._std), model_hw))
        elif self.input_dtype == torch.float32:
            torch.addcmul(self._mean, images, self._std, out=self._in)  # un-normalise straight into the bound buffer
        else:
            self._in.copy_(torch.addcmul(self._mean, images, self._std))
        if self._stream is None:
            self.session.run_with_iobinding(self._binding)
            return self._out
        producer = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(producer)  # ORT's kernels start after torch has written the input
        self.session.run_with_iobinding(self._binding)
        producer.wait_stream(self._stream)  # torch's next kernels read the output after ORT wrote it
        return self._out

    @staticmethod
    def _resized(rgb: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(B, 3, H, W) float32 -> (B, 3, *hw), bilinear (antialiased when shrinking, or it aliases)."""
        shrink = hw[0] < rgb.shape[2] or hw[1] < rgb.shape[3]
        return F.interpolate(rgb, size=hw, mode="bilinear", align_corners=False, antialias=shrink)

    @torch.no_grad()
    def run_with_copies(self, images: torch.Tensor) -> torch.Tensor:
        """The plain ``session.run`` path (host numpy in, numpy out, copied back): the reference."""
        model_hw = self.model_input_hw(tuple(images.shape[2:]))
        if tuple(images.shape[2:]) != model_hw:
            x = self._resized(torch.addcmul(self._mean, images, self._std), model_hw).to(self.input_dtype)
        else:
            x = self.unnormalise(images)
        x = x.cpu().numpy()
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return torch.from_numpy(out).to(self.device)
