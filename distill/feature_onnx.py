"""Exposing an intermediate ONNX tensor as the only output of a pruned, cached model.

The YOLOv9 whole-body detector's wanted feature (``segmentation_model_34_Concat_output_0``)
is an inner tensor. :func:`expose_tensor` cuts the graph at it with onnx's own
``Extractor`` (which keeps only the nodes that tensor depends on) and caches the result next
to the source model, keyed by the source's SHA-256 and the tensor name.
"""
from __future__ import annotations

import difflib
import logging
import re
import time
from pathlib import Path

import numpy as np

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path, sha256_file
from edgeseg.runtime.sessions import cpu_session

log = logging.getLogger(__name__)

_CACHE_KEY = "edgeseg.exposed_from"


def load_onnx(path: str | Path, load_external_data: bool = True):
    """``onnx.load`` with a one-line error for a missing or corrupt file."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ONNX file does not exist")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e)[:120]}); re-export or re-download it") from None
    if not model.graph.node:
        raise InputError(f"{path}: not a valid ONNX model (the graph has no nodes); re-export or re-download it")
    return model


def cached_path(src: Path, tensor: str) -> Path:
    """Where the exposed model of ``tensor`` is cached: next to the source model."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", tensor).strip("_") or "tensor"
    return src.with_name(f"{src.stem}.{safe}.onnx")


def tensor_names(model) -> list[str]:
    """Every tensor a node produces, plus the graph inputs, in graph order."""
    names = [i.name for i in model.graph.input]
    for node in model.graph.node:
        names.extend(o for o in node.output if o)
    return names


def expose_tensor(src: str | Path, tensor: str, out: str | Path | None = None, keep_outputs: bool = False) -> Path:
    """Write a model computing only ``tensor`` (as its one output); reuse a matching cache.

    ``keep_outputs``: keep the model's own outputs too, ``tensor`` added after them (the segmentation
    teacher that is also the feature teacher runs once for both).

    Args:
        src: the full ONNX model.
        tensor: name of the intermediate tensor to expose.
        out: where to write; default :func:`cached_path`.

    Returns:
        The path of the exposed model.

    Raises:
        InputError: the file is missing or not ONNX, or no tensor has that name (the message
            lists the closest names).
    """
    import onnx
    import onnx.utils

    src = Path(src)
    out = Path(out) if out else cached_path(src, tensor + ("+outputs" if keep_outputs else ""))
    if not src.is_file():
        raise InputError(f"{src}: ONNX file does not exist")
    key = f"{sha256_file(src)}:{tensor}" + (":+outputs" if keep_outputs else "")
    if out.is_file():
        try:
            cached = onnx.load(str(out), load_external_data=False)
            if {p.key: p.value for p in cached.metadata_props}.get(_CACHE_KEY) == key:
                log.info("reusing exposed feature model %s", out)
                return out
        except Exception:  # a corrupt cache is rebuilt, never trusted
            log.warning("cached feature model %s is unreadable; rebuilding it", out)

    t0 = time.perf_counter()
    model = load_onnx(src)
    names = tensor_names(model)
    if tensor not in set(names):
        close = difflib.get_close_matches(tensor, names, n=5, cutoff=0.5)
        if not close:
            close = [n for n in names if "concat" in n.lower()][:5]
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise InputError(f"{src}: no tensor named {tensor!r} ({len(names)} tensors in the graph).{hint} "
                         f"List them all with: python -c \"import onnx; [print(o) for n in onnx.load('{src}').graph.node for o in n.output]\"")
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    model = onnx.shape_inference.infer_shapes(model)
    known = {v.name for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    if tensor not in known:  # shape inference could not type it: declare it float, shape unknown
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    outputs = [o.name for o in model.graph.output if o.name != tensor] if keep_outputs else []
    extracted = onnx.utils.Extractor(model).extract_model(inputs, [*outputs, tensor])
    extracted.producer_name = "edgeseg.expose_tensor"
    del extracted.metadata_props[:]
    for k, v in {p.key: p.value for p in model.metadata_props}.items():
        extracted.metadata_props.add(key=k, value=v)
    extracted.metadata_props.add(key=_CACHE_KEY, value=key)
    with atomic_path(out) as tmp:
        onnx.save(extracted, str(tmp))
    log.info("exposed %s from %s: %d of %d nodes kept, %.1fs -> %s", tensor, src.name, len(extracted.graph.node),
             len(model.graph.node), time.perf_counter() - t0, out)
    return out


def static_input_size(inputs) -> tuple[int, int] | None:
    """(H, W) if the first input of an ORT session's ``get_inputs()`` has a fixed spatial size, else None.

    Exported feature teachers often do (``..._Nx3x640x640_featext.onnx``: dynamic batch, static 640x640).
    """
    shape = list(inputs[0].shape)
    if len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:]):
        return int(shape[2]), int(shape[3])
    return None


def probe_output_shape(path: str | Path, input_hw: tuple[int, int] | None = None,
                       batch: int = 1) -> tuple[tuple[int, int], tuple[int, ...]]:
    """Run the (one-output) model once on zeros of (batch, 3, H, W); return (H, W) and the output's shape.

    ``input_hw`` None: the model's own static size, or 640x640 where its input is dynamic.
    """
    sess = cpu_session(path)
    inp = sess.get_inputs()[0]
    static = static_input_size(sess.get_inputs())
    if input_hw is None:
        input_hw = static or (640, 640)
    elif static and tuple(input_hw) != static:
        raise InputError(f"{path}: its input is fixed at {static[0]}x{static[1]}, not {input_hw[0]}x{input_hw[1]}; "
                         "drop --input-size (training resizes each batch to the model's size on the device)")
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    try:
        out = sess.run(None, {inp.name: np.zeros((batch, 3, *input_hw), dtype)})[0]
    except Exception as e:  # ORT raises its own exception types for shape errors
        raise InputError(f"{path}: cannot run on a {input_hw[0]}x{input_hw[1]} input ({str(e).splitlines()[0][:160]}); "
                         "pass the model's input size with --input-size H W") from None
    return tuple(input_hw), tuple(out.shape)
