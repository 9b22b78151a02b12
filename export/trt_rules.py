"""What TensorRT's ONNX parser accepts, checked on every ONNX file we hand it (no TensorRT needed).

Rules (TensorRT 10/11 and onnx-tensorrt), each a defect a real build would hit:

- ``DequantizeLinear`` takes only quantized *activation* types: int8, fp8 or int4. An int32
  input (ONNX Runtime's quantized Conv bias, ``QuantizeBias``) fails to parse with "only
  activation types allowed as input to this layer" (onnx/onnx-tensorrt issue 850, microsoft/
  onnxruntime issue 14229).
- Quantization is symmetric: every Q/DQ zero-point is 0 (TensorRT "Working with Quantized
  Types": zero points other than 0 are not supported), and Q/DQ are int8/fp8/int4, never uint8.
- UINT8 is an I/O type only: a uint8 tensor may be a network input consumed by ``Cast``, or a
  network output produced by ``Cast`` (TensorRT's data-type notes for ``DataType::kUINT8``;
  the ``Cast`` operator lists uint8 among its types). A ``Transpose`` of uint8 is refused.
"""
from __future__ import annotations

from pathlib import Path

from edgeseg.runtime.errors import InputError

_QUANTIZED_INPUTS = {"INT8", "FLOAT8E4M3FN", "INT4"}


def tensorrt_problems(model) -> list[str]:
    """Every rule of this module that ``model`` (an ``onnx.ModelProto`` or a path) breaks, one line each."""
    import onnx
    from onnx import TensorProto, numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        types[v.name] = TensorProto.DataType.Name(v.type.tensor_type.elem_type)
    inits = {i.name: i for i in graph.initializer}
    for name, init in inits.items():
        types[name] = TensorProto.DataType.Name(init.data_type)
    for node in graph.node:  # Constant nodes carry types too
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type:
            types[node.output[0]] = TensorProto.DataType.Name(node.attribute[0].t.data_type)

    problems = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            t = types.get(node.input[0], "UNKNOWN")
            if t not in _QUANTIZED_INPUTS:
                problems.append(f"{node.name}: DequantizeLinear of a {t} tensor ({node.input[0]}); TensorRT takes "
                                "int8/fp8/int4 only (keep Conv biases in float: QuantizeBias=False)")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is not None:
                arr = numpy_helper.to_array(zp)
                if arr.dtype.name not in ("int8",) or arr.any():
                    problems.append(f"{node.name}: zero-point {node.input[2]} is {arr.dtype.name} "
                                    f"{'non-zero' if arr.any() else 'zero'}; TensorRT needs symmetric int8 (zero-point 0)")
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in graph.node:
        for out in node.output:
            if types.get(out) == "UINT8" and not (out in outputs and node.op_type == "Cast"):
                problems.append(f"{node.name}: {node.op_type} produces uint8 tensor {out}; TensorRT allows uint8 only "
                                "as a network output made by Cast")
    for name in inputs:
        if types.get(name) == "UINT8":
            bad = [n for n in consumers.get(name, []) if n.op_type != "Cast"]
            if bad:
                problems.append(f"{bad[0].name}: {bad[0].op_type} reads the uint8 input {name}; TensorRT needs a Cast "
                                "to float first (cast before any Transpose)")
    return problems


def check_for_tensorrt(path: str | Path) -> None:
    """Raise InputError naming the first problems if TensorRT's parser would refuse ``path``."""
    problems = tensorrt_problems(path)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"{path}: TensorRT's ONNX parser would refuse it: {'; '.join(problems[:3])}{more}")
