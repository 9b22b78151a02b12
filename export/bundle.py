"""``make deploy``: the bundle an edge device needs, gated on the accuracy budget.

A folder (written beside, then renamed into place) and a ``.tar.gz`` of it::

    manifest.json              spec, precision, sha256 of every file, versions, accuracy report
    model.onnx                 FP32 (role fp32)
    model.int8.onnx            symmetric Q/DQ, the budget-compliant one (role int8; TensorRT)
    model.int8-cpu.onnx        u8s8 Q/DQ (role int8-cpu; ONNX Runtime CPU)
    model.fp16.onnx            FP16 graph when exported (role fp16; TensorRT 11)
    calibration.cache          TensorRT 10 implicit-INT8 cache (role calibration-cache)
    calibration_manifest.json  how the calibration set was made
    teacher.onnx               the teacher, with --with-teacher (role teacher; `runtime check`'s accuracy proxy)
    model.int8.engine(+.json)  when an engine was built here
    build_engine.py            builds the engine on the target device
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tarfile
import time
from importlib import metadata
from pathlib import Path

from edgeseg.distill.config import config_to_dict

from edgeseg.export.config import Config
from edgeseg.runtime.bundle import FORMAT, MANIFEST
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import replace_dir, sha256_file, staging_dir
from edgeseg.runtime.spec import ModelSpec, engine_sidecar

log = logging.getLogger(__name__)

BUILD_SCRIPT = '''#!/usr/bin/env python3
"""Build this bundle's TensorRT engine on the device it will run on (engines are specific to a GPU
and a TensorRT version). Needs edgeseg (runtime install), TensorRT and cuda-python.

    python build_engine.py [--precision int8|fp16|fp32] [--dla-core N]
"""
import sys
from pathlib import Path

from edgeseg.export.cli import main

sys.exit(main(["bundle-engine", "--bundle", str(Path(__file__).resolve().parent), *sys.argv[1:]]))
'''

_PACKAGES = ("edgeseg", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "segmentation-models-pytorch",
             "timm", "tensorrt", "diffusers")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_budget(accuracy: dict, precision: str, budget_points: float) -> tuple[bool, str]:
    """Do the deployed models keep FP32 mIoU within the budget? (ok, the figures in words).

    For INT8 both models are gated: the s8s8 one TensorRT builds and the u8s8 one the CPU
    runtime serves (``cpu_model_miou``), each by its own measured mIoU on the report split.
    """
    fp32 = accuracy["fp32_miou"]
    split = accuracy.get("split", "val")
    if precision == "fp32":
        return True, f"FP32 mIoU {fp32:.4f} ({split})"
    checks = [("int8", "deployed_int8_miou"), ("int8 CPU (u8s8)", "cpu_model_miou")] if precision == "int8" \
        else [("fp16", "fp16_miou")]
    ok, words = True, []
    for label, key in checks:
        value = accuracy.get(key)
        if value is None:
            return False, f"no {label} accuracy was measured (run `edgeseg export accuracy`)"
        drop = (fp32 - value) * 100
        words.append(f"{label} mIoU {value:.4f} vs FP32 {fp32:.4f}: {drop:.2f} points lost")
        ok &= drop <= budget_points + 1e-9
    return ok, "; ".join(words) + f", budget {budget_points:.2f} ({split})"


REFERENCE_SPLIT, REFERENCE_IMAGES = "val", 64  # `runtime check`'s reference: held-out source images


def site_check_reference(cfg: Config, bundle_dir: Path) -> dict:
    """The label-free proxies of `edgeseg runtime check` on held-out source images (what "fine" looks like)."""
    from edgeseg.export.stage import eval_set
    from edgeseg.runtime.check import SiteCheck

    images, _ = eval_set(cfg, REFERENCE_SPLIT, REFERENCE_IMAGES)
    result = SiteCheck(bundle_dir).measure(images)
    result.pop("_per_frame")
    for fit in result["range_fit"].values():
        fit["worst"] = fit["worst"][:3]
    return {"split": REFERENCE_SPLIT, **result}


def _single_file_onnx(path: Path) -> Path:
    """``path``, refused in one line if its weights live in external data files (the bundle carries one file)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise InputError(f"{path}: the teacher keeps its weights in external data files, which a bundle does not carry; "
                         "save it as one file (onnx.save(onnx.load(path), out, save_as_external_data=False)) or "
                         "leave out --with-teacher")
    return path


def write_bundle(cfg: Config, export_dir: Path, out_dir: Path, calib_manifest: Path | None,
                 allow_over_budget: bool = False, with_teacher: bool = False) -> dict:
    """Assemble, check and write the bundle (+ .tar.gz); returns its manifest."""
    accuracy_path = export_dir / "accuracy.json"
    if not accuracy_path.is_file():
        raise InputError(f"{accuracy_path}: missing; run `make export` (edgeseg export all) before `make deploy`")
    accuracy = json.loads(accuracy_path.read_text())
    precision = cfg.export.precision
    ok, words = check_budget(accuracy, precision, cfg.export.max_miou_drop)
    quantized = json.loads((export_dir / "quantize.json").read_text()) if (export_dir / "quantize.json").is_file() else {}
    calibration = {"choice": quantized.get("calibration_choice", "synthetic"), "dir": quantized.get("calibration_dir"),
                   "images": quantized.get("calibration_images")}
    if precision == "int8":
        words += f"; INT8 calibrated on {calibration['choice']} ({calibration['images']} images from {calibration['dir']})"
    if not ok and not (allow_over_budget or cfg.deploy.allow_over_budget):
        raise InputError(f"refusing to deploy: {words}. Raise export.max_miou_drop, choose another export.precision, "
                         "or pass --allow-over-budget")
    int8_source = Path(accuracy.get("deployed_int8_model") or export_dir / "model.int8.onnx")
    cpu_source = Path(accuracy.get("cpu_model_file") or export_dir / "model.int8-cpu.onnx")
    files = {  # bundle name -> (source, role); the budget's mixed models ship under the plain names
        "model.onnx": (export_dir / "model.onnx", "fp32"),
        "model.int8.onnx": (int8_source, "int8"),
        "model.int8-cpu.onnx": (cpu_source, "int8-cpu"),
        "model.fp16.onnx": (export_dir / "model.fp16.onnx", "fp16"),
        "calibration.cache": (export_dir / "calibration.cache", "calibration-cache"),
        "accuracy.json": (accuracy_path, "report"),
    }
    if calib_manifest is not None and calib_manifest.is_file():
        files["calibration_manifest.json"] = (calib_manifest, "calibration-manifest")
    teacher_io = None
    if with_teacher and cfg.teacher.is_onnx:  # a zoo teacher ships as it is, its I/O recorded for `runtime check`
        from edgeseg.distill.teachers import teacher_io as resolve_teacher_io

        files["teacher.onnx"] = (_single_file_onnx(Path(cfg.teacher.onnx.path)), "teacher")
        teacher_io = resolve_teacher_io(cfg).to_dict()
    elif with_teacher:
        from edgeseg.export.onnx_model import export_teacher_onnx

        files["teacher.onnx"] = (export_teacher_onnx(cfg, export_dir / "teacher.onnx"), "teacher")
    for engine in sorted(export_dir.glob("model.*.engine")):
        files[engine.name] = (engine, "engine")
        files[engine_sidecar(engine).name] = (engine_sidecar(engine), "engine-metadata")
    missing = [str(src) for name, (src, role) in files.items() if not src.is_file() and role != "fp16"]
    if missing:
        raise InputError(f"cannot write the bundle: {', '.join(missing)} missing; run `make export` first")

    spec = ModelSpec.from_onnx(export_dir / "model.onnx")
    tmp = staging_dir(out_dir)
    listed = {}
    for name, (src, role) in files.items():
        if src.is_file():
            shutil.copyfile(src, tmp / name)
            listed[name] = {"sha256": sha256_file(tmp / name), "role": role, "bytes": (tmp / name).stat().st_size}
    (tmp / "build_engine.py").write_text(BUILD_SCRIPT)
    listed["build_engine.py"] = {"sha256": sha256_file(tmp / "build_engine.py"), "role": "script"}
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "spec": spec.to_dict(),
        "precision": precision,
        "normalisation": "fused in the graph" if spec.fused else {"mean": list(spec.mean), "std": list(spec.std)},
        "budget": {"max_miou_drop_points": cfg.export.max_miou_drop, "met": ok, "figures": words},
        "calibration": calibration,
        "float_nodes": accuracy.get("mixed_float_nodes", []) if accuracy.get("deployed_int8") == "mixed" else [],
        "cpu_float_nodes": accuracy.get("cpu_mixed_float_nodes", []) if accuracy.get("cpu_model") == "int8_cpu_mixed" else [],
        "files": listed,
        **({"teacher_io": teacher_io} if teacher_io else {}),
        "versions": package_versions(),
        "accuracy": {k: v for k, v in accuracy.items() if not isinstance(v, (dict, list))},
        "config": config_to_dict(cfg),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if precision == "int8":  # measured on the staged bundle itself: exactly the files that ship
        manifest["site_check_reference"] = site_check_reference(cfg, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    replace_dir(tmp, out_dir)
    archive = out_dir.with_name(out_dir.name + ".tar.gz")
    tmp_archive = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp_archive, "w:gz") as tar:
        tar.add(out_dir, arcname=out_dir.name)
    os.replace(tmp_archive, archive)
    log.info("bundle (%s, %s) -> %s and %s", precision, words, out_dir, archive)
    return manifest
