"""Export: strip, ONNX + parity, Q/DQ INT8, calibration cache, budget search, TensorRT planning, bundle."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeseg.distill.config import load_config

from edgeseg.export.config import Config
from edgeseg.export.engine import (BuildPlan, capabilities, engine_metadata, engine_paths, plan_build, profile_shapes)
from edgeseg.export.int8 import budget_search
from edgeseg.export.trt_cache import decode_scale, encode_scale, read_cache, version_code, write_cache
from edgeseg.runtime.errors import BackendUnavailableError, InputError, IntegrityError
from tests.conftest import run_cli, write_config


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """A tiny distillation checkpoint, a calibration folder, and the whole export run on them."""
    from PIL import Image

    from edgeseg.distill.job import job_for
    from edgeseg.distill.trainer import Trainer
    from edgeseg.export.stage import run_accuracy, run_onnx, run_quantize

    _, base = tiny_run
    run_dir = tmp_path_factory.mktemp("export_run")
    path = write_config(run_dir, data={"root": str(base.data_root)},
                        teacher={"checkpoint": str(base.teacher_checkpoint)},
                        feature_teacher={"onnx": str(base.feature_teacher_onnx)},
                        train={"epochs": 1, "batch_size": 4, "lr": 1e-3},
                        export={"max_batch": 4, "opt_batch": 2})  # the default budget: 1 point on val
    cfg = load_config(path, Config)
    trainer = Trainer(cfg, job_for(cfg, "student"))
    trainer.run()
    trained = trainer.model.eval()  # the very module that trained (student + projection head)
    import shutil as _sh

    _sh.copyfile(run_dir / "distill" / "last.pt", run_dir / "distill" / "best.pt")
    calib = run_dir / "calibration" / "synthetic" / "images"
    calib.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):  # stand-in synthetic images (the real ones come from calibration.synth): smooth colour
        # fields, neither the training images ("real") nor uniform noise ("noise") nor the dark target set
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((64, 64), Image.BICUBIC).save(calib / f"{i:05d}.png")
    target = run_dir / "calibration" / "target" / "images"  # a stand-in target-domain set: dark images
    target.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)).save(target / f"{i:05d}.png")
    onnx_report = run_onnx(cfg)
    quant = run_quantize(cfg)
    acc = run_accuracy(cfg)
    return cfg, path, run_dir, onnx_report, quant, acc, trained


# --- strip and ONNX --------------------------------------------------------------------------------

def test_strip_is_bit_identical_and_drops_the_projection(exported):
    cfg, _, run_dir, onnx_report, _, _, _ = exported
    strip = onnx_report["strip"]
    assert strip["bit_identical"] and strip["removed_params"] > 0
    ckpt = torch.load(run_dir / "distill" / "best.pt", weights_only=True)
    assert strip["removed_params"] == sum(v.numel() for k, v in ckpt["projection"].items() if "running" not in k
                                          and "num_batches" not in k)


def test_stripped_student_equals_the_module_that_trained(exported):
    # The reference is the trainer's own in-memory DistillationModel, not a copy rebuilt from the
    # same checkpoint: its forward runs the projection head path that stripping removes.
    from edgeseg.export.strip import load_student, verify_stripped

    cfg, _, run_dir, _, _, _, trained = exported
    stripped, _ = load_student(cfg, run_dir / "distill" / "best.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, projected = trained(x)
    assert projected is not None and projected.shape[1] == trained.projection.net[-1].out_channels
    report = verify_stripped(stripped, trained, (64, 64))
    assert report["bit_identical"] and report["removed_params"] == sum(p.numel() for p in trained.projection.parameters())

    # and the check fails when the stripped model is not the trained one
    with torch.no_grad():
        next(stripped.decoder.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(AssertionError, match="stripped student differs from the training model"):
        verify_stripped(stripped, trained, (64, 64))


def test_onnx_parity_and_contract(exported):
    cfg, _, run_dir, report, _, _, _ = exported
    assert report["parity_max_abs"] <= 1e-4 and report["parity_batches"] == [1, 4]
    assert report["nodes_after_onnxsim"] <= report["nodes_before_onnxsim"]
    m = onnx.load(run_dir / "export" / "model.onnx")
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["images"] and [o.name for o in m.graph.output] == ["mask_logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    io = json.loads({p.key: p.value for p in m.metadata_props}["edgeseg.io"])
    assert io["image_size"] == [64, 64] and io["max_batch"] == 4


def test_polygraphy_agrees_with_the_saved_torch_outputs(exported):
    _, _, run_dir, _, _, _, _ = exported
    d = run_dir / "export"
    from pathlib import Path

    r = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "run", str(d / "model.onnx"), "--onnxrt",
                        "--load-inputs", str(d / "torch_inputs.json"), "--load-outputs", str(d / "torch_outputs.json"),
                        "--atol", "1e-4", "--rtol", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "PASSED" in r.stdout + r.stderr


@pytest.mark.parametrize("fuse, output", [(True, "logits"), (False, "mask"), (True, "probabilities")])
def test_fused_preprocessing_and_output_kinds(tiny_run, tmp_path, fuse, output):
    from edgeseg.export.onnx_model import export_onnx

    _, base = tiny_run
    path = write_config(tmp_path, export={"fuse_preprocessing": fuse, "output": output, "max_batch": 2, "opt_batch": 1})
    cfg = load_config(path, Config)
    from edgeseg.distill.models import build_model

    torch.manual_seed(0)
    report = export_onnx(cfg, build_model(cfg.student).eval(), tmp_path)
    m = onnx.load(tmp_path / "model.onnx")
    elem = m.graph.input[0].type.tensor_type.elem_type
    assert elem == (onnx.TensorProto.UINT8 if fuse else onnx.TensorProto.FLOAT)
    assert m.graph.output[0].name == {"logits": "mask_logits", "mask": "mask", "probabilities": "mask_probs"}[output]
    if output != "mask":
        assert report["parity_max_abs"] <= 1e-4


def test_checkpoint_without_a_student_is_refused(tiny_run, tmp_path):
    from edgeseg.export.strip import load_student

    _, cfg = tiny_run
    with pytest.raises(InputError, match=r"teacher/best.pt: has no 'student' weights \(keys: model\); pass a distillation checkpoint"):
        load_student(cfg, cfg.teacher_checkpoint)


# --- INT8 ------------------------------------------------------------------------------------------

def _zero_points(path):
    m = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return [(n.op_type, inits[n.input[2]]) for n in m.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]


def test_s8s8_is_symmetric_int8_and_u8s8_has_uint8_activations(exported):
    _, _, run_dir, _, quant, _, _ = exported
    d = run_dir / "export"
    s8 = _zero_points(d / "model.int8.onnx")
    assert s8 and all(not zp.any() for _, zp in s8)  # symmetric: every zero-point is 0
    assert {zp.dtype for _, zp in s8} <= {np.dtype(np.int8), np.dtype(np.int32)}  # int8, int32 biases
    u8 = _zero_points(d / "model.int8-cpu.onnx")
    assert any(zp.dtype == np.uint8 for _, zp in u8)
    per_channel = [n for n in onnx.load(d / "model.int8.onnx").graph.node
                   if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert per_channel, "weights should be quantized per channel"
    for name in ("int8_real", "int8_noise"):
        assert (d / f"model.{name.replace('_', '-')}.onnx").is_file()


def test_relu_student_runs_as_fused_int8_convolutions_on_the_cpu(exported, tmp_path):
    """The tiny student uses ``activation: relu``: ORT folds every ReLU into a QLinearConv, so the
    optimised u8s8 graph keeps no float activation and no table Sigmoid outside the SE gates."""
    import onnxruntime as ort

    _, _, run_dir, _, _, _, _ = exported
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(run_dir / "export" / "model.int8-cpu.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    se_gates = ops.count("QLinearGlobalAveragePool")  # one squeeze-excitation per MBConv block, pooled in INT8
    assert ops.count("QLinearConv") > 10 and se_gates > 0 and "ReduceMean" not in ops
    assert "Relu" not in ops and "Sigmoid" not in ops and "QuickGelu" not in ops
    assert ops.count("QLinearSigmoid") == se_gates  # only the SE gates; SiLU would add one per convolution


def test_calibration_cache_matches_the_qdq_scales(exported):
    from edgeseg.calibration.quantize import activation_scales

    _, _, run_dir, _, _, _, _ = exported
    d = run_dir / "export"
    header, scales = read_cache(d / "calibration.cache")
    assert header == "TRT-100300-EntropyCalibration2"
    qdq = activation_scales(d / "model.int8.onnx")
    assert scales.keys() == qdq.keys() and "images" in scales
    for k, v in qdq.items():
        assert scales[k] == pytest.approx(v, rel=1e-7)


def test_cache_format_by_hand(tmp_path):
    assert version_code("8.6.1") == 8601 and version_code("10.3.0") == 100300
    assert encode_scale(1 / 127) == "3c010204" and decode_scale("3c010204") == pytest.approx(1 / 127)
    write_cache({"a/b": 0.5}, tmp_path / "c.cache", "10.1.0")
    assert (tmp_path / "c.cache").read_text() == "TRT-100100-EntropyCalibration2\na/b: 3f000000\n"


def test_quantize_refuses_bad_requests(tmp_path):
    from edgeseg.calibration.quantize import quantize_qdq

    with pytest.raises(InputError, match=r"calibration method must be one of minmax, entropy, percentile, got 'kl'"):
        quantize_qdq(tmp_path / "m.onnx", tmp_path / "q.onnx", [np.zeros((1, 3, 8, 8), np.float32)], method="kl")
    with pytest.raises(InputError, match=r"needs at least one calibration batch"):
        quantize_qdq(tmp_path / "m.onnx", tmp_path / "q.onnx", [])


def test_budget_search_finds_the_fewest_float_nodes():
    ranked = [f"n{i}" for i in range(20)]
    calls = []

    def evaluate(nodes):  # mIoU recovers as the 5 worst nodes go back to float
        calls.append(len(nodes))
        return 0.90 - 0.004 * max(0, 5 - len(nodes))

    nodes, miou, trials = budget_search(evaluate, ranked, fp32_miou=0.905, budget_points=1.0, max_nodes=16)
    assert nodes == ranked[:4] and miou == pytest.approx(0.896)  # 0.905 - 0.896 <= 0.01 with 4; 3 gives 0.892
    assert calls[:3] == [1, 2, 4] and len(trials) <= 6
    nodes, miou, _ = budget_search(lambda n: 0.5 + 0.001 * len(n), ranked, 0.9, 1.0, max_nodes=8)
    assert len(nodes) == 8 and miou == pytest.approx(0.508)  # unreachable: the best seen


# --- accuracy report -------------------------------------------------------------------------------

def test_accuracy_report_has_the_end_to_end_budget(exported):
    from edgeseg.export.accuracy import miou_of, onnx_runner, predict_masks
    from edgeseg.export.stage import eval_set

    cfg, _, run_dir, _, _, acc, _ = exported
    d = run_dir / "export"
    images, gts = eval_set(cfg, "test")
    # each figure is the mIoU of the file it names, scored again here on test
    for name, file in (("fp32", "model.onnx"), ("int8_synthetic", "model.int8.onnx"), ("int8_real", "model.int8-real.onnx"),
                       ("int8_noise", "model.int8-noise.onnx"), ("int8_cpu", "model.int8-cpu.onnx")):
        assert acc[f"{name}_miou"] == pytest.approx(miou_of(predict_masks(onnx_runner(d / file), images), gts)), name
    # the ONNX model and the torch student are the same function: the same masks, pixel for pixel (nearly)
    assert acc["backends"]["student"]["agreement_fp32"] >= 0.999
    assert acc["fp32_miou"] == pytest.approx(acc["student_miou"], abs=1e-3)
    # the chain teacher -> student -> fp32 -> int8, each step's delta against the one before; contrasts vs fp32
    b = acc["backends"]
    assert b["student"]["delta_points"] == pytest.approx((acc["student_miou"] - acc["teacher_miou"]) * 100)
    assert b["int8_synthetic"]["delta_points"] == pytest.approx((acc["int8_synthetic_miou"] - acc["fp32_miou"]) * 100)
    assert b["int8_noise"]["delta_points"] == pytest.approx((acc["int8_noise_miou"] - acc["fp32_miou"]) * 100)
    assert (run_dir / "export" / "worst_images.png").is_file()


def test_matrix_rows_differ_by_calibration_source(exported):
    """Each matrix row is its own model calibrated on its own source: the sources' activation ranges
    differ, so do every two models' scales, and a row's mIoU is that model's."""
    from edgeseg.calibration.quantize import activation_scales
    from edgeseg.export.accuracy import miou_of, onnx_runner, predict_masks
    from edgeseg.export.stage import eval_set

    cfg, _, _, _, quant, acc, _ = exported
    models = {(r["flavour"], r["method"], r["calibration"]): r["model"] for r in quant["matrix"]}
    assert len(set(models.values())) == len(models) == 2 * 2 * 5
    sources = ("synthetic", "real", "noise", "target", "target_images")
    for flavour in ("s8s8", "u8s8"):
        for method in ("minmax", "percentile"):
            scales = {c: activation_scales(models[(flavour, method, c)]) for c in sources}
            for i, a in enumerate(sources):
                for other in sources[i + 1:]:
                    assert scales[a] != scales[other], (flavour, method, a, other)
    images, gts = eval_set(cfg, "test_shift")
    for c in sources:
        row = next(r for r in acc["matrix"] if (r["flavour"], r["method"], r["calibration"], r["split"]) ==
                   ("s8s8", "minmax", c, "test_shift"))
        assert row["miou"] == miou_of(predict_masks(onnx_runner(models[("s8s8", "minmax", c)]), images), gts), c


# --- TensorRT planning -----------------------------------------------------------------------------

FILES = {"fp32": "m.onnx", "int8": "m.int8.onnx", "fp16": "m.fp16.onnx", "cache": "c.cache"}


@pytest.mark.parametrize("version, precision, onnx_file, flags, typed", [
    ("10.3.0", "int8", "m.int8.onnx", ("INT8", "FP16"), False),
    ("10.3.0", "fp16", "m.onnx", ("FP16",), False),
    ("10.3.0", "fp32", "m.onnx", (), False),
    ("11.0.0", "int8", "m.int8.onnx", (), True),
    ("11.0.0", "fp16", "m.fp16.onnx", (), True),
    ("11.0.0", "fp32", "m.onnx", (), True),
])
def test_plan_follows_the_installed_tensorrt(version, precision, onnx_file, flags, typed):
    plan = plan_build(capabilities(version), precision, FILES)
    assert (plan.onnx, plan.flags, plan.strongly_typed) == (onnx_file, flags, typed)


def test_dla_int8_uses_the_cache_on_trt10_and_is_refused_on_trt11():
    plan = plan_build(capabilities("10.3.0"), "int8", FILES, dla_core=0)
    assert plan.calibration_cache == "c.cache" and plan.onnx == "m.onnx" and "INT8" in plan.flags
    with pytest.raises(InputError, match=r"DLA INT8 needs implicit INT8 .* TensorRT 11.0.0 removed"):
        plan_build(capabilities("11.0.0"), "int8", FILES, dla_core=0)
    with pytest.raises(InputError, match=r"needs the Q/DQ INT8 ONNX"):
        plan_build(capabilities("10.3.0"), "int8", {"fp32": "m.onnx"})
    caps = capabilities("10.3.0")
    assert caps.precision_flags and caps.implicit_int8 and not capabilities("11.1.0").precision_flags
    for old in ("7.2.1", "8.6.1", "9.3.0"):  # no EXPLICIT_BATCH-free networks, no name-based I/O
        with pytest.raises(BackendUnavailableError, match=r"too old; edgeseg needs TensorRT 10 or newer"):
            capabilities(old)


def test_profile_shapes_and_paths(tmp_path):
    assert profile_shapes("NCHW-float32-normalised", (128, 96), 8, 4) == {
        "min": (1, 3, 128, 96), "opt": (4, 3, 128, 96), "max": (8, 3, 128, 96)}
    assert profile_shapes("NHWC-uint8", (128, 96), 8, 4)["max"] == (8, 128, 96, 3)
    with pytest.raises(InputError, match=r"1 <= min <= opt <= max"):
        profile_shapes("NHWC-uint8", (8, 8), 2, 4)
    p = engine_paths(tmp_path, "int8", dla_core=1)
    assert p["engine"].name == "model.int8.dla1.engine" and p["timing_cache"].name == "timing.cache"


def test_engine_metadata_records_what_the_engine_is(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    plan = BuildPlan("int8", str(tmp_path / "m.onnx"), ("INT8",), False, None, -1)
    io = {"input_name": "images", "input_layout": "NHWC-uint8", "output_name": "mask_logits", "output": "logits"}
    meta = engine_metadata(plan, capabilities("10.3.0"), {"name": "Orin", "compute_capability": "8.7"},
                           {"min": (1, 64, 64, 3), "opt": (2, 64, 64, 3), "max": (4, 64, 64, 3)}, io, 12.5)
    assert meta["tensorrt_version"] == "10.3.0" and meta["compute_capability"] == "8.7"
    import hashlib

    assert meta["onnx_sha256"] == hashlib.sha256(b"onnx").hexdigest()
    assert meta["profile"]["max"] == [4, 64, 64, 3] and meta["spec"] is io


def test_engine_command_without_tensorrt_says_why_and_builds_nothing(exported):
    _, path, run_dir, _, _, _, _ = exported
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    r = run_cli("export", "engine", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "TensorRT engine: skipped (TensorRT is not installed" in r.stderr
    assert not list((run_dir / "export").glob("*.engine"))


# --- deploy bundle ---------------------------------------------------------------------------------

def test_bundle_is_complete_verified_and_refuses_tampering(exported, tmp_path):
    from edgeseg.export.bundle import write_bundle
    from edgeseg.runtime.bundle import Bundle

    cfg, _, run_dir, _, _, _, _ = exported
    out = tmp_path / "bundle"
    manifest = write_bundle(cfg, run_dir / "export", out, None)
    roles = {v["role"] for v in manifest["files"].values()}
    assert {"fp32", "int8", "int8-cpu", "calibration-cache", "script", "fp16"} <= roles
    assert (tmp_path / "bundle.tar.gz").is_file()
    b = Bundle(out)
    assert b.model_for("onnxruntime-cpu").name == "model.int8-cpu.onnx"
    assert b.model_for("onnxruntime-tensorrt").name == "model.int8.onnx"
    with pytest.raises(InputError, match=r"build the engine on this device with `python build_engine.py`"):
        b.model_for("tensorrt")
    with open(out / "model.int8-cpu.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match=r"model.int8-cpu.onnx: SHA-256 does not match the bundle manifest"):
        Bundle(out)
    (out / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match=r"model.onnx: listed in the bundle manifest but missing"):
        Bundle(out)


def test_bundle_gates_on_the_accuracy_budget(exported, tmp_path):
    from edgeseg.export.bundle import check_budget, write_bundle

    cfg, path, run_dir, _, _, acc, _ = exported
    ok, words = check_budget({"fp32_miou": 0.80, "deployed_int8_miou": 0.78, "cpu_model_miou": 0.80, "split": "test"},
                             "int8", 1.0)
    assert not ok and "int8 mIoU 0.7800 vs FP32 0.8000: 2.00 points lost" in words and "budget 1.00 (test)" in words
    # the CPU-served u8s8 model is gated by its own figure: over budget alone, it refuses too
    ok, words = check_budget({"fp32_miou": 0.80, "deployed_int8_miou": 0.795, "cpu_model_miou": 0.785}, "int8", 1.0)
    assert not ok and "int8 CPU (u8s8) mIoU 0.7850 vs FP32 0.8000: 1.50 points lost" in words
    assert check_budget({"fp32_miou": 0.80, "deployed_int8_miou": 0.795, "cpu_model_miou": 0.80}, "int8", 1.0)[0]
    assert not check_budget({"fp32_miou": 0.80, "deployed_int8_miou": 0.795}, "int8", 1.0)[0]  # u8s8 unmeasured
    # The real export folder with an accuracy report that misses the budget (whatever this tiny
    # model's INT8 happened to score), so the refusal is exercised on every run.
    import shutil

    export_copy = tmp_path / "export"
    shutil.copytree(run_dir / "export", export_copy)
    over = {**acc, "fp32_miou": 0.80, "deployed_int8_miou": 0.799, "cpu_model_miou": 0.77}
    (export_copy / "accuracy.json").write_text(json.dumps(over))
    tight = load_config(path, Config, ["export.max_miou_drop=1.0"])
    with pytest.raises(InputError, match=r"refusing to deploy: .*int8 CPU \(u8s8\) mIoU 0.7700 vs FP32 0.8000: "
                                         r"3.00 points lost.* pass --allow-over-budget"):
        write_bundle(tight, export_copy, tmp_path / "b", None)
    assert not (tmp_path / "b").exists()
    manifest = write_bundle(tight, export_copy, tmp_path / "b", None, allow_over_budget=True)
    assert (tmp_path / "b" / "manifest.json").is_file() and manifest["budget"]["met"] is False


def test_accuracy_report_is_on_test_with_the_shift_and_the_matrix(exported):
    _, _, run_dir, _, quant, acc, _ = exported
    from edgeseg.export.accuracy import miou_of, onnx_runner, predict_masks
    from edgeseg.export.stage import validation_set

    cfg = exported[0]
    assert acc["split"] == "test" and acc["selection_split"] == "val" and "test_shift" in acc
    assert acc["images"] == 8 and acc["test_shift"]["images"] == 8  # the tiny config's test splits
    # the headline is the model the budget chose on val (the plain one unless it needed float nodes),
    # scored on each report split; never the better of two on test
    assert acc["deployed_int8"] == ("mixed" if quant["budget"]["float_nodes"] else "int8_synthetic")
    assert acc["cpu_model"] == ("int8_cpu_mixed" if quant["budget_cpu"]["float_nodes"] else "int8_cpu")
    assert acc["deployed_int8_chosen_on"] == "val"
    assert acc["deployed_int8_model"] == (quant["budget"]["model"] if acc["deployed_int8"] == "mixed" else quant["files"]["int8"])
    for block in (acc, acc["test_shift"]):
        assert block["deployed_int8_miou"] == block[f"{acc['deployed_int8']}_miou"]
        assert block["cpu_model_miou"] == block[f"{acc['cpu_model']}_miou"]
        assert block["deployed_int8_loss_points"] == pytest.approx((block["fp32_miou"] - block["deployed_int8_miou"]) * 100)
        assert block["cpu_model_loss_points"] == pytest.approx((block["fp32_miou"] - block["cpu_model_miou"]) * 100)
    # the selection figures are val's: FP32 on val, measured here again
    val_images, val_gts = validation_set(cfg)
    fp32_val = miou_of(predict_masks(onnx_runner(run_dir / "export" / "model.onnx"), val_images), val_gts)
    assert quant["budget"]["fp32_miou"] == pytest.approx(fp32_val) and quant["budget_cpu"]["fp32_miou"] == quant["budget"]["fp32_miou"]
    assert quant["budget"]["met"] == (fp32_val - quant["budget"]["mixed_miou"] <= cfg.export.max_miou_drop / 100)
    # which calibration set made the models, so a later rerun says what it measured
    cal = acc["calibration"]
    assert cal == quant["calibration"] == quant["budget"]["calibration"] and cal["images"] == 8
    assert cal["dir"].endswith("calibration/synthetic") and cal["generator"].startswith("none recorded")
    cells = {(r["flavour"], r["method"], r["calibration"], r["split"]) for r in acc["matrix"]}
    assert cells == {(f, m, c, s) for f in ("s8s8", "u8s8") for m in ("minmax", "percentile")
                     for c in ("synthetic", "real", "noise", "target", "target_images") for s in ("test", "test_shift")}
    assert quant["target_dir"].endswith("calibration/target") and quant["target_images_dir"].endswith("target_images")
    row = next(r for r in acc["matrix"] if (r["flavour"], r["method"], r["calibration"], r["split"]) ==
               ("s8s8", "minmax", "synthetic", "test"))
    assert row["miou"] == pytest.approx(acc["int8_synthetic_miou"])  # the same model, the same split
    # the site-calibrated model (the site's frames alone) is named on every split, from its matrix row
    for split, block in (("test", acc), ("test_shift", acc["test_shift"])):
        site = next(r for r in acc["matrix"] if (r["flavour"], r["method"], r["calibration"], r["split"]) ==
                    ("s8s8", "minmax", "target_images", split))
        assert block["site_int8_miou"] == site["miou"] and "target_images" in block["site_int8_calibration"]
        synthetic_site = next(r for r in acc["matrix"] if (r["flavour"], r["method"], r["calibration"], r["split"]) ==
                              ("s8s8", "minmax", "target", split))
        assert block["site_synthetic_int8_miou"] == synthetic_site["miou"]
    # every row states its count; a source with fewer images than the set says so (the 4 stand-in site images)
    counts = {r["calibration"]: r["images"] for r in acc["matrix"]}
    assert counts["synthetic"] == counts["real"] == counts["noise"] == counts["target_images"] == 8 and counts["target"] == 4
    assert all(("note" in r) == (r["images"] < 8) for r in acc["matrix"])
    # the budget decided on val: its figures are not the reported ones
    assert quant["budget"]["split"] == "val" and quant["budget_cpu"]["flavour"] == "u8s8"


def test_accuracy_scores_only_the_models_this_run_wrote(exported, tmp_path):
    """A quantize run with --no-contrast --no-budget leaves the earlier run's contrast and mixed models
    on disk: the report scores what quantize.json records, and refuses models that no longer match."""
    import shutil

    from edgeseg.export.stage import run_accuracy, run_quantize

    _, path, run_dir, _, _, _, _ = exported
    for sub in ("distill", "calibration", "export"):
        shutil.copytree(run_dir / sub, tmp_path / sub)
    cfg = load_config(path, Config, [f"run_dir={tmp_path}"])
    d = tmp_path / "export"
    run_quantize(cfg, contrast=False, budget=False)
    stale = ("model.int8-real.onnx", "model.int8-noise.onnx", "model.int8-mixed.onnx", "model.int8-cpu-mixed.onnx")
    assert all((d / f).is_file() for f in stale)  # precondition: the full run's models are still there
    acc = run_accuracy(cfg)
    assert {"int8_synthetic", "int8_cpu"} <= set(acc["backends"])
    assert not {"int8_real", "int8_noise", "mixed", "int8_cpu_mixed"} & set(acc["backends"]), set(acc["backends"])
    assert "mixed_miou" not in acc and acc["matrix"] == []
    assert acc["deployed_int8"] == "int8_synthetic" and acc["cpu_model"] == "int8_cpu"
    assert acc["deployed_int8_model"] == str(d / "model.int8.onnx")
    # a recorded model that is gone, and INT8 models quantized from another model.onnx, stop the report
    (d / "model.int8-cpu.onnx").rename(d / "moved.onnx")
    with pytest.raises(InputError, match=r"models recorded by the last export run are missing: int8_cpu \("):
        run_accuracy(cfg)
    (d / "moved.onnx").rename(d / "model.int8-cpu.onnx")
    m = onnx.load(d / "model.onnx")
    m.doc_string = "re-exported"
    onnx.save(m, d / "model.onnx")
    with pytest.raises(InputError, match=r"quantize.json: its INT8 models were quantized from another model.onnx"):
        run_accuracy(cfg)


def test_the_deployed_models_calibration_set_is_chosen_and_reported(exported, tmp_path):
    """--calibration site|synthetic|real|DIR picks the set; quantize.json and the bundle's gate say which."""
    import json
    import shutil

    from PIL import Image

    from edgeseg.export.bundle import write_bundle
    from edgeseg.export.int8 import resolve_calibration
    from edgeseg.export.stage import run_accuracy, run_quantize

    _, path, run_dir, _, _, _, _ = exported
    for sub in ("distill", "calibration", "export"):
        shutil.copytree(run_dir / sub, tmp_path / sub)
    cfg = load_config(path, Config, [f"run_dir={tmp_path}"])
    assert resolve_calibration(cfg)[0] == "synthetic"
    assert resolve_calibration(cfg, "site") == ("site", cfg.data_root / "target_images")  # the demo's site frames
    assert resolve_calibration(cfg, "real") == ("real", cfg.data_root / "train")
    with pytest.raises(InputError, match="nonsense: not a calibration set; use one of synthetic, site, real"):
        resolve_calibration(cfg, "nonsense")
    frames = tmp_path / "frames"  # a user's folder: frames of another size than the model's, letterboxed
    frames.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(frames / f"f{i}.png")
    scales = {}
    for choice in ("site", str(frames)):
        q = run_quantize(load_config(path, Config, [f"run_dir={tmp_path}", f"export.calibration={choice}"]),
                         contrast=False, budget=False)
        recorded = json.loads((tmp_path / "export" / "quantize.json").read_text())
        assert recorded["calibration_choice"] == ("site" if choice == "site" else "folder") == q["calibration_choice"]
        assert recorded["calibration_images"] == (8 if choice == "site" else 3)
        scales[choice] = (tmp_path / "export" / "calibration.cache").read_text()
    assert scales["site"] != scales[str(frames)]  # different sets, different ranges
    run_accuracy(cfg)
    manifest = write_bundle(cfg, tmp_path / "export", tmp_path / "bundle", None, allow_over_budget=True)
    assert manifest["calibration"] == {"choice": "folder", "dir": str(frames), "images": 3}
    assert f"INT8 calibrated on folder (3 images from {frames})" in manifest["budget"]["figures"]
    r = run_cli("export", "quantize", "--config", str(path), "--set", f"run_dir={tmp_path}", "--calibration", "nope",
                "--no-contrast", "--no-budget")
    assert r.returncode != 0 and "nope: not a calibration set" in r.stderr and "Traceback" not in r.stderr


# --- what TensorRT's ONNX parser accepts ----------------------------------------------------------

def test_the_tensorrt_models_pass_the_parser_rules(exported):
    from edgeseg.export.trt_rules import tensorrt_problems

    _, _, run_dir, _, _, _, _ = exported
    d = run_dir / "export"
    assert tensorrt_problems(d / "model.int8.onnx") == []
    assert tensorrt_problems(d / "model.onnx") == []
    dq_inputs = {n.input[0] for n in onnx.load(d / "model.int8.onnx").graph.node if n.op_type == "DequantizeLinear"}
    inits = {i.name: i.data_type for i in onnx.load(d / "model.int8.onnx").graph.initializer}
    assert onnx.TensorProto.INT32 not in {inits[i] for i in dq_inputs if i in inits}  # biases stay float
    # the u8s8 CPU model breaks them (uint8, non-zero zero-points, int32 biases): the check can fail
    problems = tensorrt_problems(d / "model.int8-cpu.onnx")
    assert any("DequantizeLinear of a INT32 tensor" in p for p in problems)
    assert any("zero-point" in p for p in problems)


def test_ort_default_bias_quantization_is_refused_for_tensorrt(exported, tmp_path):
    from edgeseg.calibration.quantize import batches_of, quantize_qdq
    from edgeseg.export.trt_rules import check_for_tensorrt

    _, _, run_dir, _, _, _, _ = exported
    batches = batches_of(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8),
                         lambda b: ((b.astype(np.float32) / 255 - 0.45) / 0.226).transpose(0, 3, 1, 2))
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from edgeseg.calibration.quantize import ArrayReader, input_name

    src = run_dir / "export" / "model.onnx"
    bad = tmp_path / "default.onnx"
    quantize_static(str(src), str(bad), ArrayReader(input_name(src), batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})  # ORT's default bias
    with pytest.raises(InputError, match=r"default.onnx: TensorRT's ONNX parser would refuse it: .*"
                                         r"DequantizeLinear of a INT32 tensor"):
        check_for_tensorrt(bad)
    ok = quantize_qdq(src, tmp_path / "ours.onnx", batches, flavour="s8s8")
    check_for_tensorrt(ok)


def test_fused_uint8_input_is_cast_before_any_transpose(tiny_run, tmp_path):
    from edgeseg.export.trt_rules import tensorrt_problems
    from edgeseg.export.stage import run_onnx

    _, base = tiny_run
    path = write_config(tmp_path, data={"root": str(base.data_root)},
                        teacher={"checkpoint": str(base.teacher_checkpoint)},
                        export={"fuse_preprocessing": True, "output": "mask", "max_batch": 2, "opt_batch": 1})
    cfg = load_config(path, Config)
    from edgeseg.distill.models import build_model

    (tmp_path / "distill").mkdir()
    torch.save({"student": build_model(cfg.student).state_dict()}, tmp_path / "distill" / "best.pt")
    run_onnx(cfg)
    m = onnx.load(tmp_path / "export" / "model.onnx")
    first = next(n for n in m.graph.node if "images" in n.input)
    assert first.op_type == "Cast"
    assert tensorrt_problems(m) == []
    # the old order (Transpose of uint8, then Cast) is refused
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2], name="T"),
                           helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT, name="C")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 4, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    problems = tensorrt_problems(helper.make_model(g))
    assert any("T: Transpose produces uint8" in p for p in problems) and any("reads the uint8 input" in p for p in problems)


def test_the_budget_bites_keeps_nodes_float_on_val_for_both_flavours(tiny_run, tmp_path):
    """A zero budget and a calibration that clips (uniform noise): plain INT8 misses the budget on val,
    and the search keeps the fewest nodes in float that recover it, for both flavours."""
    import dataclasses

    from edgeseg.calibration.quantize import batches_of, preprocess_for_quantization, quantize_qdq
    from edgeseg.calibration.report import noise_images
    from edgeseg.distill.models import build_model
    from edgeseg.export.int8 import input_transform, run_budget
    from edgeseg.export.onnx_model import export_onnx
    from edgeseg.export.stage import validation_set
    from edgeseg.runtime.spec import ModelSpec

    _, base = tiny_run
    cfg = load_config(write_config(tmp_path, data={"root": str(base.data_root)},
                                   export={"max_batch": 4, "opt_batch": 2, "max_miou_drop": 0.0,
                                           "max_float_nodes": 64}), Config)
    from edgeseg.runtime import Segmenter

    torch.manual_seed(3)
    student = build_model(cfg.student).eval()
    images, _ = validation_set(cfg)
    x = torch.from_numpy(input_transform(ModelSpec(image_size=(64, 64)))(np.stack(images)))
    with torch.no_grad():  # centre the logits on zero: about half the pixels are people
        student.segmentation_head[0].bias -= student(x).median()
    d = tmp_path / "export"
    export_onnx(cfg, student, d)
    spec = ModelSpec.from_onnx(d / "model.onnx")
    pre = preprocess_for_quantization(d / "model.onnx", d / "model.pre.onnx")
    batches = batches_of(noise_images(8, spec.image_size, 0), input_transform(spec))
    # the FP32 model's own masks as ground truth: FP32 scores 1.0, every INT8 flip costs
    with Segmenter(d / "model.onnx", backend="onnxruntime-cpu") as seg:
        val = (images, seg.predict(images))
    for flavour, mixed in (("s8s8", "model.int8-mixed.onnx"), ("u8s8", "model.int8-cpu-mixed.onnx")):
        plain = quantize_qdq(pre, d / f"plain-{flavour}.onnx", batches, flavour=flavour, preprocessed=True)
        loss = run_budget(cfg, d, pre, plain, batches, val, flavour)  # budget 0: what plain INT8 loses
        lost_points = (loss["fp32_miou"] - loss["int8_miou"]) * 100
        half = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, max_miou_drop=lost_points / 2))
        out = run_budget(half, d, pre, plain, batches, val, flavour)  # recover at least half of it
        assert out["split"] == "val" and out["flavour"] == flavour
        assert out["int8_miou"] < out["fp32_miou"], "precondition: plain INT8 loses something on val"
        assert out["float_nodes"] and out["trials"], "the search ran and kept nodes in float"
        assert out["met"] and out["fp32_miou"] - out["mixed_miou"] <= lost_points / 200 + 1e-9
        assert out["mixed_miou"] > out["int8_miou"] and (d / mixed).is_file() and out["model"].endswith(mixed)


def test_served_masks_do_not_depend_on_the_batch(exported):
    """A float ReduceMean between Q/DQ summed in a batch-dependent order and flipped requantized
    SE means (8 of 371 demo requests changed); the export pools with GlobalAveragePool instead,
    which quantizes to an exact integer QLinearGlobalAveragePool."""
    import onnxruntime as ort

    _, _, run_dir, _, _, _, _ = exported
    d = run_dir / "export"
    graph = onnx.load(d / "model.onnx").graph
    assert not [n for n in graph.node if n.op_type == "ReduceMean"]
    assert sum(n.op_type == "GlobalAveragePool" for n in graph.node) >= 1  # the squeeze-excitation means
    rng = np.random.default_rng(0)
    x = ((rng.integers(0, 256, (12, 64, 64, 3)).astype(np.float32) / 255 - 0.45) / 0.226).transpose(0, 3, 1, 2).copy()
    for name in ("model.int8-cpu.onnx", "model.int8.onnx", "model.onnx"):
        for threads in (1, 2):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            s = ort.InferenceSession(str(d / name), so, providers=["CPUExecutionProvider"])
            alone = [s.run(None, {"images": x[i:i + 1]})[0][0] for i in range(len(x))]
            for b in (2, 3, 4):
                for start in range(0, len(x) - b + 1, b):
                    out = s.run(None, {"images": x[start:start + b]})[0]
                    for j in range(b):
                        assert np.array_equal(out[j], alone[start + j]), (name, threads, b, start + j)


# --- the label-free site check ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checked_bundle(exported, tmp_path_factory):
    """The tiny run's bundle with its teacher, written once (its manifest carries the check's reference)."""
    from edgeseg.export.bundle import write_bundle

    cfg, _, run_dir, *_ = exported
    out = tmp_path_factory.mktemp("site") / "bundle"
    manifest = write_bundle(cfg, run_dir / "export", out, None, allow_over_budget=True, with_teacher=True)
    return cfg, out, manifest


def _frames(folder: Path, images: list[np.ndarray]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return folder


def test_site_check_passes_source_frames_and_flags_a_strong_shift(checked_bundle, tmp_path):
    """Held-out test frames pass; the same frames under a strong shift (over-exposed x6, colour-cast) saturate
    the INT8 ranges, which the report shows without calling for recalibration by itself."""
    from edgeseg.export.stage import eval_set
    from edgeseg.runtime.check import activation_ranges, run_check

    cfg, bundle, manifest = checked_bundle
    assert manifest["files"]["teacher.onnx"]["role"] == "teacher"
    ref = manifest["site_check_reference"]
    assert ref["split"] == "val" and ref["frames"] == 8 and 0 < ref["int8_agreement_miou"] <= 1
    ranges = activation_ranges(bundle / "model.int8-cpu.onnx")
    assert "images" in ranges and all(lo <= 0 <= hi for lo, hi in ranges.values())  # u8 ranges hold zero

    test_images, _ = eval_set(cfg, "test")
    fine = run_check(bundle, _frames(tmp_path / "test", test_images), tmp_path / "out_test", need_teacher=True)
    assert fine["findings"] == [] and fine["verdict"][0].startswith("fine")
    assert fine["teacher_agreement_miou"] is not None and fine["range_fit"]["int8"]["tensors"] > 10
    assert 0 <= fine["person_fraction"] <= 1 and fine["frames"] == len(test_images)
    shifted = [np.clip(img.astype(np.float32) * 6.0 * np.array([1.4, 0.8, 0.4]), 0, 255).astype(np.uint8)
               for img in test_images]
    bad = run_check(bundle, _frames(tmp_path / "shift", shifted), tmp_path / "out_shift")
    # the shift saturates the INT8 ranges beyond the reference's, yet the tiny student is nowhere confident (|logit| < 2: nothing INT8
    # could be predicted to lose there), so saturation alone does not say "recalibrate" (tests/test_site_check.py
    # has the verdict on logits where FP32 is sure)
    sat = bad["range_fit"]["int8"]["saturation"]
    assert sat > ref["range_fit"]["int8"]["saturation"] + 0.0005  # above the reference's by more than half a permille
    assert bad["confident_share"] == 0.0 and bad["predicted_int8_loss"] == 0.0
    assert "recalibrate on these frames" not in bad["verdict"]
    report = json.loads((tmp_path / "out_shift" / "site_check.json").read_text())
    assert report["verdict"] == bad["verdict"] and (tmp_path / "out_shift" / "site_check.png").stat().st_size > 10_000
    worst = report["range_fit"]["int8"]["worst"]
    assert worst == sorted(worst, key=lambda w: -w["saturation"])  # worst tensors first


def test_site_check_bad_input_is_one_line(checked_bundle, exported, tmp_path):
    from edgeseg.export.bundle import write_bundle

    cfg, bundle, _ = checked_bundle
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("runtime", "check", "--bundle", str(bundle), "--images", str(empty))
    assert r.returncode != 0 and "no images" in r.stderr and str(empty) in r.stderr and "Traceback" not in r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "00000.png").write_bytes(b"not a png")
    r = run_cli("runtime", "check", "--bundle", str(bundle), "--images", str(broken))
    assert r.returncode != 0 and "00000.png: not a readable image" in r.stderr and "Traceback" not in r.stderr
    frames = _frames(tmp_path / "frames", [np.full((64, 64, 3), 128, np.uint8)])
    no_teacher = write_bundle(cfg, exported[2] / "export", tmp_path / "plain", None, allow_over_budget=True)
    assert "teacher.onnx" not in no_teacher["files"]
    r = run_cli("runtime", "check", "--bundle", str(tmp_path / "plain"), "--images", str(frames), "--require-teacher")
    assert r.returncode != 0 and "--with-teacher" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("runtime", "check", "--bundle", str(tmp_path / "plain"), "--images", str(frames), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verdict"] and "no teacher in the bundle" in r.stderr
    (tmp_path / "plain" / "model.onnx").unlink()
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("runtime", "check", "--bundle", str(tmp_path / "plain"), "--images", str(frames))
    assert r.returncode != 0 and "no FP32 model" in r.stderr and "Traceback" not in r.stderr


def test_a_bundle_with_a_zoo_teacher_checks_its_agreement_as_distillation_read_it(exported, tmp_path):
    """The teacher given as a zoo ONNX (BGR pixels in [0, 255]) ships as it is with its I/O in the manifest;
    the site check runs it by that I/O and agrees with the same teacher shipped as edgeseg's own export."""
    import dataclasses

    import torch.nn as nn

    from edgeseg.distill.config import OnnxTeacherConfig
    from edgeseg.distill.models import load_teacher
    from edgeseg.distill.onnx_export import export_module
    from edgeseg.export.bundle import write_bundle
    from edgeseg.export.stage import eval_set
    from edgeseg.runtime.check import SiteCheck
    from edgeseg.runtime.files import sha256_file

    cfg, _, run_dir, *_ = exported
    teacher = load_teacher(cfg).eval()

    class ZooFront(nn.Module):  # BGR in [0, 255] -> the teacher's normalised RGB
        def __init__(self):
            super().__init__()
            self.teacher = teacher
            self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255)

        def forward(self, x):
            return self.teacher((x.flip(1) - self.mean) / self.std)

    zoo = export_module(ZooFront(), tmp_path / "zoo.onnx", torch.zeros(1, 3, 64, 64), ["x"], ["y"])
    zoo_cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(
        cfg.teacher, onnx=OnnxTeacherConfig(path=str(zoo), channels="bgr", range="byte")))
    manifest = write_bundle(zoo_cfg, run_dir / "export", tmp_path / "zoo_bundle", None, allow_over_budget=True,
                            with_teacher=True)
    assert manifest["teacher_io"]["channels"] == "bgr" and manifest["teacher_io"]["range"] == "byte"
    assert manifest["files"]["teacher.onnx"]["sha256"] == sha256_file(zoo)  # the file itself, not a re-export
    images, _ = eval_set(cfg, "test")
    ours = write_bundle(cfg, run_dir / "export", tmp_path / "own_bundle", None, allow_over_budget=True, with_teacher=True)
    assert "teacher_io" not in ours
    a = SiteCheck(tmp_path / "zoo_bundle").measure(images)["teacher_agreement_miou"]
    b = SiteCheck(tmp_path / "own_bundle").measure(images)["teacher_agreement_miou"]
    assert a == pytest.approx(b, abs=0.01)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_calibration_ranges_are_computed_once_and_give_the_same_models(exported, tmp_path, method):
    """The ranges depend on the model, the images and the method only: a second flavour, a model with nodes
    kept in float or a rerun reuses them, and the Q/DQ models equal those calibrated from scratch."""
    import onnx

    from edgeseg.calibration.quantize import batches_of, preprocess_for_quantization, quantize_qdq
    from edgeseg.export.int8 import input_transform
    from edgeseg.runtime.spec import ModelSpec

    _, _, run_dir, _, _, _, _ = exported
    src = run_dir / "export" / "model.onnx"
    pre = preprocess_for_quantization(src, tmp_path / "pre.onnx")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    to_input = input_transform(ModelSpec.from_onnx(src))
    batches = batches_of(images, to_input)
    cache = tmp_path / "ranges"
    first_node = next(n.name for n in onnx.load(pre).graph.node if n.op_type == "Conv")

    def scales(path):
        model = onnx.load(path)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        return {n.input[0]: inits[n.input[1]].tolist() for n in model.graph.node if n.op_type == "QuantizeLinear"}

    for flavour, exclude in (("s8s8", ()), ("u8s8", ()), ("s8s8", (first_node,))):
        cached = quantize_qdq(pre, tmp_path / f"c-{flavour}-{len(exclude)}.onnx", batches, method, flavour,
                              exclude_nodes=exclude, preprocessed=True, ranges_cache=cache)
        scratch = quantize_qdq(pre, tmp_path / f"s-{flavour}-{len(exclude)}.onnx", batches, method, flavour,
                               exclude_nodes=exclude, preprocessed=True)
        assert scales(cached) == scales(scratch) and scales(cached)
    assert len(list(cache.glob("ranges-*.json"))) == 1  # one calibration served the three models
    quantize_qdq(pre, tmp_path / "other.onnx", batches_of(images[:4], to_input), method, "s8s8", preprocessed=True,
                 ranges_cache=cache)
    assert len(list(cache.glob("ranges-*.json"))) == 2  # other images: other ranges
    assert not list(cache.glob("*.tmp"))
