"""Running frozen ONNX teachers on torch tensors through ONNX Runtime IOBinding.

Two teachers run this way: the feature teacher (one exposed intermediate tensor, e.g. YOLOv9's
neck) and the segmentation teacher given as an ONNX file (``teacher.onnx``: a model-zoo person
segmenter). The student's batch is already on the training device, normalised for the UNets.
Each teacher's input is made there from it (un-normalised, resized to a static input size,
reordered to BGR or NHWC, scaled, whatever the model wants: one chain of torch ops on the device)
and written into a buffer whose memory is bound as the session's input; outputs are bound to
preallocated torch tensors, reused while the batch shape stays the same. No numpy, no host round
trip. On CUDA ORT runs on a dedicated stream ordered after torch's writes and before torch's reads
(``wait_stream`` both ways); on the CPU it reads and writes torch's memory directly.

A model exported at a static batch of 1 (``..._1x3x640x640.onnx``) runs sample by sample: each
sample's slice of the bound buffers is bound in turn (still no copy), and the log says once what a
dynamic-batch export would save.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.runtime.errors import BackendUnavailableError, InputError
from edgeseg.runtime.sessions import open_session, session_options

log = logging.getLogger(__name__)

_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


def resized(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, *hw), bilinear (antialiased when shrinking, or it aliases)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=shrink)


class BoundSession:
    """One ONNX Runtime session on the training device, fed and read through IOBinding with torch buffers.

    Args:
        path: the ONNX model.
        device: where the torch tensors live (``cpu`` or ``cuda:N``).
        threads: ONNX Runtime intra-op threads on the CPU (0 = ORT's default).
        what: how errors name the model ("feature teacher", "teacher").
    """

    def __init__(self, path: str | Path, device: torch.device | str, threads: int = 0, what: str = "teacher"):
        import onnxruntime as ort

        self.path, self.device, self.what = Path(path), torch.device(device), what
        so = session_options(threads)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    f"the {what} needs ONNX Runtime's CUDA provider on a CUDA device; "
                    "install it with `pip install edgeseg[gpu]` (onnxruntime-gpu) or set device: cpu")
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            # ORT runs on a dedicated stream of ours. Not torch's current stream: on the default
            # stream its handle is 0, which ORT reads as "no user stream" and then runs on a
            # non-blocking stream of its own that may read the bound input before torch wrote it.
            # Ordering is made explicit in run() (wait_stream both ways). ORT's CUDA EP option
            # `user_compute_stream` (ONNX Runtime CUDA EP docs, "Configuration Options").
            self._stream = torch.cuda.Stream(device=index)
            providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(self._stream.cuda_stream)}),
                         "CPUExecutionProvider"]
            self._bind_device = ("cuda", index)
        else:
            providers, self._bind_device, self._stream = ["CPUExecutionProvider"], ("cpu", 0), None
        self.session = open_session(self.path, so, providers)
        self._binding = self.session.io_binding()
        self._bound: tuple | None = None  # (pointers and shapes) of the current binding
        self._told_static = False

    def static_batch(self, input_name: str) -> int | None:
        """The model's fixed batch (1), or None for a dynamic batch axis; another fixed batch is refused."""
        shape = next(i.shape for i in self.session.get_inputs() if i.name == input_name)
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        if batch not in (None, 1):
            raise InputError(f"{self.path}: the {self.what}'s input {input_name} is fixed at a batch of {batch}; "
                             "export it with a dynamic batch axis (or a batch of 1, which runs sample by sample)")
        return batch

    def _bind(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for name, t in [*inputs.items(), *outputs.items()]:  # ORT reads and writes the raw memory: it must be plain
            if not t.is_contiguous() or t.dtype not in _TORCH_TO_NUMPY or t.device != self.device:
                raise InputError(f"{self.what} {self.path.name}: tensor {name} must be a contiguous float32/float16 "
                                 f"tensor on {self.device} to bind, got {t.dtype} on {t.device}"
                                 + ("" if t.is_contiguous() else ", not contiguous"))
        key = tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in [*inputs.items(), *outputs.items()])
        if key == self._bound:
            return
        kind, index = self._bind_device
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, t in inputs.items():
            b.bind_input(name, kind, index, _TORCH_TO_NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        for name, t in outputs.items():
            b.bind_output(name, kind, index, _TORCH_TO_NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        self._bound = key

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], static_batch: int | None = None) -> None:
        """Run with ``inputs`` bound as the model's inputs and ``outputs`` as its outputs (contiguous, preallocated).

        ``static_batch`` 1: the model takes one sample at a time; each sample's slices are bound in turn.
        """
        producer = torch.cuda.current_stream(self.device) if self._stream is not None else None
        if producer is not None:
            self._stream.wait_stream(producer)  # ORT's kernels start after torch has written the input
        batch = next(iter(inputs.values())).shape[0]
        if static_batch == 1 and batch > 1:
            if not self._told_static:
                log.info("%s %s has a static batch of 1: it runs sample by sample into the bound buffers (%d calls per "
                         "batch of %d; an export with a dynamic batch axis would run each batch in one call)",
                         self.what, self.path.name, batch, batch)
                self._told_static = True
            for i in range(batch):
                self._bind({n: t[i:i + 1] for n, t in inputs.items()}, {n: t[i:i + 1] for n, t in outputs.items()})
                self.session.run_with_iobinding(self._binding)
        else:
            self._bind(inputs, outputs)
            self.session.run_with_iobinding(self._binding)
        if producer is not None:
            producer.wait_stream(self._stream)  # torch's next kernels read the outputs after ORT wrote them

    def probe(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """``session.run`` on host arrays (shape probing at set-up), with one clear line on failure."""
        try:
            return self.session.run(names, feeds)
        except Exception as e:  # ORT's own exception types
            shapes = {k: v.shape for k, v in feeds.items()}
            raise InputError(f"{self.path}: the {self.what} cannot run on {shapes} ({str(e).splitlines()[0][:160]})") from None


class OnnxFeatureTeacher:
    """A one-input, one-output ONNX model (an exposed feature, see ``expose_tensor``) run on torch tensors.

    Args:
        path: ONNX model whose only output is the feature to match.
        device: where the student's tensors live (``cpu`` or ``cuda:N``).
        mean, std: the UNets' RGB normalisation, undone before binding (the model takes [0, 1] RGB).
        threads: ONNX Runtime intra-op threads on the CPU (0 = ORT's default).
    """

    def __init__(self, path: str | Path, device: torch.device | str, mean: Sequence[float], std: Sequence[float],
                 threads: int = 0):
        from edgeseg.distill.feature_onnx import static_input_size

        self.runner = BoundSession(path, device, threads, "feature teacher")
        self.path, self.device, self.session = self.runner.path, self.runner.device, self.runner.session
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InputError(f"{self.path}: a feature teacher needs one input and one output, it has "
                             f"{len(inputs)} and {len(outputs)}; expose the wanted tensor first "
                             "(edgeseg distill expose-feature MODEL --layer NAME --out OUT)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        if inputs[0].type not in _ORT_TO_TORCH or outputs[0].type not in _ORT_TO_TORCH:
            raise InputError(f"{self.path}: input/output types {inputs[0].type}/{outputs[0].type} unsupported; need float or float16")
        self.input_hw = static_input_size(inputs)  # (H, W) the model is fixed at, or None (any size)
        self.batch = self.runner.static_batch(self.input_name)
        self._told_resize = False
        self.input_dtype = _ORT_TO_TORCH[inputs[0].type]
        self.output_dtype = _ORT_TO_TORCH[outputs[0].type]
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
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
            out = self.runner.probe({self.input_name: probe}, [self.output_name])[0]
            if out.ndim != 4:
                raise InputError(f"{self.path}: output {self.output_name} has shape {out.shape}; a feature map (N, C, h, w) is needed")
            self._grid[key] = tuple(out.shape[1:])
        return self._grid[key]

    @property
    def output_buffer(self) -> torch.Tensor | None:
        """The preallocated output tensor that the last call returned (None before the first)."""
        return self._out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images on ``device`` -> (B, C, h, w) teacher features.

        The returned tensor is the reused output buffer: consume it before the next call.
        """
        if images.device != self.device:
            raise InputError(f"feature teacher: input is on {images.device}, expected {self.device}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"feature teacher: input must be (B, 3, H, W), got {tuple(images.shape)}")
        model_hw = self.model_input_hw(tuple(images.shape[2:]))
        in_shape = (images.shape[0], 3, *model_hw)
        if self._in is None or tuple(self._in.shape) != in_shape:  # new buffers only when the shape changes
            if model_hw != tuple(images.shape[2:]) and not self._told_resize:
                log.info("feature teacher %s takes %dx%d inputs: resizing each %dx%d batch on %s before binding",
                         self.path.name, *model_hw, *images.shape[2:], self.device)
                self._told_resize = True
            self._in = torch.empty(in_shape, dtype=self.input_dtype, device=self.device)
            shape = (images.shape[0], *self.feature_shape(tuple(images.shape[2:])))
            self._out = torch.empty(shape, dtype=self.output_dtype, device=self.device)
        if tuple(images.shape[2:]) != model_hw:  # a static-size model: one interpolation on the device
            self._in.copy_(resized(torch.addcmul(self._mean, images, self._std), model_hw))
        elif self.input_dtype == torch.float32:
            torch.addcmul(self._mean, images, self._std, out=self._in)  # un-normalise straight into the bound buffer
        else:
            self._in.copy_(torch.addcmul(self._mean, images, self._std))
        self.runner.run({self.input_name: self._in}, {self.output_name: self._out}, self.batch)
        return self._out

    @torch.no_grad()
    def run_with_copies(self, images: torch.Tensor) -> torch.Tensor:
        """The plain ``session.run`` path (host numpy in, numpy out, copied back): the reference."""
        model_hw = self.model_input_hw(tuple(images.shape[2:]))
        x = resized(torch.addcmul(self._mean, images, self._std), model_hw).to(self.input_dtype)
        x = x.cpu().numpy()
        if self.batch == 1:
            out = np.concatenate([self.session.run([self.output_name], {self.input_name: x[i:i + 1]})[0]
                                  for i in range(len(x))])
        else:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        return torch.from_numpy(out).to(self.device)


class OnnxSegmentationTeacher(nn.Module):
    """An ONNX person segmenter as the distillation teacher: normalised images -> (B, 1, H, W) person logits.

    A module without parameters, so everything that runs the torch teacher (the trainer, the
    cached targets, evaluation) runs this one alike. Its I/O conventions are ``io``
    (:class:`edgeseg.runtime.teacher_io.SegmenterIO`, from the graph and the config); the input is
    made on the device into the bound buffer, the output read from the bound buffer and turned
    into the person logit at the batch's size.

    Args:
        path: the ONNX model.
        io: its resolved I/O conventions.
        device: the training device.
        mean, std: the UNets' RGB normalisation of the batches it receives.
        threads: ONNX Runtime CPU threads (0 = default).
        feature: the name of an extra output (an inner tensor exposed beside the mask) when the same
            file is also the feature teacher: one run per batch fills both (see :meth:`feature_view`).
    """

    def __init__(self, path: str | Path, io, device: torch.device | str, mean: Sequence[float], std: Sequence[float],
                 threads: int = 0, feature: str | None = None):
        super().__init__()
        self.runner = BoundSession(path, device, threads, "teacher")
        self.path, self.io, self.device = self.runner.path, io, self.runner.device
        self.feature = feature
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._model_mean = torch.tensor(io.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._model_std = torch.tensor(io.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.input_dtype = torch.float16 if io.dtype == "float16" else torch.float32
        types = {o.name: o.type for o in self.runner.session.get_outputs()}
        self.output_dtype = _ORT_TO_TORCH.get(types[io.output], torch.float32)
        self.feature_dtype = _ORT_TO_TORCH.get(types.get(feature, ""), torch.float32)
        self.runner.static_batch(io.input)  # a fixed batch other than 1 is refused here
        self._buffers: dict[str, torch.Tensor] = {}
        self._shapes: dict[tuple, dict[str, tuple]] = {}  # input shape -> output shapes
        self._told: set[str] = set()
        self.last_feature: torch.Tensor | None = None

    def model_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(self.io.size) if self.io.size else (int(hw[0]), int(hw[1]))

    def _say_once(self, key: str, msg: str, *args) -> None:
        if key not in self._told:
            self._told.add(key)
            log.info(msg, *args)

    def model_input(self, images: torch.Tensor, channels: str | None = None, pixel_range: str | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalised -> the model's input tensor (its size, channel order, range, mean/std, layout).

        ``channels`` / ``pixel_range``: override the resolved ones (``inspect-teacher`` tries the other reading).
        """
        io = self.io
        x = resized(torch.addcmul(self._mean, images.float(), self._std), self.model_hw(tuple(images.shape[2:])))
        if (pixel_range or io.range) == "byte":
            x = x * 255.0
        x = (x - self._model_mean) / self._model_std
        if (channels or io.channels) == "bgr":
            x = x.flip(1)
        if io.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        return x.to(self.input_dtype).contiguous()

    def _output_shapes(self, in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Each bound output's shape for an input shape, read once by running the model on zeros (one sample)."""
        if in_shape not in self._shapes:
            names = [self.io.output] + ([self.feature] if self.feature else [])
            probe = np.zeros((1, *in_shape[1:]), _TORCH_TO_NUMPY[self.input_dtype])
            outs = self.runner.probe({self.io.input: probe}, names)
            self._shapes[in_shape] = {n: (in_shape[0], *o.shape[1:]) for n, o in zip(names, outs)}
        return self._shapes[in_shape]

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    @torch.no_grad()
    def raw_output(self, images: torch.Tensor, **overrides) -> torch.Tensor:
        """The model's own mask output (bound buffer, reused) for a normalised batch on the device."""
        if images.device != self.device:
            raise InputError(f"teacher {self.path.name}: input is on {images.device}, expected {self.device}")
        if tuple(images.shape[2:]) != self.model_hw(tuple(images.shape[2:])):
            self._say_once("resize", "teacher %s takes %dx%d inputs: resizing each %dx%d batch on %s before binding",
                           self.path.name, *self.model_hw(tuple(images.shape[2:])), *images.shape[2:], self.device)
        x = self.model_input(images, **overrides)  # a fresh contiguous tensor on the device: bound as it is
        shapes = self._output_shapes(tuple(x.shape))
        outs = {self.io.output: self._buffer(self.io.output, shapes[self.io.output], self.output_dtype)}
        if self.feature:
            outs[self.feature] = self._buffer(self.feature, shapes[self.feature], self.feature_dtype)
        self.runner.run({self.io.input: x}, outs, self.io.batch)
        self.last_feature = outs.get(self.feature) if self.feature else None
        return outs[self.io.output]

    def person_logits(self, out: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The model's output -> (B, 1, *hw) float32 person logits (the same mapping as ``SegmenterIO.person_logits``)."""
        io = self.io
        out = out.float()
        maps = out[:, None] if io.output_layout == "nhw" else out.permute(0, 3, 1, 2) if io.output_layout == "nhwc" else out
        if io.kind == "logits":
            if maps.shape[1] == 1:
                z = maps
            else:
                others = torch.cat([maps[:, :io.person_channel], maps[:, io.person_channel + 1:]], dim=1)
                z = maps[:, io.person_channel:io.person_channel + 1] - torch.logsumexp(others, dim=1, keepdim=True)
        else:
            p = maps[:, io.person_channel:io.person_channel + 1] if maps.shape[1] > 1 else maps
            p = p.clamp(io.clamp, 1 - io.clamp)
            z = torch.log(p) - torch.log1p(-p)
        if tuple(z.shape[-2:]) != tuple(hw):
            z = F.interpolate(z, size=hw, mode="bilinear", align_corners=False)
        return z

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images on the device -> (B, 1, H, W) person logits (a new tensor)."""
        return self.person_logits(self.raw_output(images), tuple(images.shape[2:]))

    def parameter_count(self) -> int:
        """Weights in the ONNX file (its initializers' elements): what the report's teacher_params means for torch."""
        import onnx

        model = onnx.load(str(self.path), load_external_data=False)
        return int(sum(np.prod(t.dims) for t in model.graph.initializer))

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 2**20

    def feature_view(self) -> "_SharedFeature":
        """The feature teacher sharing this session: it reads the extra output of the same run."""
        if not self.feature:
            raise ValueError("this teacher was opened without a feature output")
        return _SharedFeature(self)


class _SharedFeature:
    """The feature teacher when it is the segmentation teacher's own file: the inner tensor of the same run.

    Called after the teacher on the same batch (the trainer and the target cache do), it returns that
    run's feature buffer; called on another batch, it runs the model itself.
    """

    def __init__(self, teacher: OnnxSegmentationTeacher):
        self.teacher = teacher
        self._fresh: torch.Tensor | None = None  # the batch the teacher ran last, until this view consumes its feature
        teacher.register_forward_hook(lambda m, args, out: setattr(self, "_fresh", args[0]))

    def feature_shape(self, input_hw: tuple[int, int]) -> tuple[int, int, int]:
        hw = self.teacher.model_hw(input_hw)
        shape = (1, 3, *hw) if self.teacher.io.layout == "nchw" else (1, *hw, 3)
        return tuple(self.teacher._output_shapes(shape)[self.teacher.feature][1:])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        fresh, self._fresh = self._fresh, None  # one use per teacher run: a later batch at the same address reruns
        if fresh is not images:
            self.teacher(images)
            self._fresh = None
        return self.teacher.last_feature
