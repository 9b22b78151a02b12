"""The export stage's steps as functions: onnx, quantize, engine, accuracy (the CLI calls these)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from edgeseg.export.config import Config, ExportConfig
from edgeseg.runtime.errors import InputError
from edgeseg.runtime.files import atomic_path, write_json_atomic

log = logging.getLogger(__name__)


def export_dir(cfg: Config) -> Path:
    d = cfg.stage_dir("export")
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_onnx(cfg: Config, checkpoint: str | Path | None = None) -> dict:
    """Strip (verified), export ``model.onnx`` (+ ``model.fp16.onnx``), onnxsim, parity."""
    from edgeseg.export.onnx_model import export_onnx
    from edgeseg.export.strip import load_student, training_model, verify_stripped

    checkpoint = Path(checkpoint) if checkpoint else cfg.stage_dir("distill") / "best.pt"
    out = export_dir(cfg)
    student, ckpt = load_student(cfg, checkpoint)
    strip = verify_stripped(student, training_model(cfg, ckpt), tuple(cfg.data.image_size))
    report = {"checkpoint": str(checkpoint), "strip": strip, **export_onnx(cfg, student, out)}
    report["fp16"] = write_fp16(out / "model.onnx", out / "model.fp16.onnx")
    write_json_atomic(out / "onnx.json", report)
    return report


def write_fp16(src: Path, dst: Path) -> str:
    """An FP16 graph (float32 I/O kept) for TensorRT 11's strongly typed FP16 builds."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    for out in model.graph.output:  # keep_io_types can leave an output in float16: cast it back
        if out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            inner = out.name + "_fp16"
            for node in model.graph.node:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            model.graph.node.append(onnx.helper.make_node("Cast", [inner], [out.name], to=onnx.TensorProto.FLOAT,
                                                          name=out.name + "_to_float32"))
            out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.checker.check_model(model)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    return str(dst)


def eval_set(cfg: Config, split: str, limit: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images and masks of ``split`` at their original sizes."""
    from edgeseg.distill.data import load_sample, split_samples

    samples = split_samples(cfg, split)[:limit]
    pairs = [load_sample(s) for s in samples]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def validation_set(cfg: Config, limit: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The selection split (accuracy budget): validation images and masks at original size."""
    return eval_set(cfg, "val", limit)


def run_quantize(cfg: Config, calib: str | Path | None = None, contrast: bool = True, budget: bool = True,
                 val: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> dict:
    from edgeseg.export.int8 import quantize_all, resolve_calibration

    out = export_dir(cfg)
    if not (out / "model.onnx").is_file():
        raise InputError(f"{out / 'model.onnx'}: missing; run `edgeseg export onnx` first")
    choice, calib = ("folder", Path(calib)) if calib else resolve_calibration(cfg)
    if budget and val is None:
        val = validation_set(cfg)
    return quantize_all(cfg, out, calib, contrast=contrast, val=val if budget else None, choice=choice)


def run_engine(cfg: Config | None, precision: str, bundle: Path | None = None, dla_core: int = -1) -> dict:
    """Build a TensorRT engine, or build nothing and return why not (``{"built": False, "reason": ...}``)."""
    from edgeseg.export.engine import availability, build_engine, capabilities, plan_build, profile_shapes
    from edgeseg.runtime.spec import ModelSpec

    can, why = availability()
    if not can:
        return {"built": False, "reason": why}
    import tensorrt as trt

    caps = capabilities(trt.__version__)
    if bundle is not None:
        from edgeseg.runtime.bundle import Bundle

        b = Bundle(bundle)
        files = {r: str(b.file(r)) for r in ("fp32", "int8", "fp16", "calibration-cache") if b.file(r)}
        files["cache"] = files.pop("calibration-cache", None)
        spec, out = b.spec, Path(bundle)
        # a bundle whose saved config predates the option gets the dataclass default
        workspace = b.manifest.get("config", {}).get("export", {}).get("workspace_mib", ExportConfig.workspace_mib)
    else:
        out = export_dir(cfg)
        spec = ModelSpec.from_onnx(out / "model.onnx")
        files = {"fp32": str(out / "model.onnx"), "int8": str(out / "model.int8.onnx"),
                 "fp16": str(out / "model.fp16.onnx"), "cache": str(out / "calibration.cache")}
        mixed = _read_report(out / "accuracy.json").get("deployed_int8_model")
        if mixed:
            files["int8"] = mixed
        workspace = cfg.export.workspace_mib
    files = {k: v for k, v in files.items() if v and Path(v).is_file()}
    plan = plan_build(caps, precision, files, dla_core)
    if dla_core >= 0:  # DLA takes static shapes only: one batch size, partial batches padded at run time
        profile = profile_shapes(spec.input_layout, spec.image_size, spec.max_batch, spec.max_batch, spec.max_batch)
    else:
        profile = profile_shapes(spec.input_layout, spec.image_size, spec.max_batch, spec.opt_batch)
    return {"built": True, **build_engine(plan, caps, profile, spec.to_dict(), out, workspace,
                                          device_build=bundle is not None)}


CHAIN = ("teacher", "student", "fp32", "int8_synthetic", "mixed")
CONTRASTS = {"int8_real": "fp32", "int8_noise": "fp32", "int8_cpu": "fp32", "int8_cpu_mixed": "fp32", "fp16": "fp32"}
# backend name -> key of quantize.json's "files" that records the model
QUANTIZED = (("int8_synthetic", "int8"), ("int8_real", "int8_real"), ("int8_noise", "int8_noise"), ("int8_cpu", "int8_cpu"))


def written_models(out: Path) -> dict[str, Path]:
    """The ONNX models the last ``export onnx`` and ``export quantize`` wrote, by backend name.

    Read from their reports (``onnx.json``, ``quantize.json``), never from what happens to be on
    disk: a model an earlier run left (``model.int8-real.onnx`` after ``--no-contrast``, a mixed
    model after ``--no-budget``) is not scored. A listed model that is missing, or INT8 models
    quantized from another ``model.onnx`` than the one there now, stop the report.
    """
    if not (out / "model.onnx").is_file():
        raise InputError(f"{out / 'model.onnx'}: missing; run `edgeseg export onnx` first")
    models = {"fp32": out / "model.onnx"}
    onnx_report = _read_report(out / "onnx.json")
    if onnx_report.get("fp16"):
        models["fp16"] = Path(onnx_report["fp16"])
    quant = _read_report(out / "quantize.json")
    if quant:
        from edgeseg.runtime.files import sha256_file

        recorded, now = quant.get("fp32_sha256"), sha256_file(out / "model.onnx")
        if recorded is None:
            log.warning("%s predates fp32_sha256: cannot check that its INT8 models come from this model.onnx",
                        out / "quantize.json")
        elif recorded != now:
            raise InputError(f"{out / 'quantize.json'}: its INT8 models were quantized from another model.onnx "
                             f"(sha256 {recorded[:12]}..., now {now[:12]}...); run `edgeseg export quantize` again")
        files = quant.get("files", {})
        models.update({name: Path(files[key]) for name, key in QUANTIZED if key in files})
        for name, budget in (("mixed", "budget"), ("int8_cpu_mixed", "budget_cpu")):
            if quant.get(budget):
                models[name] = Path(quant[budget]["model"])
    missing = [f"{name} ({path})" for name, path in models.items() if not path.is_file()]
    if missing:
        raise InputError(f"models recorded by the last export run are missing: {', '.join(missing)}; "
                         "run `edgeseg export onnx` and `edgeseg export quantize` again (make export)")
    return models


def _split_block(runners: dict, images: list, gts: list) -> tuple[dict, dict, dict]:
    """Every runner's masks and scores on one split: (report block, predictions, scores)."""
    from edgeseg.export.accuracy import predict_masks, score_masks

    preds = {}
    for name, runner in runners.items():
        try:
            preds[name] = predict_masks(runner, images)
        except Exception as e:  # an FP16 graph may not run on ONNX Runtime's CPU provider
            if name != "fp16":
                raise
            log.info("fp16 model not evaluated on this CPU (%s)", str(e).splitlines()[0][:100])
    scores = {n: score_masks(n, p, gts, preds.get("fp32")) for n, p in preds.items()}
    block = {f"{n}_miou": s.miou for n, s in scores.items()}
    block["backends"] = {n: s.to_dict() for n, s in scores.items()}
    prev = None
    for n in CHAIN:
        if n in scores:
            block["backends"][n]["delta_points"] = None if prev is None else (scores[n].miou - scores[prev].miou) * 100
            prev = n
    for n, ref in CONTRASTS.items():
        if n in scores and ref in scores:
            block["backends"][n]["delta_points"] = (scores[n].miou - scores[ref].miou) * 100
    block["images"] = len(images)
    return block, preds, scores


def _deployed(budget: dict, plain: str, mixed: str) -> str:
    """Which model the budget search (on val) chose: the plain one if it met the budget, else the mixed one."""
    if not budget or not budget.get("float_nodes"):
        return plain
    return mixed


def run_accuracy(cfg: Config, checkpoint: str | Path | None = None,
                 sets: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] | None = None) -> dict:
    """The end-to-end budget table on the report splits, ``accuracy.json`` and the worst-images gallery.

    Figures are on ``test`` (``test_shift`` beside it) when the data has them; which INT8 model is
    deployed was decided on ``val`` by the budget search (``quantize.json``), never on these splits.

    1. the models this run wrote and the report splits; 2. a runner per model (teacher and student
    in torch); 3. every runner on every split; 4. the calibration matrix; 5. the budget selection,
    what is deployed and the export's provenance; 6. the gallery and ``accuracy.json``.
    """
    from edgeseg.distill.data import report_splits
    from edgeseg.distill.visualize import save_png
    from edgeseg.export.accuracy import gallery

    t0 = time.perf_counter()
    out = export_dir(cfg)
    models = written_models(out)  # 1: only what this run wrote, checked before any scoring
    splits, note = report_splits(cfg)
    if sets is None:
        sets = {s: eval_set(cfg, s) for s in splits}
    splits = [s for s in splits if s in sets] or list(sets)
    runners = _runners(cfg, out, models, checkpoint)  # 2
    quant = _read_report(out / "quantize.json")
    deployed = _deployed(quant.get("budget", {}), "int8_synthetic", "mixed")
    cpu_model = _deployed(quant.get("budget_cpu", {}), "int8_cpu", "int8_cpu_mixed")
    report, main_preds, main_scores = _score_splits(runners, sets, splits, deployed, cpu_model)  # 3
    report = {"split": splits[0], "selection_split": "val", "note": note, **report}
    report["matrix"] = _calibration_matrix(quant, sets, splits)  # 4
    _site_rows(report, splits, quant.get("method", cfg.export.calibration_method))
    report.update(_deployment(cfg, quant, models, deployed, cpu_model))  # 5
    for key in ("parity_max_abs", "nodes_before_onnxsim", "nodes_after_onnxsim"):
        report[key] = _read_report(out / "onnx.json").get(key)
    images, gts = sets[splits[0]]  # 6
    report["gallery"] = str(save_png(gallery(images, gts, main_preds, main_scores, cfg.export.gallery_images),
                                     out / "worst_images.png"))
    report["seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "accuracy.json", report)
    return report


def _site_rows(report: dict, splits: list[str], method: str) -> None:
    """``site_int8_miou`` per split: the s8s8 model (the configured method) calibrated on the site's few frames
    alone (the matrix's ``target_images`` row), beside the deployed model; nothing when there are none."""
    for i, split in enumerate(splits):
        block = report if i == 0 else report[split]
        row = next((r for r in report["matrix"] if r["split"] == split and r["flavour"] == "s8s8"
                    and r["method"] == method and r["calibration"] == "target_images"), None)
        if row is not None:
            block["site_int8_miou"] = row["miou"]
            block["site_int8_calibration"] = (f"s8s8 {method}, the site's frames alone (matrix row target_images, "
                                              f"{row.get('images', '?')} images)")
        synth = next((r for r in report["matrix"] if r["split"] == split and r["flavour"] == "s8s8"
                      and r["method"] == method and r["calibration"] == "target"), None)
        if synth is not None:  # the synthetic site set (calibration synth --target-images): the site at a full count
            block["site_synthetic_int8_miou"] = synth["miou"]
            block["site_synthetic_int8_images"] = synth.get("images")


def _read_report(path: Path) -> dict:
    """A stage report (``onnx.json``, ``quantize.json``, ``accuracy.json``), or {} before that step has run."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _runners(cfg: Config, out: Path, models: dict[str, Path], checkpoint: str | Path | None) -> dict:
    """A runner per backend: the teacher and the student in torch (the exported model's spec), then every ONNX model."""
    from edgeseg.distill.models import load_teacher
    from edgeseg.export.accuracy import TorchRunner, onnx_runner
    from edgeseg.export.strip import load_student
    from edgeseg.runtime.spec import ModelSpec

    onnx_spec = ModelSpec.from_onnx(out / "model.onnx")
    torch_spec = ModelSpec(image_size=onnx_spec.image_size, mean=onnx_spec.mean, std=onnx_spec.std,
                           pad_value=onnx_spec.pad_value, resize=onnx_spec.resize, threshold=onnx_spec.threshold,
                           max_batch=onnx_spec.max_batch)
    student, _ = load_student(cfg, checkpoint or cfg.stage_dir("distill") / "best.pt")
    runners = {"teacher": TorchRunner(load_teacher(cfg), torch_spec),
               "student": TorchRunner(student, torch_spec)}
    for name, path in models.items():
        runners[name] = onnx_runner(path)
    return runners


def _score_splits(runners: dict, sets: dict, splits: list[str], deployed: str, cpu_model: str) -> tuple[dict, dict, dict]:
    """The first split's block, the others under their names; and the first split's predictions and scores."""
    blocks, main_preds, main_scores = {}, None, None
    for split in splits:
        images, gts = sets[split]
        block, preds, scores = _split_block(runners, images, gts)
        fp32 = scores["fp32"].miou
        if deployed in scores:  # the headline: the model the bundle ships, chosen on val
            block["deployed_int8_miou"] = scores[deployed].miou
            block["deployed_int8_loss_points"] = (fp32 - scores[deployed].miou) * 100
        if cpu_model in scores:
            block["cpu_model_miou"] = scores[cpu_model].miou
            block["cpu_model_loss_points"] = (fp32 - scores[cpu_model].miou) * 100
        blocks[split] = block
        if main_preds is None:
            main_preds, main_scores = preds, scores
    report = dict(blocks[splits[0]])
    for split in splits[1:]:
        report[split] = blocks[split]
    return report, main_preds, main_scores


def _calibration_matrix(quant: dict, sets: dict, splits: list[str]) -> list[dict]:
    """mIoU of each model of quantize.json's matrix (flavour x method x calibration set) on every report split."""
    from edgeseg.export.accuracy import miou_of, onnx_runner, predict_masks

    matrix = []
    for row in quant.get("matrix", []):
        runner = onnx_runner(Path(row["model"]))
        for split in splits:
            images, gts = sets[split]
            matrix.append({"flavour": row["flavour"], "method": row["method"], "calibration": row["calibration"],
                           "split": split, "miou": miou_of(predict_masks(runner, images), gts),
                           **{k: row[k] for k in ("images", "note") if k in row}})
    return matrix


def _deployment(cfg: Config, quant: dict, models: dict[str, Path], deployed: str, cpu_model: str) -> dict:
    """The budget search's selection (on val), the models deployed, and the calibration set they used."""
    budget = quant.get("budget", {})
    out = {"mixed_float_nodes": [f["node"] for f in budget.get("float_nodes", [])],
           "cpu_mixed_float_nodes": [f["node"] for f in quant.get("budget_cpu", {}).get("float_nodes", [])],
           "budget_points": cfg.export.max_miou_drop,
           "budget_selection": {k: {f: v.get(f) for f in ("split", "fp32_miou", "int8_miou", "mixed_miou", "met")}
                                for k, v in (("s8s8", budget), ("u8s8", quant.get("budget_cpu", {}))) if v}}
    if deployed in models:
        out["deployed_int8"] = deployed
        out["deployed_int8_model"] = str(models[deployed])
        out["deployed_int8_chosen_on"] = "val"  # by the budget search (quantize.json), never on the report splits
    if cpu_model in models:
        out["cpu_model"] = cpu_model
        out["cpu_model_file"] = str(models[cpu_model])
    out["calibration"] = quant.get("calibration")
    return out
