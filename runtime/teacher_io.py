"""How an ONNX person segmenter from a model zoo is fed and read: its I/O, from its graph, metadata and the user.

Zoo models disagree on everything around the network: NCHW or NHWC, RGB or BGR, pixels in
[0, 1] or [0, 255] with or without a mean and std, a fixed or a dynamic size, a static batch of 1,
and an output that is a logit map, probabilities, a softmax over two or more classes with the
person in one channel, or an alpha matte. :func:`resolve_io` reads what the graph says (shapes,
the op that makes the output, edgeseg's own ``edgeseg.io`` metadata), takes the rest from the
user's declaration, and refuses a contradiction or an ambiguity with one line. The result,
:class:`SegmenterIO`, is recorded with the model (a bundle carries it) and drives both the torch
path that distillation runs (``edgeseg.distill.onnx_teacher``) and the numpy path here
(:meth:`SegmenterIO.prepare`, :meth:`SegmenterIO.person_logits`), which the torch-free runtime uses.

Every output kind becomes one person logit per pixel: logits as they are; a multi-class logit map as
``z_person - logsumexp(z_others)``; probabilities, a softmax channel or a matte through
``log(p / (1 - p))`` with ``p`` clamped to ``[clamp, 1 - clamp]`` (the default 1e-4 bounds the logit
at +-9.21, which a teacher's KL term at temperature 1 reads as "certain").
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np

from edgeseg.runtime.errors import InputError

Layout = Literal["nchw", "nhwc"]
OutputKind = Literal["logits", "probabilities", "softmax", "matte"]
DEFAULT_CLAMP = 1e-4


@dataclass(frozen=True)
class SegmenterIO:
    """One ONNX person segmenter's input and output conventions (resolved: no ``auto`` left)."""

    input: str  # input tensor name
    output: str  # output tensor name (the mask head)
    layout: Layout  # input layout
    channels: Literal["rgb", "bgr"]  # input channel order
    range: Literal["unit", "byte"]  # pixels in [0, 1] or [0, 255] before mean/std
    mean: tuple[float, float, float]  # subtracted per channel, in the range's units, in RGB order
    std: tuple[float, float, float]  # divided per channel, in the range's units, in RGB order
    size: tuple[int, int] | None  # (H, W) the model is fixed at; None: any size (dynamic)
    batch: int | None  # the model's static batch (e.g. 1), or None: any batch
    dtype: Literal["float32", "float16"]  # input element type
    kind: OutputKind  # what the output holds
    output_layout: Literal["nchw", "nhwc", "nhw"]  # output layout (nhw: one map, no channel axis)
    channels_out: int  # output channels (1 for nhw)
    person_channel: int  # the person's channel of a multi-channel output
    clamp: float = DEFAULT_CLAMP  # probabilities / mattes: p clamped to [clamp, 1 - clamp] before the logit

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SegmenterIO":
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    @property
    def logit_bound(self) -> float:
        """The largest logit a probability or matte output can give (the clamp, stated)."""
        return math.log((1 - self.clamp) / self.clamp)

    def describe(self) -> str:
        size = f"{self.size[0]}x{self.size[1]}" if self.size else "any size"
        batch = f"static batch {self.batch}" if self.batch else "any batch"
        out = f"{self.kind} ({self.output_layout}, {self.channels_out} ch, person {self.person_channel})"
        if self.kind != "logits":
            out += f", clamped to +-{self.logit_bound:.2f} logits"
        return (f"input {self.input}: {self.layout.upper()} {self.channels.upper()} {self.range} "
                f"mean {list(self.mean)} std {list(self.std)}, {size}, {batch}; output {self.output}: {out}")

    # --- numpy: the torch-free path (runtime check, accuracy reports) ---------------------------

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB at the model's size -> the model's input array."""
        x = rgb.astype(np.float32)
        if self.range == "unit":
            x /= 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.channels == "bgr":
            x = x[..., ::-1]
        if self.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float16 if self.dtype == "float16" else np.float32)

    def person_logits(self, out: np.ndarray) -> np.ndarray:
        """The model's output -> (B, h, w) float32 person logits at the output's resolution."""
        out = np.asarray(out, np.float32)
        if self.output_layout == "nhw":
            maps = out[:, None]
        elif self.output_layout == "nhwc":
            maps = out.transpose(0, 3, 1, 2)
        else:
            maps = out
        if self.kind == "logits":
            if maps.shape[1] == 1:
                return maps[:, 0]
            z = maps[:, self.person_channel]
            others = np.delete(maps, self.person_channel, axis=1)
            top = others.max(axis=1)
            return z - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))
        p = maps[:, self.person_channel if maps.shape[1] > 1 else 0]
        p = np.clip(p, self.clamp, 1 - self.clamp)
        return np.log(p) - np.log1p(-p)


def _dim(d) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _metadata_io(props: dict) -> dict:
    """What edgeseg's own ``edgeseg.io`` metadata says about the input (an exported teacher or student)."""
    if "edgeseg.io" not in props:
        return {}
    io = json.loads(props["edgeseg.io"])
    if io.get("input_layout") == "NHWC-uint8":
        return {"layout": "nhwc", "channels": "rgb", "range": "byte", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
                "fused": True, "output_kind": {"logits": "logits", "probabilities": "probabilities"}.get(io.get("output"))}
    return {"layout": "nchw", "channels": "rgb", "range": "unit", "mean": tuple(io["mean"]), "std": tuple(io["std"]),
            "output_kind": {"logits": "logits", "probabilities": "probabilities"}.get(io.get("output"))}


# ops that move or resize values without changing what they mean: looked through to the op that made them
_LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Resize", "Upsample", "Slice", "Cast",
               "Flatten", "Gather", "Split", "Concat"}


def _producer_ops(path: Path) -> dict[str, str]:
    """Output name -> the op that gives it its meaning (Sigmoid, Softmax, ...), looking through layout ops;
    {} where the onnx package is missing (the runtime's install: the declared kind then counts alone)."""
    try:
        import onnx
    except ImportError:
        return {}
    model = onnx.load(str(path), load_external_data=False)
    made_by = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for o in model.graph.output:
        node, seen = made_by.get(o.name), 0
        while node is not None and node.op_type in _LAYOUT_OPS and node.input and seen < 16:
            node, seen = made_by.get(node.input[0]), seen + 1
        if node is not None:
            out[o.name] = node.op_type
    return out


def resolve_io(path: str | Path, declared: dict | None = None, session=None) -> SegmenterIO:
    """The model's I/O from its graph and metadata, completed by ``declared`` (``auto`` or absent = read it).

    ``declared`` keys (the ``teacher.onnx`` config section): input, output, layout, channels, range, mean,
    std, size, kind, person_channel, output_layout, clamp. A value the graph contradicts, an input that
    is no image, or two outputs and none named is one :class:`InputError` line.
    """
    from edgeseg.runtime.sessions import CPU, open_session, session_options

    path = Path(path)
    d = {k: v for k, v in (declared or {}).items() if v not in (None, "", "auto", (), [])}
    session = session or open_session(path, session_options(optimize=False), CPU, "not a valid ONNX model", limit=120)
    meta = _metadata_io(session.get_modelmeta().custom_metadata_map)

    # 1. the input: one image-like tensor (rank 4, a channel axis of 3)
    inputs = session.get_inputs()
    if "input" in d:
        chosen = [i for i in inputs if i.name == d["input"]]
        if not chosen:
            raise InputError(f"{path}: has no input {d['input']!r} (inputs: {[i.name for i in inputs]}); fix teacher.onnx.input")
    else:
        chosen = [i for i in inputs if len(i.shape) == 4 and 3 in (i.shape[1], i.shape[3])] or \
                 [i for i in inputs if len(i.shape) == 4]
        if not chosen:
            raise InputError(f"{path}: no image-like input (inputs: {[(i.name, i.shape) for i in inputs]}); a person "
                             "segmenter takes one (N, 3, H, W) or (N, H, W, 3) image tensor")
        if len(chosen) > 1:
            raise InputError(f"{path}: several image-like inputs {[i.name for i in chosen]}; name one with teacher.onnx.input")
    inp = chosen[0]
    if len(inp.shape) != 4:
        raise InputError(f"{path}: input {inp.name} has shape {inp.shape}; an image input is (N, 3, H, W) or (N, H, W, 3)")
    if inp.type not in ("tensor(float)", "tensor(float16)"):
        raise InputError(f"{path}: input {inp.name} is {inp.type}; edgeseg feeds float32 or float16 images "
                         "(a uint8-input model needs a float front: re-export it)" if not meta.get("fused") else
                         f"{path}: input {inp.name} takes uint8 (normalisation fused into the graph); "
                         "export the teacher without fused preprocessing (export.fuse_preprocessing: false)")
    shape = inp.shape
    graph_layout = "nchw" if shape[1] == 3 and shape[3] != 3 else "nhwc" if shape[3] == 3 and shape[1] != 3 else None
    layout = d.get("layout") or meta.get("layout") or graph_layout
    if layout is None:
        raise InputError(f"{path}: cannot tell the layout of input {inp.name} {shape}; set teacher.onnx.layout: nchw or nhwc")
    if graph_layout and layout != graph_layout:
        raise InputError(f"{path}: teacher.onnx.layout is {layout} but input {inp.name} has shape {shape} "
                         f"({graph_layout.upper()}); remove the setting or fix it")
    hw = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
    size = (hw[0], hw[1]) if all(_dim(v) for v in hw) else None
    if "size" in d and size and tuple(d["size"]) != size:
        raise InputError(f"{path}: teacher.onnx.size is {list(d['size'])} but the model is fixed at {list(size)}; "
                         "remove the setting")
    size = size or (tuple(d["size"]) if "size" in d else None)
    channels = d.get("channels") or meta.get("channels") or "rgb"
    if meta.get("channels") and d.get("channels") and d["channels"] != meta["channels"]:
        raise InputError(f"{path}: its metadata says {meta['channels'].upper()} input but teacher.onnx.channels is "
                         f"{d['channels']}; remove the setting")
    rng = d.get("range") or meta.get("range") or "unit"
    mean = tuple(float(v) for v in d.get("mean", meta.get("mean", (0.0, 0.0, 0.0))))
    std = tuple(float(v) for v in d.get("std", meta.get("std", (1.0, 1.0, 1.0))))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise InputError(f"{path}: teacher.onnx.mean/std need 3 values each (std > 0), got {list(mean)}, {list(std)}")

    # 2. the output: the named one, or the only one
    outputs = session.get_outputs()
    if "output" in d:
        found = [o for o in outputs if o.name == d["output"]]
        if not found:
            raise InputError(f"{path}: has no output {d['output']!r} (outputs: {[o.name for o in outputs]}); "
                             "fix teacher.onnx.output")
        out = found[0]
    elif len(outputs) == 1:
        out = outputs[0]
    else:
        raise InputError(f"{path}: {len(outputs)} outputs {[o.name for o in outputs]} and none named; "
                         "set teacher.onnx.output to the mask output")
    oshape = list(out.shape)
    if len(oshape) == 4 and not all(_dim(v) for v in oshape[1:]):  # a symbolic class or spatial axis: run it once
        hw = size or (64, 64)
        probe = np.zeros((1, 3, *hw) if layout == "nchw" else (1, *hw, 3),
                         np.float16 if inp.type == "tensor(float16)" else np.float32)
        try:
            oshape = [oshape[0], *session.run([out.name], {inp.name: probe})[0].shape[1:]]
        except Exception as e:  # ORT's own exception types
            raise InputError(f"{path}: cannot run on a {hw[0]}x{hw[1]} input to read output {out.name}'s shape "
                             f"({str(e).splitlines()[0][:120]}); set teacher.onnx.size") from None
    if len(oshape) == 3:
        out_layout, c_out = "nhw", 1
    elif len(oshape) == 4:
        small = lambda v: _dim(v) is not None and v <= 32  # a class axis, not a spatial one
        out_layout = d.get("output_layout") or ("nchw" if small(oshape[1]) and not small(oshape[3]) else
                                                "nhwc" if small(oshape[3]) and not small(oshape[1]) else layout)
        c_out = _dim(oshape[1] if out_layout == "nchw" else oshape[3]) or 1
    else:
        raise InputError(f"{path}: output {out.name} has shape {oshape}; a mask output is (N, C, h, w), (N, h, w, C) or (N, h, w)")
    op = _producer_ops(path).get(out.name, "")
    kind = d.get("kind") or meta.get("output_kind") or {"Sigmoid": "probabilities", "Softmax": "softmax"}.get(op, "logits")
    person = int(d.get("person_channel", 1 if c_out == 2 else 0))
    if c_out > 2 and "person_channel" not in d:
        raise InputError(f"{path}: output {out.name} has {c_out} classes; set teacher.onnx.person_channel to the person's")
    if not 0 <= person < c_out:
        raise InputError(f"{path}: teacher.onnx.person_channel is {person} but output {out.name} has {c_out} channel(s) "
                         f"(0..{c_out - 1})")
    if _dim(shape[0]) not in (None, 1):
        raise InputError(f"{path}: input {inp.name} is fixed at a batch of {shape[0]}; export the model with a dynamic "
                         "batch axis (or a batch of 1, which runs sample by sample)")
    clamp = float(d.get("clamp", DEFAULT_CLAMP))
    if not 0 < clamp < 0.5:
        raise InputError(f"{path}: teacher.onnx.clamp must be in (0, 0.5), got {clamp}")
    return SegmenterIO(input=inp.name, output=out.name, layout=layout, channels=channels, range=rng, mean=mean,
                       std=std, size=size, batch=_dim(shape[0]), dtype="float16" if inp.type == "tensor(float16)" else "float32",
                       kind=kind, output_layout=out_layout, channels_out=c_out, person_channel=person, clamp=clamp)


class ZooSegmenter:
    """A zoo person segmenter run the runtime's way, on the geometry distillation gave it.

    As in training, each frame is letterboxed to the student's input size (``image_size``), that
    image resized to the model's own size where it is fixed, prepared by ``io`` and run (sample by
    sample for a static batch of 1); the person logits come back at the student's size and are cut at
    0 with the letterbox cropped, as every other mask in edgeseg is.
    """

    def __init__(self, path: str | Path, io: SegmenterIO, image_size: tuple[int, int],
                 pad_value: tuple[int, int, int] = (124, 116, 104), threads: int = 0):
        from edgeseg.runtime.sessions import cpu_session

        self.io, self.hw, self.pad = io, tuple(image_size), tuple(pad_value)
        self.model_hw = tuple(io.size or image_size)
        self.session = cpu_session(path, threads)

    def logits(self, fitted: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 frames letterboxed to the student's size -> (B, H, W) person logits at that size."""
        import cv2

        resize = lambda a, hw: cv2.resize(a, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)  # noqa: E731
        if self.model_hw != self.hw:  # as training resizes each batch to a fixed-size teacher's input
            fitted = np.stack([resize(f, self.model_hw) for f in fitted])
        x = self.io.prepare(fitted)
        run = lambda a: self.session.run([self.io.output], {self.io.input: a})[0]  # noqa: E731
        out = np.concatenate([run(x[i:i + 1]) for i in range(len(x))]) if self.io.batch == 1 else run(x)
        z = self.io.person_logits(out)
        if z.shape[1:] != self.hw:
            z = np.stack([resize(m, self.hw) for m in z])
        return z

    def masks(self, frames) -> list[np.ndarray]:
        from edgeseg.runtime.pipeline import masks_at_source
        from edgeseg.runtime.preprocess import fit_image

        fitted = [fit_image(f, self.hw, "letterbox", self.pad) for f in frames]
        z = self.logits(np.stack([a for a, _ in fitted]))
        return masks_at_source(z, [p for _, p in fitted], cut=0.0)
