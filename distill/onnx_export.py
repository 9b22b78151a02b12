"""One ``torch.onnx.export`` call for every model the project exports (dynamic batch, checked, atomic)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

import torch

from edgeseg.runtime.files import atomic_path

log = logging.getLogger(__name__)


def export_module(module: torch.nn.Module, path: str | Path, example: torch.Tensor, input_names: Sequence[str],
                  output_names: Sequence[str], opset: int = 17, dynamic_batch: bool = True,
                  metadata: dict[str, str] | None = None, transform=None) -> Path:
    """Export ``module`` (eval mode) to ``path`` with a dynamic batch axis, then ``onnx.checker``.

    Uses the TorchScript exporter (``dynamo=False``): it is fast, keeps module scopes in node
    names (``/encoder/...``) and emits the opset asked for. ``transform`` may edit the loaded
    ONNX model before it is checked and saved. The file appears atomically.
    """
    import onnx

    path = Path(path)
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice, for this call only
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(module.eval(), (example,), str(tmp), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=axes, opset_version=opset, dynamo=False)
        model = onnx.load(str(tmp))
        if transform is not None:
            transform(model)
        for k, v in (metadata or {}).items():
            model.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
    log.info("exported %s (%d nodes, %.1f MB) -> %s", type(module).__name__, len(model.graph.node),
             path.stat().st_size / 2**20, path)
    return path
