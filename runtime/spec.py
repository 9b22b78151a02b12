"""The model's I/O contract as the runtime sees it (read from a bundle manifest or ONNX metadata)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from edgeseg.runtime.errors import InputError



def engine_sidecar(engine: str | Path) -> Path:
    """The JSON beside a serialized engine (``model.int8.engine`` -> ``model.int8.engine.json``).

    It holds what the engine is and what it was built for (``spec``, profile, GPU, ONNX hash):
    ``edgeseg export engine`` writes it and the runtime reads it, so this one function names it.
    """
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


@dataclass(frozen=True)
class ModelSpec:
    """How to feed the model and read its output."""

    image_size: tuple[int, int]  # (height, width) of the model input
    input_layout: Literal["NCHW-float32-normalised", "NHWC-uint8"] = "NCHW-float32-normalised"
    input_name: str = "images"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # RGB normalisation (unfused input)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pad_value: tuple[int, int, int] = (124, 116, 104)  # letterbox padding colour (uint8 RGB)
    resize: Literal["letterbox", "stretch"] = "letterbox"
    output_name: str = "mask_logits"
    output: Literal["logits", "probabilities", "mask"] = "logits"
    threshold: float = 0.5  # probability above which a pixel is a person
    max_batch: int = 8  # largest batch the model (engine profile) takes
    opt_batch: int = 4

    @property
    def fused(self) -> bool:
        """True when normalisation happens inside the graph (uint8 NHWC input)."""
        return self.input_layout == "NHWC-uint8"

    def input_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.image_size
        return (batch, h, w, 3) if self.fused else (batch, 3, h, w)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        if "image_size" not in kwargs:
            raise InputError("model spec has no image_size; re-export the model with `edgeseg export onnx`")
        return cls(**kwargs)

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ModelSpec":
        """Read the ``edgeseg.io`` metadata that ``edgeseg export onnx`` stores in the model."""
        from edgeseg.runtime.sessions import CPU, open_session, session_options

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: model file does not exist")
        # ORT reads the metadata; the runtime needs no onnx package
        session = open_session(path, session_options(optimize=False), CPU, "not a valid ONNX model", limit=120)
        return cls.from_session(session, path)

    @classmethod
    def from_session(cls, session, path: str | Path) -> "ModelSpec":
        """The ``edgeseg.io`` metadata of an open ONNX Runtime session (no second session needed)."""
        props = session.get_modelmeta().custom_metadata_map
        if "edgeseg.io" not in props:
            raise InputError(f"{path}: has no edgeseg.io metadata; export it with `edgeseg export onnx` "
                             "or open a deploy bundle instead")
        return cls.from_dict(json.loads(props["edgeseg.io"]))
