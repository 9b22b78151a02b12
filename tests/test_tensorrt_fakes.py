"""Our TensorRT and CUDA call sequences, run against fakes of TensorRT 10/11 and cuda-python.

The fakes (tests/fakes) stand in for libraries that cannot be installed here and enforce their
rules (see each fake's docstring for the documents followed): precision flags exist on 10 and
not on 11, DLA needs static shapes and a DLA core, a kernel launch from a thread whose current
device is not the stream's fails, results are only there after a synchronisation. The engine
itself is ONNX Runtime on the CPU, so outputs can be compared with ORT's exactly.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeseg.runtime.errors import InputError
from tests.conftest import write_config
from tests.test_export import exported  # noqa: F401  (the fixture)

FAKES = Path(__file__).resolve().parent / "fakes"


def _drop_fake_modules() -> None:
    for name in [m for m in sys.modules if m in ("tensorrt", "cuda") or m.startswith(("tensorrt.", "cuda."))]:
        del sys.modules[name]


@pytest.fixture
def fake_gpu(monkeypatch, request):
    """(tensorrt, cudart) fakes on sys.path; the TensorRT version is the test's parameter (default 10.3.0)."""
    monkeypatch.setenv("EDGESEG_FAKE_TRT", getattr(request, "param", "10.3.0"))
    saved = {m: mod for m, mod in sys.modules.items() if m in ("tensorrt", "cuda") or m.startswith(("tensorrt.", "cuda."))}
    _drop_fake_modules()
    monkeypatch.syspath_prepend(str(FAKES))
    import tensorrt
    from cuda.bindings import runtime as cudart

    assert Path(tensorrt.__file__).is_relative_to(FAKES) and Path(cudart.__file__).is_relative_to(FAKES)
    cudart.reset()
    yield tensorrt, cudart
    _drop_fake_modules()
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def models(tiny_run, tmp_path_factory):
    """A tiny student as FP32, FP16 and s8s8 Q/DQ ONNX, and a calibration cache of its scales."""
    import torch

    from edgeseg.calibration.quantize import activation_scales, batches_of, quantize_qdq
    from edgeseg.distill.config import Config, load_config
    from edgeseg.distill.models import build_model
    from edgeseg.export.int8 import input_transform
    from edgeseg.export.onnx_model import export_onnx
    from edgeseg.export.stage import write_fp16
    from edgeseg.export.trt_cache import write_cache
    from edgeseg.runtime.spec import ModelSpec

    d = tmp_path_factory.mktemp("trt")
    cfg = load_config(write_config(d, export={"max_batch": 4, "opt_batch": 2}), Config)
    torch.manual_seed(0)
    student = build_model(cfg.student).eval()
    with torch.no_grad():
        student.segmentation_head[0].bias.fill_(0.05)
    export_onnx(cfg, student, d)
    spec = ModelSpec.from_onnx(d / "model.onnx")
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    int8 = quantize_qdq(d / "model.onnx", d / "model.int8.onnx", batches_of(images, input_transform(spec)))
    files = {"fp32": str(d / "model.onnx"), "fp16": write_fp16(d / "model.onnx", d / "model.fp16.onnx"),
             "int8": str(int8), "cache": str(write_cache(activation_scales(int8), d / "calibration.cache"))}
    return d, spec, files, [images[i] for i in range(3)]


def _build(models, precision, dla_core=-1, out=None):
    import tensorrt as trt

    from edgeseg.export.engine import build_engine, capabilities, engine_paths, plan_build, profile_shapes

    d, spec, files, _ = models
    caps = capabilities(trt.__version__)
    plan = plan_build(caps, precision, files, dla_core)
    mb = spec.max_batch
    profile = profile_shapes(spec.input_layout, spec.image_size, mb, mb, mb) if dla_core >= 0 else \
        profile_shapes(spec.input_layout, spec.image_size, mb, spec.opt_batch)
    out = out or d / f"build-{trt.__version__}-{precision}-{dla_core}"
    out.mkdir(exist_ok=True)
    meta = build_engine(plan, caps, profile, spec.to_dict(), out, 64)
    return engine_paths(out, precision, dla_core)["engine"], meta


def _ort_masks(models, images):
    from edgeseg.runtime import Segmenter

    with Segmenter(models[0] / "model.onnx", backend="onnxruntime-cpu") as ref:
        return ref.predict(images)


@pytest.mark.parametrize("fake_gpu, precision, flags, typed", [
    ("10.3.0", "int8", ["FP16", "INT8"], False),
    ("10.3.0", "fp16", ["FP16"], False),
    ("10.3.0", "fp32", [], False),
    ("11.0.0", "int8", [], True),
    ("11.0.0", "fp16", [], True),
], indirect=["fake_gpu"])
def test_builds_follow_each_tensorrt_version(fake_gpu, models, precision, flags, typed):
    trt, _ = fake_gpu
    engine, meta = _build(models, precision)
    build = trt.builds[-1]
    assert build["flags"] == flags and build["strongly_typed"] is typed and build["device"] == "GPU"
    assert build["profiles"][0]["images"] == [[1, 3, 64, 64], [2, 3, 64, 64], [4, 3, 64, 64]]
    assert engine.is_file() and meta["tensorrt_version"] == trt.__version__ and meta["precision"] == precision
    assert (engine.parent / "timing.cache").is_file() and meta["static_batch"] is False


@pytest.mark.parametrize("fake_gpu", ["11.0.0"], indirect=True)
def test_tensorrt_11_has_no_implicit_int8_and_the_plan_says_so(fake_gpu, models):
    trt, _ = fake_gpu
    assert not hasattr(trt.BuilderFlag, "INT8") and not hasattr(trt, "IInt8EntropyCalibrator2")
    with pytest.raises(InputError, match="DLA INT8 needs implicit INT8 with a calibration cache, which TensorRT 11.0.0 removed"):
        _build(models, "int8", dla_core=0)


def test_dla_int8_builds_static_with_a_cache_for_the_parsed_network(fake_gpu, models):
    trt, _ = fake_gpu
    engine, meta = _build(models, "int8", dla_core=0)
    build = trt.builds[-1]
    lo, opt, hi = build["profiles"][0]["images"]
    assert build["device"] == "DLA" and build["dla_core"] == 0 and lo == opt == hi == [4, 3, 64, 64]
    # written at build time: this TensorRT's version in the header, only names the parser produced
    assert build["cache_header"] == "TRT-100300-EntropyCalibration2"
    assert build["cache_names_not_in_network"] == []
    assert meta["calibration_cache"]["tensors"] > 10 and meta["dla_core"] == 0 and meta["static_batch"] is True
    # a dynamic profile on DLA is refused by TensorRT: our build says it failed
    from edgeseg.export.engine import build_engine, capabilities, plan_build, profile_shapes

    d, spec, files, _ = models
    plan = plan_build(capabilities(trt.__version__), "int8", files, 0)
    with pytest.raises(RuntimeError, match="failed to build the int8 engine"):
        build_engine(plan, capabilities(trt.__version__), profile_shapes(spec.input_layout, (64, 64), 4, 2),
                     spec.to_dict(), engine.parent, 64)
    assert "DLA does not support dynamic shapes" in trt.log[-1]


def test_int32_bias_dequantize_is_refused_by_the_parser(fake_gpu, models, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from edgeseg.calibration.quantize import ArrayReader, batches_of, input_name
    from edgeseg.export.engine import build_engine, capabilities, plan_build, profile_shapes
    from edgeseg.export.int8 import input_transform

    trt, _ = fake_gpu
    d, spec, files, images = models
    bad = tmp_path / "default-bias.onnx"
    quantize_static(files["fp32"], str(bad), ArrayReader(input_name(files["fp32"]),
                    batches_of(np.stack(images), input_transform(spec))), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    plan = plan_build(capabilities(trt.__version__), "int8", {**files, "int8": str(bad)})
    with pytest.raises(InputError, match="TensorRT's ONNX parser would refuse it"):  # caught before the parser
        build_engine(plan, capabilities(trt.__version__), profile_shapes(spec.input_layout, (64, 64), 4, 2),
                     spec.to_dict(), tmp_path, 64)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_tensorrt_runner_matches_onnxruntime_with_one_sync_per_call(fake_gpu, models, cuda_graphs):
    from edgeseg.runtime import Segmenter

    _, cudart = fake_gpu
    engine, _ = _build(models, "fp32")
    images = models[3]
    with Segmenter(engine, backend="tensorrt", cuda_graphs=cuda_graphs) as seg:
        assert seg.backend == "tensorrt" and seg.device == "cuda:0"
        seg.predict(images)  # the first call of a batch size captures its graph
        before = len(cudart.calls)
        masks = seg.predict(images)
        syncs = [c for c in cudart.calls[before:] if c[0] == "cudaStreamSynchronize"]
        assert len(syncs) == 1, cudart.calls[before:]
        assert set(seg.last_timings_ms) >= {"copy_in", "infer", "copy_out"}
        if cuda_graphs:
            assert any(c[0] == "cudaGraphLaunch" for c in cudart.calls[before:]) and cudart.live("graph_execs") == 1
    for a, b in zip(masks, _ort_masks(models, images)):
        assert np.array_equal(a, b)
    assert cudart.live("graph_execs") == 0 and cudart.live("memory") == 0 and cudart.live("streams") == 0


def test_inference_in_the_batcher_thread_on_the_second_gpu(fake_gpu, models):
    from edgeseg.runtime import Segmenter

    engine, _ = _build(models, "fp32")
    images = models[3]
    with Segmenter(engine, backend="tensorrt", device_id=1) as seg:
        assert seg.device == "cuda:1"
        queued = [f.result(timeout=30) for f in [seg.submit(img) for img in images]]  # the worker thread runs them
    for a, b in zip(queued, _ort_masks(models, images)):
        assert np.array_equal(a, b)


def test_the_fake_enforces_the_per_thread_device(fake_gpu):
    import threading

    _, cudart = fake_gpu
    cudart.cudaSetDevice(1)
    stream = cudart.cudaStreamCreate()[1]
    result = {}
    t = threading.Thread(target=lambda: result.update(err=cudart.enqueue(stream, lambda: None, kernel=True)))
    t.start()
    t.join()
    assert result["err"] == cudart.cudaError_t.cudaErrorInvalidResourceHandle  # the new thread is on device 0


def test_dla_engine_runs_partial_batches_padded(fake_gpu, models):
    from edgeseg.runtime import Segmenter

    engine, meta = _build(models, "fp16", dla_core=1)
    assert meta["static_batch"] and meta["dla_core"] == 1
    images = models[3]  # 3 images into a static batch of 4
    with Segmenter(engine, backend="tensorrt") as seg:
        masks = seg.predict(images)
    assert len(masks) == 3
    for a, b in zip(masks, _ort_masks(models, images)):
        assert a.shape == b.shape and (a == b).mean() > 0.99  # the FP16 build is FP32 here (ORT runs the ONNX)


def test_a_bundle_with_an_engine_for_another_gpu_falls_back_then_builds_on_the_device(fake_gpu, exported, tmp_path,
                                                                                   caplog):
    import shutil

    from edgeseg.export.bundle import write_bundle
    from edgeseg.export.stage import run_engine
    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.bundle import Bundle

    trt, _ = fake_gpu
    cfg, _, run_dir, _, _, _, _ = exported
    export_copy = tmp_path / "export"
    shutil.copytree(run_dir / "export", export_copy)
    # the export machine built an engine for its own GPU (compute capability 7.5)
    from edgeseg.export.engine import build_engine, capabilities, plan_build, profile_shapes
    from edgeseg.runtime.spec import ModelSpec

    spec = ModelSpec.from_onnx(export_copy / "model.onnx")
    files = {"fp32": str(export_copy / "model.onnx"), "int8": str(export_copy / "model.int8.onnx")}
    build_engine(plan_build(capabilities(trt.__version__), "int8", files), capabilities(trt.__version__),
                 profile_shapes(spec.input_layout, spec.image_size, spec.max_batch, spec.opt_batch), spec.to_dict(),
                 export_copy, 64)
    sidecar = export_copy / "model.int8.engine.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "compute_capability": "7.5", "gpu_name": "Tesla T4"}))
    bundle = tmp_path / "bundle"
    write_bundle(cfg, export_copy, bundle, None, allow_over_budget=True)
    assert Bundle(bundle).model_for("tensorrt").name == "model.int8.engine"

    images = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="edgeseg.runtime.segmenter"):
        with Segmenter(bundle, backend="auto") as seg:
            assert seg.backend == "onnxruntime-cpu"  # the foreign engine is skipped, not fatal
            reference = seg.predict(images)
    assert any("built for a GPU of compute capability 7.5" in r.getMessage() for r in caplog.records)

    # build_engine.py on the device: its own file names, the manifest's files untouched
    result = run_engine(None, "int8", bundle=bundle)
    assert result["built"] and (bundle / "model.int8.device.engine").is_file()
    Bundle(bundle).verify()
    with Segmenter(bundle, backend="auto") as seg:
        assert seg.backend == "tensorrt" and seg.model_path.name == "model.int8.device.engine"
        masks = seg.predict(images)
    assert all(m.shape == r.shape for m, r in zip(masks, reference))
