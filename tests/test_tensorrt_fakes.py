"""Our TensorRT and CUDA call sequences, run against fakes of TensorRT 10/11 and cuda-python.

The fakes (tests/fakes) stand in for libraries that cannot be installed here and enforce their
rules (see each fake's docstring for the documents followed): precision flags exist on 10 and
not on 11, DLA needs static shapes and a DLA core and exists only in 10.0-10.7 and 11.4.1+, a
kernel launch from a thread whose current device is not the stream's fails, results are only
there after a synchronisation, a runtime must outlive its engines, device and pinned memory have
their own frees, graphs are destroyed, a graph replayed after its context changed shape fails,
a global-mode capture is broken by other threads' allocations, engines load only in the exact
TensorRT that built them. The engine itself is ONNX Runtime on the CPU (in FP16 for an FP16
build), so outputs can be compared with ORT's exactly.
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
    from edgeseg.distill.config import load_config
    from edgeseg.export.config import Config
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


def _runner_logits(engine, spec, feed):
    from edgeseg.runtime.backends.tensorrt_engine import TensorRTRunner

    with TensorRTRunner(engine, spec) as runner:
        return runner.infer(feed).copy()


def _ort_logits(path, feed):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: feed})[0]


def test_dla_fp16_engine_computes_in_fp16_and_pads_partial_batches(fake_gpu, models):
    from edgeseg.runtime import Segmenter

    trt, _ = fake_gpu
    engine, meta = _build(models, "fp16", dla_core=1)
    assert meta["static_batch"] and meta["dla_core"] == 1 and trt.builds[-1]["compute"] == "fp16"
    d, spec, files, images = models
    feed = np.random.default_rng(3).standard_normal(spec.input_shape(3)).astype(np.float32)  # 3 into a batch of 4
    got = _runner_logits(engine, spec, feed)
    fp16, fp32 = _ort_logits(files["fp16"], feed), _ort_logits(files["fp32"], feed)
    assert got.shape == (3, 1, 64, 64)
    # the FP16 build's logits are the FP16 graph's (padding rows included in the run), not the FP32 model's
    to_fp16, to_fp32 = np.abs(got - fp16).max(), np.abs(got - fp32).max()
    assert to_fp32 > 0 and to_fp16 < to_fp32 / 10, (to_fp16, to_fp32)
    with Segmenter(engine, backend="tensorrt") as seg:
        masks = seg.predict(images)
    assert len(masks) == 3 and all(a.shape == b.shape for a, b in zip(masks, _ort_masks(models, images)))


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


# --- object lifetimes, release, reactivation (issue 17, B1, B7, B13) --------------------------------

def test_the_fakes_refuse_what_tensorrt_and_cuda_refuse(fake_gpu):
    import json as _json

    trt, cudart = fake_gpu
    # NVIDIA/TensorRT#4436: a runtime destroyed before its engines; the engine is unusable afterwards
    runtime = trt.Runtime(trt.Logger())
    plan = _json.dumps({"fake_tensorrt": trt.__version__, "onnx": "x.onnx", "inputs": {"images": [1]},
                        "outputs": {"mask_logits": "FLOAT"}, "profiles": [], "dla_core": -1}).encode()
    engine = runtime.deserialize_cuda_engine(plan)
    del runtime
    assert trt.violations and "Destroying a runtime before destroying deserialized engines" in trt.violations[-1]
    assert engine.create_execution_context() is None
    trt.violations.clear()
    # an engine deserialises only in the exact TensorRT that built it (a patch release differs)
    other = _json.loads(plan)
    other["fake_tensorrt"] = trt.__version__.rsplit(".", 1)[0] + ".9"
    assert trt.Runtime(trt.Logger()).deserialize_cuda_engine(_json.dumps(other).encode()) is None
    # device and pinned memory are two pools: each has its own free
    dev, host = cudart.cudaMalloc(64)[1], cudart.cudaMallocHost(64)[1]
    assert cudart.cudaFree(host)[0] == cudart.cudaError_t.cudaErrorInvalidValue
    assert cudart.cudaFreeHost(dev)[0] == cudart.cudaError_t.cudaErrorInvalidValue
    assert cudart.cudaFree(dev)[0] == cudart.OK and cudart.cudaFreeHost(host)[0] == cudart.OK
    assert cudart.cudaFree(dev)[0] == cudart.cudaError_t.cudaErrorInvalidValue  # twice
    # a graph lives until cudaGraphDestroy, apart from its executable graphs
    stream = cudart.cudaStreamCreate()[1]
    assert cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)[0] == 0
    graph = cudart.cudaStreamEndCapture(stream)[1]
    graph_exec = cudart.cudaGraphInstantiate(graph, 0)[1]
    assert cudart.live("graphs") == 1 and cudart.live("graph_execs") == 1
    assert cudart.cudaGraphDestroy(graph)[0] == 0 and cudart.cudaGraphExecDestroy(graph_exec)[0] == 0
    assert cudart.live("graphs") == 0 and cudart.live("graph_execs") == 0


@pytest.mark.parametrize("mode, other_thread_ok", [("cudaStreamCaptureModeGlobal", False),
                                                   ("cudaStreamCaptureModeThreadLocal", True)])
def test_the_fake_capture_modes_govern_other_threads(fake_gpu, mode, other_thread_ok):
    import threading

    _, cudart = fake_gpu
    stream = cudart.cudaStreamCreate()[1]
    cudart.cudaStreamBeginCapture(stream, getattr(cudart.cudaStreamCaptureMode, mode))
    result = {}
    t = threading.Thread(target=lambda: result.update(err=cudart.cudaMalloc(16)[0]))
    t.start()
    t.join()
    err, graph = cudart.cudaStreamEndCapture(stream)
    # Global: another thread's cudaMalloc fails and invalidates the capture; ThreadLocal: neither
    assert (result["err"] == cudart.OK) is other_thread_ok
    assert (err == cudart.OK) is other_thread_ok
    if graph is not None:
        cudart.cudaGraphDestroy(graph)


def test_runtime_outlives_its_engine_and_a_runner_reactivates_cleanly(fake_gpu, models):
    from edgeseg.runtime.backends.tensorrt_engine import TensorRTRunner

    trt, cudart = fake_gpu
    engine, _ = _build(models, "fp32")
    d, spec, files, _ = models
    feed = np.random.default_rng(0).standard_normal(spec.input_shape(2)).astype(np.float32)
    want = _ort_logits(files["fp32"], feed)
    import copy

    runner = TensorRTRunner(engine, spec)
    before = copy.deepcopy(vars(runner))
    for _ in range(2):  # activate, infer, deactivate twice on one runner
        with runner:
            assert runner.runtime is not None  # kept: it must outlive the engine
            np.testing.assert_array_equal(runner.infer(feed), want)
        after = {k: v for k, v in vars(runner).items() if k != "timings_ms"}
        assert after == {k: v for k, v in before.items() if k != "timings_ms"}  # the state before activate
    assert trt.violations == []  # no runtime destroyed before its engine
    assert cudart.errors == []  # every free matched a live allocation of its pool, nothing freed twice
    assert cudart.live("memory") == 0 and cudart.live("streams") == 0 and cudart.live("events") == 0


def test_an_engine_whose_io_differs_from_the_spec_is_refused(fake_gpu, models):
    import dataclasses

    from edgeseg.runtime.backends.tensorrt_engine import TensorRTRunner
    from edgeseg.runtime.errors import IntegrityError

    _, cudart = fake_gpu
    engine, _ = _build(models, "fp32")
    spec = models[1]
    for wrong, match in ((dataclasses.replace(spec, output="mask"), r"'mask_logits' is FLOAT, expected UINT8"),
                         (dataclasses.replace(spec, output_name="mask_probs"), r"I/O tensors \['images', 'mask_logits'\]")):
        with pytest.raises(IntegrityError, match=match):
            TensorRTRunner(engine, wrong).activate()
        assert cudart.live("memory") == 0 and cudart.live("streams") == 0  # a failed activate leaves nothing


# --- CUDA graphs (issue 17, B6) ---------------------------------------------------------------------

def test_cuda_graphs_one_context_per_batch_size_thread_local_capture(fake_gpu, models):
    from edgeseg.runtime import Segmenter

    trt, cudart = fake_gpu
    engine, _ = _build(models, "fp32")
    pool = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(4)]
    with Segmenter(engine, backend="tensorrt", cuda_graphs=True) as seg:
        # alternating batch sizes replay graphs captured before another size changed the shapes
        for n in (3, 2, 3, 1, 2, 3):
            masks = seg.predict(pool[:n])
            for a, b in zip(masks, _ort_masks(models, pool[:n])):
                assert np.array_equal(a, b), n
        runner = seg.runner
        assert sorted(runner._graphs) == sorted(runner._contexts) == [1, 2, 3]
        assert len({id(c) for c in runner._contexts.values()}) == 3
        assert cudart.live("graph_execs") == 3 and cudart.live("graphs") == 0  # each cudaGraph_t destroyed
        modes = {c[1][1] for c in cudart.calls if c[0] == "cudaStreamBeginCapture"}
        assert modes == {cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal}
    assert cudart.errors == [] and trt.violations == []
    assert cudart.live("graph_execs") == 0 and cudart.live("memory") == 0


@pytest.mark.parametrize("failing_call", ["warm-up", "capture"])
def test_a_failed_enqueue_around_capture_is_an_error_not_a_bad_graph(fake_gpu, models, monkeypatch, failing_call):
    from edgeseg.runtime.backends.tensorrt_engine import TensorRTRunner

    trt, cudart = fake_gpu
    engine, _ = _build(models, "fp32")
    spec = models[1]
    real = trt.IExecutionContext.execute_async_v3

    def execute(self, stream):  # TensorRT returns False when an enqueue fails
        if cudart.is_capturing(stream) == (failing_call == "capture"):
            return False
        return real(self, stream)

    monkeypatch.setattr(trt.IExecutionContext, "execute_async_v3", execute)
    runner = TensorRTRunner(engine, spec, cuda_graphs=True)
    with runner:
        with pytest.raises(RuntimeError, match="before capturing" if failing_call == "warm-up" else "while capturing"):
            runner.infer(np.zeros(spec.input_shape(2), np.float32))
        assert not cudart.is_capturing(runner.stream) and runner._graphs == {}  # the capture was ended, nothing kept
    assert cudart.live("graphs") == 0 and cudart.live("memory") == 0


def test_the_fake_fails_a_graph_replayed_after_its_context_changed_shape(fake_gpu, models):
    trt, cudart = fake_gpu
    engine_path, _ = _build(models, "fp32")
    spec = models[1]
    runtime = trt.Runtime(trt.Logger())
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    nbytes = int(np.prod(spec.input_shape(4))) * 4
    dev_in, dev_out = cudart.cudaMalloc(nbytes)[1], cudart.cudaMalloc(nbytes)[1]
    context.set_tensor_address("images", dev_in)
    context.set_tensor_address("mask_logits", dev_out)
    stream = cudart.cudaStreamCreate()[1]
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    context.set_input_shape("images", spec.input_shape(2))
    cudart.cudaStreamBeginCapture(stream, mode)
    assert not context.execute_async_v3(stream)  # the first enqueue after a shape change cannot be captured
    cudart.cudaGraphDestroy(cudart.cudaStreamEndCapture(stream)[1])
    assert context.execute_async_v3(stream)  # uncaptured: flushes it
    cudart.cudaStreamBeginCapture(stream, mode)
    assert context.execute_async_v3(stream)
    graph = cudart.cudaStreamEndCapture(stream)[1]
    graph_exec = cudart.cudaGraphInstantiate(graph, 0)[1]
    assert cudart.cudaGraphLaunch(graph_exec, stream)[0] == 0 and cudart.cudaStreamSynchronize(stream)[0] == 0
    context.set_input_shape("images", spec.input_shape(3))  # the same context, another shape
    cudart.cudaGraphLaunch(graph_exec, stream)
    assert cudart.cudaStreamSynchronize(stream)[0] == cudart.cudaError_t.cudaErrorLaunchFailure
    for handle, free in ((graph_exec, cudart.cudaGraphExecDestroy), (graph, cudart.cudaGraphDestroy)):
        free(handle)
    del context, engine, runtime


# --- DLA on TensorRT 11 (issue 17, B5) --------------------------------------------------------------

@pytest.mark.parametrize("fake_gpu", ["11.4.1"], indirect=True)
@pytest.mark.parametrize("precision, onnx_key", [("int8", "int8"), ("fp16", "fp16")])
def test_dla_on_tensorrt_11_4_1_is_strongly_typed_with_gpu_fallback(fake_gpu, models, precision, onnx_key):
    from edgeseg.runtime.backends.tensorrt_engine import TensorRTRunner

    trt, cudart = fake_gpu
    engine, meta = _build(models, precision, dla_core=0)
    build = trt.builds[-1]
    assert build["device"] == "DLA" and build["strongly_typed"] and build["flags"] == ["GPU_FALLBACK"]
    assert "cache_header" not in build and meta["plan"]["onnx"] == models[2][onnx_key] and meta["static_batch"]
    spec = models[1]
    feed = np.random.default_rng(1).standard_normal(spec.input_shape(2)).astype(np.float32)
    got = _runner_logits(engine, spec, feed)
    np.testing.assert_allclose(got, _ort_logits(models[2][onnx_key], feed), atol=1e-5)  # the typed graph runs


@pytest.mark.parametrize("fake_gpu", ["11.3.0", "10.8.0"], indirect=True)
def test_dla_is_refused_where_tensorrt_has_none(fake_gpu, models):
    trt, _ = fake_gpu
    for precision in ("int8", "fp16"):
        with pytest.raises(InputError, match=rf"TensorRT {trt.__version__} (has no DLA|removed)"):
            _build(models, precision, dla_core=0)
    # and the fake agrees: TensorRT itself has no DLA there
    assert not trt.HAS_DLA


# --- what TensorRT's parser takes (issue 17, B12): our rules and the fake parser agree ----------------

def _qdq_model(kind: str):
    """Tiny Q/DQ graphs: what TensorRT parses and what it refuses."""
    from onnx import TensorProto as T, helper, numpy_helper

    x = helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 2, 2])
    y = helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 2, 2])
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    inits, nodes = [scale], []
    if kind in ("fp8-weight", "fp4-weight", "int4-weight", "int8-weight"):
        t = {"fp8-weight": T.FLOAT8E4M3FN, "fp4-weight": T.FLOAT4E2M1, "int4-weight": T.INT4, "int8-weight": T.INT8}[kind]
        inits += [helper.make_tensor("w_q", t, [4, 4, 1, 1], [1.0 if t in (T.FLOAT8E4M3FN, T.FLOAT4E2M1) else 1] * 16),
                  helper.make_tensor("w_zp", t, [], [0])]
        nodes += [helper.make_node("DequantizeLinear", ["w_q", "s", "w_zp"], ["w"], name="dq_w"),
                  helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    elif kind == "per-channel-weight":
        inits += [numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w_f"),
                  numpy_helper.from_array(np.full(4, 0.05, np.float32), "s4"),
                  numpy_helper.from_array(np.zeros(4, np.int8), "zp4")]
        nodes += [helper.make_node("QuantizeLinear", ["w_f", "s4", "zp4"], ["w_q"], axis=0, name="q_w"),
                  helper.make_node("DequantizeLinear", ["w_q", "s4", "zp4"], ["w"], axis=0, name="dq_w"),
                  helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    elif kind == "per-channel-activation":
        inits += [numpy_helper.from_array(np.full(4, 0.05, np.float32), "s4"),
                  numpy_helper.from_array(np.zeros(4, np.int8), "zp4")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s4", "zp4"], ["x_q"], axis=1, name="q_x"),
                  helper.make_node("DequantizeLinear", ["x_q", "s4", "zp4"], ["y"], axis=1, name="dq_x")]
    elif kind in ("constant-zero-point", "nonzero-constant-zero-point"):
        value = 0 if kind == "constant-zero-point" else 3
        nodes += [helper.make_node("Constant", [], ["zp"], value=helper.make_tensor("zpv", T.INT8, [], [value]), name="zp_c"),
                  helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["y"], name="dq_x")]
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("kind, refused", [
    ("int8-weight", None), ("fp8-weight", None), ("fp4-weight", None), ("int4-weight", None),
    ("per-channel-weight", None), ("constant-zero-point", None),
    ("nonzero-constant-zero-point", "zero-point zp is INT8 non-zero"),
    ("per-channel-activation", "4 scales on the activation x"),
])
def test_quantized_types_zero_points_and_per_channel_scales(fake_gpu, tmp_path, kind, refused):
    import onnx

    from edgeseg.export.trt_rules import tensorrt_problems

    trt, _ = fake_gpu
    model = _qdq_model(kind)
    onnx.checker.check_model(model, full_check=True)
    problems = tensorrt_problems(model)
    assert (problems == []) if refused is None else any(refused in p for p in problems), problems
    path = tmp_path / f"{kind}.onnx"
    onnx.save(model, str(path))
    parser = trt.OnnxParser(trt.Builder(trt.Logger()).create_network(0), trt.Logger())
    assert parser.parse_from_file(str(path)) is (refused is None), [parser.get_error(i) for i in range(parser.num_errors)]


# --- Triton's edgeseg_trt model takes a GPU engine only (issue 17, B11) ----------------------------

def test_triton_plan_is_never_a_static_dla_engine(fake_gpu, exported, tmp_path):  # noqa: F811
    from edgeseg.export.bundle import write_bundle
    from edgeseg.export.engine import build_engine, capabilities, plan_build, profile_shapes
    from edgeseg.export.triton import write_repository
    from edgeseg.runtime.bundle import Bundle

    trt, _ = fake_gpu
    cfg, _, run_dir, _, _, _, _ = exported
    bundle = tmp_path / "bundle"
    write_bundle(cfg, run_dir / "export", bundle, None, allow_over_budget=True)
    spec = Bundle(bundle).spec
    files = {"fp32": str(bundle / "model.onnx"), "int8": str(bundle / "model.int8.onnx"),
             "cache": str(bundle / "calibration.cache")}
    caps = capabilities(trt.__version__)

    def build(dla_core, batches):
        build_engine(plan_build(caps, "int8", files, dla_core), caps,
                     profile_shapes(spec.input_layout, spec.image_size, *batches), spec.to_dict(), bundle, 64,
                     device_build=True)

    mb = spec.max_batch
    build(0, (mb, mb, mb))  # a DLA engine: one static batch size
    out = write_repository(bundle, tmp_path / "repo-dla-only")
    assert not out["engine_included"] and not (tmp_path / "repo-dla-only" / "edgeseg_trt" / "1" / "model.plan").exists()
    build(-1, (mb, spec.opt_batch))  # a GPU engine for batch 1..max
    out = write_repository(bundle, tmp_path / "repo")
    plan = tmp_path / "repo" / "edgeseg_trt" / "1" / "model.plan"
    assert out["engine_included"] and plan.read_bytes() == (bundle / "model.int8.device.engine").read_bytes()
    config = (tmp_path / "repo" / "edgeseg_trt" / "config.pbtxt").read_text()
    assert f"built by TensorRT {trt.__version__}" in config and f"whose TensorRT is {trt.__version__}" in config
