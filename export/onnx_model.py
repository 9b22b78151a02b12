"""ONNX export of the stripped student: optional fused preprocessing, chosen output, onnxsim, parity.

Tensor names are API: the input is ``images`` ((B, 3, H, W) float normalised, or (B, H, W, 3)
uint8 with fused preprocessing) and the output ``mask_logits``, ``mask_probs`` or ``mask``
((B, 1, H, W); the mask is uint8 0/1). The resolved config and the I/O contract are stored in
the model's ``metadata_props`` for the runtime to read.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgeseg.distill.config import config_to_dict

from edgeseg.export.config import Config
from edgeseg.distill.models import UnetSegmenter
from edgeseg.distill.onnx_export import export_module
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path
from edgeseg.runtime.sessions import cpu_session

log = logging.getLogger(__name__)

OUTPUT_NAMES = {"logits": "mask_logits", "probabilities": "mask_probs", "mask": "mask"}
PARITY_TOLERANCE = 1e-4


class DeployModel(nn.Module):
    """What ships: [uint8 NHWC -> normalised NCHW] -> student -> [logits | probabilities | mask]."""

    def __init__(self, student: UnetSegmenter, mean, std, fuse_preprocessing: bool, output: str, threshold: float):
        super().__init__()
        self.student = student
        self.fuse = fuse_preprocessing
        self.output = output
        std_t = torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1))
        self.register_buffer("bias", (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1))
        self.logit_threshold = math.log(threshold / (1 - threshold))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.fuse:
            # Cast first: TensorRT takes uint8 only at network I/O and Cast, so no Transpose of uint8.
            images = images.float().permute(0, 3, 1, 2) * self.scale + self.bias
        logits = self.student(images)
        if self.output == "probabilities":
            return torch.sigmoid(logits)
        if self.output == "mask":
            return (logits > self.logit_threshold).to(torch.uint8)
        return logits


def io_contract(cfg: Config) -> dict:
    """The runtime's view of the model: input layout, normalisation, output and threshold."""
    e = cfg.export
    return {
        "input_name": "images",
        "input_layout": "NHWC-uint8" if e.fuse_preprocessing else "NCHW-float32-normalised",
        "image_size": list(cfg.data.image_size),
        "mean": list(cfg.data.mean), "std": list(cfg.data.std),
        "pad_value": [int(round(m * 255)) for m in cfg.data.mean],
        "resize": cfg.deploy.resize,
        "output_name": OUTPUT_NAMES[e.output], "output": e.output, "threshold": e.threshold,
        "max_batch": e.max_batch, "opt_batch": e.opt_batch,
    }


def example_input(cfg: Config, batch: int, seed: int) -> torch.Tensor:
    """Fresh random input of the model's input kind."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.data.image_size
    if cfg.export.fuse_preprocessing:
        return torch.randint(0, 256, (batch, h, w, 3), generator=g, dtype=torch.uint8)
    return torch.randn(batch, 3, h, w, generator=g)


def count_nodes(path: str | Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def simplify(src: Path, dst: Path) -> Path:
    """onnxsim with a check; the result must be valid for any batch (dynamic axis kept)."""
    import onnx
    from onnxsim import simplify as onnxsim_simplify

    model = onnx.load(str(src))
    simplified, ok = onnxsim_simplify(model)
    if not ok:
        raise RuntimeError(f"onnxsim could not validate the simplified {src.name}")
    onnx.checker.check_model(simplified, full_check=True)
    with atomic_path(dst) as tmp:
        onnx.save(simplified, str(tmp))
    return dst


def parity(model: nn.Module, onnx_path: Path, cfg: Config, batches=(1,), seed: int = 1) -> tuple[float, list]:
    """Max |ORT - torch| over fresh random inputs at each batch size; also returns the feeds/outputs."""
    sess = cpu_session(onnx_path)
    worst, records = 0.0, []
    for i, b in enumerate(batches):
        x = example_input(cfg, b, seed + i)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {"images": x.numpy()})[0]
        if out.shape != ref.shape:
            raise AssertionError(f"ONNX output shape {out.shape} != torch {ref.shape} at batch {b}")
        diff = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())
        worst = max(worst, diff)
        records.append((x.numpy(), ref))
    return worst, records


def save_polygraphy_reference(records: list, out_dir: Path, output_name: str) -> tuple[Path, Path]:
    """Write the parity inputs and torch outputs in Polygraphy's JSON formats.

    ``polygraphy run model.onnx --onnxrt --load-inputs torch_inputs.json --load-outputs
    torch_outputs.json --atol 1e-4 --rtol 0`` then checks ONNX Runtime against torch.
    """
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    from polygraphy.logger import G_LOGGER

    inputs = [{"images": x} for x, _ in records]
    results = RunResults([("torch", [IterationResult({output_name: y}, runner_name="torch") for _, y in records])])
    in_path, out_path = out_dir / "torch_inputs.json", out_dir / "torch_outputs.json"
    with G_LOGGER.verbosity(G_LOGGER.WARNING):  # Polygraphy announces every save on stdout
        save_json(inputs, str(in_path))
        results.save(str(out_path))
    return in_path, out_path


def spatial_means_to_global_pool(model) -> int:
    """Rewrite ``ReduceMean(axes=[2, 3], keepdims=1)`` on NCHW tensors as ``GlobalAveragePool``; returns the count.

    The same function (the squeeze-excitation's spatial mean). Quantized, ONNX Runtime runs a
    float ReduceMean between a DequantizeLinear and a QuantizeLinear, whose summation order
    depends on the batch it runs in: one image's requantized mean can flip by one step between a
    batch of 1 and a batch of 5, and the flip travels to a visible mask difference. The pooled
    form becomes ``QLinearGlobalAveragePool``, an exact integer sum per image and channel, so a
    served mask no longer depends on what else was in its batch.
    """
    from onnx import helper

    count = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "ReduceMean" or len(node.input) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if sorted(attrs.get("axes", [])) in ([2, 3], [-2, -1]) and attrs.get("keepdims", 1) == 1:
            model.graph.node[i].CopyFrom(helper.make_node("GlobalAveragePool", list(node.input), list(node.output),
                                                          name=node.name))
            count += 1
    return count


def export_onnx(cfg: Config, student: UnetSegmenter, out_dir: Path) -> dict:
    """``model.onnx`` (simplified) in ``out_dir``; returns the export report.

    Raises InputError if ONNX Runtime and torch disagree by more than 1e-4.
    """
    t0 = time.perf_counter()
    e = cfg.export
    deploy = DeployModel(student, cfg.data.mean, cfg.data.std, e.fuse_preprocessing, e.output, e.threshold).eval()
    raw = out_dir / "model.raw.onnx"
    final = out_dir / "model.onnx"
    meta = {"edgeseg.io": json.dumps(io_contract(cfg)), "edgeseg.config": json.dumps(config_to_dict(cfg))}
    export_module(deploy, raw, example_input(cfg, 1, 0), ["images"], [OUTPUT_NAMES[e.output]], opset=e.opset,
                  metadata=meta, transform=spatial_means_to_global_pool)
    nodes_before = count_nodes(raw)
    simplify(raw, final)
    raw.unlink()
    nodes_after = count_nodes(final)
    worst, records = parity(deploy, final, cfg, batches=(1, e.max_batch))
    save_polygraphy_reference(records, out_dir, OUTPUT_NAMES[e.output])
    if e.output != "mask" and worst > PARITY_TOLERANCE:
        raise InputError(f"{final}: ONNX Runtime differs from torch by {worst:.3g} (> {PARITY_TOLERANCE}); "
                         "the export is wrong for this model, please report it")
    report = {"onnx": str(final), "nodes_before_onnxsim": nodes_before, "nodes_after_onnxsim": nodes_after,
              "parity_max_abs": worst, "parity_batches": [1, e.max_batch], "size_mb": final.stat().st_size / 2**20,
              "seconds": time.perf_counter() - t0}
    log.info("ONNX: %d -> %d nodes after onnxsim, parity %.2g, %.1f s", nodes_before, nodes_after, worst, report["seconds"])
    return report


def export_teacher_onnx(cfg: Config, out: Path) -> Path:
    """``out``: the teacher behind the student's I/O contract (for `runtime check`'s teacher agreement).

    Rebuilt only when the teacher checkpoint changes (its SHA-256 is stored in the model's metadata
    and in ``<out>.json``); torch and ONNX Runtime must agree as for the student.
    """
    from edgeseg.distill.models import load_teacher
    from edgeseg.runtime.files import sha256_file

    stamp = out.with_name(out.name + ".json")
    digest = sha256_file(cfg.teacher_checkpoint)
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("teacher_sha256") == digest:
        return out
    t0 = time.perf_counter()
    e = cfg.export
    deploy = DeployModel(load_teacher(cfg).eval(), cfg.data.mean, cfg.data.std, e.fuse_preprocessing, "logits",
                         e.threshold).eval()
    contract = {**io_contract(cfg), "output_name": OUTPUT_NAMES["logits"], "output": "logits"}
    raw = out.with_name("teacher.raw.onnx")
    export_module(deploy, raw, example_input(cfg, 1, 0), ["images"], [OUTPUT_NAMES["logits"]], opset=e.opset,
                  metadata={"edgeseg.io": json.dumps(contract), "edgeseg.teacher_sha256": digest},
                  transform=spatial_means_to_global_pool)
    simplify(raw, out)
    raw.unlink()
    with torch.no_grad():
        x = example_input(cfg, 2, 3)
        worst = float(np.abs(deploy(x).numpy() - cpu_session(out).run(None, {"images": x.numpy()})[0]).max())
    if worst > 1e-3:
        raise InputError(f"{out}: ONNX Runtime differs from torch by {worst:.3g} on the teacher; please report it")
    with atomic_path(stamp) as tmp:
        tmp.write_text(json.dumps({"teacher_sha256": digest, "parity_max_abs": worst}))
    log.info("teacher ONNX -> %s (%.1f MB, parity %.2g, %.0f s)", out, out.stat().st_size / 2**20, worst,
             time.perf_counter() - t0)
    return out
