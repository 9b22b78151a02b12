"""What TensorRT's ONNX parser accepts, checked on every ONNX file we hand it (no TensorRT needed).

Rules (TensorRT 10/11 and onnx-tensorrt), each a defect a real build would hit:

- ``DequantizeLinear`` takes only quantized types: int8, fp8 (E4M3), int4 and fp4 (E2M1)
  (TensorRT "Working with Quantized Types"); int4 is weight-only, so an int4 input must be a
  constant. An int32 input (ONNX Runtime's quantized Conv bias, ``QuantizeBias``) fails to parse
  with "only activation types allowed as input to this layer" (onnx/onnx-tensorrt issue 850,
  microsoft/onnxruntime issue 14229).
- Quantization is symmetric: every Q/DQ zero-point is 0 and of the quantized type, never uint8
  (TensorRT "Working with Quantized Types": "TensorRT employs a symmetric quantization scheme").
  Zero-points given by ``Constant`` nodes are checked like initializers; one computed at run
  time cannot be checked and is refused.
- Per-channel (or block) scales only on constant weights: an activation is quantized per tensor
  (one scale), a weight may have one scale per output channel ("Explicit Quantization").
- UINT8 is an I/O type only: a uint8 tensor may be a network input consumed by ``Cast``, or a
  network output produced by ``Cast`` (TensorRT's data-type notes for ``DataType::kUINT8``;
  the ``Cast`` operator lists uint8 among its types). A ``Transpose`` of uint8 is refused.
"""
from __future__ import annotations

from pathlib import Path

from edgeseg.runtime.errors import InputError

_QUANTIZED = {"INT8", "FLOAT8E4M3FN", "INT4", "FLOAT4E2M1"}
_WEIGHT_ONLY = {"INT4"}


def _constants(graph) -> tuple[dict, dict]:
    """(name -> numpy array, name -> type name) of every constant tensor: initializers and Constant nodes."""
    from onnx import TensorProto, numpy_helper

    values, types = {}, {}
    for init in graph.initializer:
        values[init.name], types[init.name] = numpy_helper.to_array(init), TensorProto.DataType.Name(init.data_type)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = node.attribute[0].t
            values[node.output[0]], types[node.output[0]] = numpy_helper.to_array(t), TensorProto.DataType.Name(t.data_type)
    return values, types


def _qdq_problems(graph, types: dict, constants: dict) -> list[str]:
    producers = {o: n for n in graph.node for o in n.output}

    def is_weight(node) -> bool:  # the quantized tensor is a constant, or a DQ of a Q of a constant
        x = node.input[0]
        if x in constants:
            return True
        q = producers.get(x)
        return node.op_type == "DequantizeLinear" and q is not None and q.op_type == "QuantizeLinear" \
            and q.input[0] in constants

    problems = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type == "DequantizeLinear":
            t = types.get(node.input[0], "UNKNOWN")
            if t not in _QUANTIZED:
                problems.append(f"{node.name}: DequantizeLinear of a {t} tensor ({node.input[0]}); TensorRT takes "
                                "int8/fp8/int4/fp4 only (keep Conv biases in float: QuantizeBias=False)")
            elif t in _WEIGHT_ONLY and not is_weight(node):
                problems.append(f"{node.name}: DequantizeLinear of an {t} activation ({node.input[0]}); TensorRT "
                                f"quantizes {t} weights only")
        if len(node.input) > 2 and node.input[2]:
            zp = constants.get(node.input[2])
            if zp is None:
                problems.append(f"{node.name}: zero-point {node.input[2]} is computed at run time; TensorRT needs a "
                                "constant zero-point 0")
            else:
                zp_type = types.get(node.input[2], "UNKNOWN")
                nonzero = bool(zp.astype("float32").any())
                if zp_type not in _QUANTIZED or nonzero:
                    problems.append(f"{node.name}: zero-point {node.input[2]} is {zp_type} "
                                    f"{'non-zero' if nonzero else 'zero'}; TensorRT needs symmetric quantization "
                                    "(a zero-point 0 of the quantized type: int8/fp8/int4/fp4)")
        scale = constants.get(node.input[1]) if len(node.input) > 1 else None
        if scale is not None and scale.size > 1 and not is_weight(node):
            problems.append(f"{node.name}: {scale.size} scales on the activation {node.input[0]}; TensorRT quantizes "
                            "activations per tensor (per-channel scales are for constant weights only)")
    return problems


def tensorrt_problems(model) -> list[str]:
    """Every rule of this module that ``model`` (an ``onnx.ModelProto`` or a path) breaks, one line each."""
    import onnx
    from onnx import TensorProto

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        types[v.name] = TensorProto.DataType.Name(v.type.tensor_type.elem_type)
    constants, constant_types = _constants(graph)
    types.update(constant_types)

    problems = _qdq_problems(graph, types, constants)
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in graph.node:
        for out in node.output:
            if types.get(out) == "UINT8" and not (out in outputs and node.op_type == "Cast") and node.op_type != "Constant":
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
