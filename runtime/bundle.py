"""Opening a deploy bundle: its manifest, hash checks, and which file each backend runs."""
from __future__ import annotations

import json
from pathlib import Path

from edgeseg.runtime.errors import InputError, IntegrityError
from edgeseg.runtime.files import recover_dir, sha256_file
from edgeseg.runtime.spec import ModelSpec, engine_sidecar

MANIFEST = "manifest.json"
FORMAT = "edgeseg-bundle/1"


class Bundle:
    """A deploy bundle folder, checked on open: every listed file present with its SHA-256.

    ``files`` maps file name -> {"sha256", "role"}; roles: ``fp32`` (FP32 ONNX), ``int8``
    (symmetric Q/DQ ONNX, TensorRT), ``int8-cpu`` (u8s8 Q/DQ ONNX, ONNX Runtime CPU),
    ``fp16``, ``engine`` (+ its ``.json`` sidecar), ``calibration-cache``, and others.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = recover_dir(path)  # finishes or undoes a replacement that a crash interrupted
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise InputError(f"{self.path}: not a deploy bundle (no {MANIFEST}); create one with `make deploy`")
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise IntegrityError(f"{manifest}: not valid JSON ({e}); rebuild the bundle with `make deploy`") from None
        if self.manifest.get("format") != FORMAT:
            raise InputError(f"{manifest}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.spec = ModelSpec.from_dict(self.manifest["spec"])
        self.precision = self.manifest.get("precision", "fp32")
        if verify:
            self.verify()

    def verify(self) -> None:
        for name, info in self.manifest.get("files", {}).items():
            f = self.path / name
            if not f.is_file():
                raise IntegrityError(f"{f}: listed in the bundle manifest but missing; copy the whole bundle again")
            if sha256_file(f) != info["sha256"]:
                raise IntegrityError(f"{f}: SHA-256 does not match the bundle manifest (file changed or corrupt); "
                                     "copy the bundle again or rebuild it with `make deploy`")

    def file(self, role: str) -> Path | None:
        for name, info in self.manifest.get("files", {}).items():
            if info.get("role") == role:
                return self.path / name
        return None

    def model_for(self, backend: str) -> Path:
        """The file a backend runs: engine for tensorrt; the Q/DQ or FP32 ONNX for ONNX Runtime."""
        int8 = self.precision == "int8"
        choice = {
            "tensorrt": ["engine"],
            "onnxruntime-tensorrt": ["int8", "fp32"] if int8 else ["fp32"],
            "onnxruntime-cuda": ["fp16", "fp32"] if self.precision == "fp16" else ["fp32"],
            "onnxruntime-cpu": ["int8-cpu", "fp32"] if int8 else ["fp32"],
        }.get(backend)
        if choice is None:
            raise InputError(f"unknown backend {backend!r}")
        if backend == "tensorrt":
            engines = self.engines()
            if engines:
                return engines[0]
        for role in choice:
            f = self.file(role)
            if f is not None:
                return f
        raise InputError(f"{self.path}: has no {' or '.join(choice)} model for backend {backend}"
                         + ("; build the engine on this device with `python build_engine.py`" if backend == "tensorrt" else ""))

    def engines(self) -> list[Path]:
        """Engines to try, best first: built on this device for the bundle's precision, then the
        other device builds, then the shipped ones of the bundle's precision, then the rest.

        A shipped engine may have been built for another GPU or TensorRT: the runner refuses it
        and ``backend="auto"`` moves on to the next backend.
        """
        shipped = [self.path / n for n, i in self.manifest.get("files", {}).items() if i.get("role") == "engine"]
        built = self.device_engines()
        mine = lambda e: f".{self.precision}." in e.name  # noqa: E731
        return ([e for e in built if mine(e)] + [e for e in built if not mine(e)]
                + [e for e in shipped if mine(e)] + [e for e in shipped if not mine(e)])

    def device_engine(self) -> Path | None:
        """The engine ``build_engine.py`` built on this device for the bundle's precision, if any."""
        built = [e for e in self.device_engines() if f".{self.precision}." in e.name]
        return built[0] if built else None

    def device_engines(self) -> list[Path]:
        """Engines built on this device by ``build_engine.py`` (not in the manifest).

        Each is trusted only if its sidecar's ``onnx_sha256`` is the hash of one of the bundle's
        ONNX files: the engine then provably came from this bundle's model.
        """
        import json

        onnx_hashes = {i["sha256"] for n, i in self.manifest.get("files", {}).items() if n.endswith(".onnx")}
        out = []
        for engine in sorted(self.path.glob("*.engine")):
            if engine.name in self.manifest.get("files", {}):
                continue
            sidecar = engine_sidecar(engine)
            if not sidecar.is_file():
                continue
            meta = json.loads(sidecar.read_text())
            if meta.get("onnx_sha256") not in onnx_hashes:
                raise IntegrityError(f"{engine}: was not built from this bundle's models (ONNX hash mismatch); "
                                     "delete it and run `python build_engine.py` in the bundle")
            out.append(engine)
        return out
