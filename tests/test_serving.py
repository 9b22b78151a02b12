"""Serving beyond one process: the Triton repository (against a real tritonserver on 127.0.0.1) and DeepStream."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from edgeseg.runtime.errors import InputError
from tests.test_export import exported  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def bundle(exported, tmp_path_factory):  # noqa: F811
    from edgeseg.export.bundle import write_bundle

    cfg, _, run_dir, _, _, _, _ = exported
    out = tmp_path_factory.mktemp("serving") / "bundle"
    write_bundle(cfg, run_dir / "export", out, None, allow_over_budget=True)
    return out


@pytest.fixture(scope="module")
def repository(bundle, tmp_path_factory):
    from edgeseg.export.triton import write_repository

    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(bundle, out, max_batch=4, instances=1, max_queue_delay_us=20000, preferred_batch=[2, 4])
    return out


def test_every_config_parses_with_tritons_own_schema(repository):
    from edgeseg.export.triton import validate_config

    configs = {p.parent.name: validate_config(p.read_text(), str(p)) for p in repository.glob("*/config.pbtxt")}
    assert set(configs) == {"edgeseg", "edgeseg_trt", "edgeseg_onnx", "edgeseg_preprocess", "edgeseg_postprocess",
                            "edgeseg_gpu"}
    cpu = configs["edgeseg"]
    assert cpu.backend == "python" and cpu.max_batch_size == 4 and cpu.dynamic_batching.max_queue_delay_microseconds == 20000
    assert list(cpu.dynamic_batching.preferred_batch_size) == [2, 4]
    assert [i.name for i in cpu.input] == ["IMAGE"] and list(cpu.input[0].dims) == [-1, -1, 3]
    assert cpu.instance_group[0].count == 1
    assert configs["edgeseg_trt"].platform == "tensorrt_plan"
    accelerator = configs["edgeseg_onnx"].optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt"
    # the int8 bundle's Q/DQ ONNX needs trt_int8_enable, i.e. precision_mode INT8 in Triton's backend, and one
    # explicit profile for every batch the dynamic batcher forms (1..max_batch), or each new size rebuilds
    from edgeseg.export.triton import ORT_TRT_ACCELERATOR_PARAMETERS

    params = dict(accelerator.parameters)
    assert set(params) <= ORT_TRT_ACCELERATOR_PARAMETERS  # the backend refuses any other key
    assert params["precision_mode"] == "INT8"
    assert (params["trt_profile_min_shapes"], params["trt_profile_opt_shapes"], params["trt_profile_max_shapes"]) == (
        "images:1x3x64x64", "images:2x3x64x64", "images:4x3x64x64")
    assert "TensorRT version that built it" in (repository / "edgeseg_trt" / "config.pbtxt").read_text()
    assert [s.model_name for s in configs["edgeseg_gpu"].ensemble_scheduling.step] == [
        "edgeseg_preprocess", "edgeseg_trt", "edgeseg_postprocess"]
    assert (repository / "edgeseg" / "1" / "bundle" / "manifest.json").is_file()
    with pytest.raises(InputError, match="not a valid Triton model config"):
        validate_config('name: "x"\nmax_batch: 4\n')  # an unknown field
    with pytest.raises(InputError, match="not a valid Triton model config"):
        validate_config('name: "x"\nmax_batch_size: "four"\n')  # a wrong type


def test_repository_refuses_bad_options(bundle, tmp_path):
    from edgeseg.export.triton import write_repository

    with pytest.raises(InputError, match=r"--max-batch must be in 1\.\.4"):
        write_repository(bundle, tmp_path / "r", max_batch=64)
    with pytest.raises(InputError, match="--instances must be >= 1"):
        write_repository(bundle, tmp_path / "r", instances=0)
    with pytest.raises(InputError, match=r"--preferred-batch sizes must be in 1\.\.4"):
        write_repository(bundle, tmp_path / "r", preferred_batch=[4, 8])
    assert not (tmp_path / "r").exists()  # nothing half-written


class _FakeBackendUtils:
    """A stand-in for Triton's ``triton_python_backend_utils`` (which exists only inside Triton's stub):
    requests are dicts of numpy arrays, tensors and responses keep what they were given."""

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        @classmethod
        def from_dlpack(cls, name, capsule):
            return cls(name, np.from_dlpack(capsule))

    class TritonError:
        def __init__(self, message):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.outputs = {t.name: t.array for t in output_tensors or []}
            self.error = error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request[name]


def _python_model(monkeypatch, repository, name: str):
    """The repository's ``<name>/1/model.py``, imported against the stand-in utils and initialised as Triton would."""
    import json

    from google.protobuf import json_format

    from edgeseg.export.triton import validate_config

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _FakeBackendUtils)
    for mod in [m for m in sys.modules if m.startswith("edgeseg.export.triton_models.")]:
        monkeypatch.delitem(sys.modules, mod)  # re-imported against this stand-in
    path = repository / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"triton_model_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = validate_config((repository / name / "config.pbtxt").read_text())
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                      "model_repository": str(repository / name), "model_version": "1"})
    return module, model


def test_the_python_models_are_the_modules_that_tests_import_and_run(repository, bundle, monkeypatch):
    from edgeseg.export.triton import MODELS_DIR, PYTHON_MODELS
    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.bundle import Bundle

    for name, module in PYTHON_MODELS.items():  # the repository's model.py is the package's module, byte for byte
        assert (repository / name / "1" / "model.py").read_bytes() == (MODELS_DIR / module).read_bytes()
    pool = _images([(48, 64), (64, 64), (80, 40)], 3, seed=1)
    with Segmenter(bundle, backend="onnxruntime-cpu") as seg:
        expected = [seg.predict([img])[0] for img in pool]

    # edgeseg (CPU): the requests of one batch come back as their own masks; a bad request fails alone
    _, cpu = _python_model(monkeypatch, repository, "edgeseg")
    try:
        responses = cpu.execute([{"IMAGE": img[None]} for img in pool] + [{"IMAGE": np.zeros((1, 8, 8, 3), np.float32)}])
    finally:
        cpu.finalize()
    for response, mask in zip(responses, expected):
        assert response.error is None and np.array_equal(response.outputs["MASK"][0], mask)
    assert "IMAGE must be uint8 RGB" in responses[-1].error.message

    # the GPU ensemble's CPU ends around the bundle's CPU model give the same masks
    _, pre = _python_model(monkeypatch, repository, "edgeseg_preprocess")
    _, post = _python_model(monkeypatch, repository, "edgeseg_postprocess")
    session = ort.InferenceSession(str(Bundle(bundle).file("int8-cpu")), providers=["CPUExecutionProvider"])
    for img, mask in zip(pool, expected):
        (prepared,) = pre.execute([{"IMAGE": img[None]}])
        logits = session.run(None, {session.get_inputs()[0].name: prepared.outputs["INPUT"]})[0]
        (response,) = post.execute([{"LOGITS": logits, "PLACEMENT": prepared.outputs["PLACEMENT"]}])
        assert response.error is None and np.array_equal(response.outputs["MASK"][0], mask)


def _nvinfer_segmentation(output: np.ndarray, threshold: float) -> np.ndarray:
    """nvinfer's default semantic-segmentation parser on (B, C, H, W): per pixel the class whose value is the
    largest and above the threshold, starting from -1; -1 (no class) where none is."""
    best = np.full(output.shape[:1] + output.shape[2:], -1.0, np.float32)
    cls = np.full(best.shape, -1, np.int32)
    for c in range(output.shape[1]):
        win = (output[:, c] > best) & (output[:, c] > threshold)
        cls[win], best[win] = c, output[:, c][win]
    return cls


def _with_threshold(bundle, tmp_path, threshold):
    """A copy of the bundle whose spec asks for another threshold (the manifest is not among the hashed files)."""
    import json

    copy = tmp_path / f"bundle-t{threshold}"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["spec"]["threshold"] = threshold
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_deepstream_config_keys_and_arithmetic(bundle, tmp_path):
    from edgeseg.export.deepstream import NVINFER_KEYS, read_config, write_config
    from edgeseg.runtime.bundle import Bundle
    from edgeseg.runtime.pipeline import finish
    from edgeseg.runtime.preprocess import Placement, normalise_batch

    out = write_config(bundle, tmp_path, batch_size=2)
    keys = read_config(tmp_path / "config_infer_edgeseg.txt")
    assert set(keys) <= NVINFER_KEYS
    assert keys["network-type"] == "2" and keys["net-scale-factor"] == "1.0" and keys["offsets"] == "0;0;0"
    assert keys["output-blob-names"] == "mask_probs" and keys["batch-size"] == "2" and keys["num-detected-classes"] == "1"
    assert float(keys["segmentation-threshold"]) == 0.5  # a probability, never a (possibly negative) logit
    assert keys["network-mode"] == "1" and (tmp_path / keys["int8-calib-file"]).is_file()
    # nvinfer feeds float NCHW RGB in [0, 255]: the DeepStream ONNX on raw pixels gives the model's probabilities
    spec = Bundle(bundle).spec
    raw = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ds = ort.InferenceSession(out["onnx"], providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in ds.get_outputs()] == ["mask_probs"]
    got = ds.run(None, {ds.get_inputs()[0].name: raw.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    logits = ref.run(None, {"images": normalise_batch(raw, spec.mean, spec.std)})[0]
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-logits)), atol=1e-5)
    with pytest.raises(InputError, match=r"--batch-size must be in 1\.\.4"):
        write_config(bundle, tmp_path / "x", batch_size=9)

    # at a threshold below 0.5 (a negative logit, which nvinfer refuses), nvinfer's own parsing rule on
    # the DeepStream output gives the runtime's masks
    low = _with_threshold(bundle, tmp_path, 0.3)
    low_out = write_config(low, tmp_path / "low", batch_size=2)
    assert float(read_config(tmp_path / "low" / "config_infer_edgeseg.txt")["segmentation-threshold"]) == 0.3
    probs = ort.InferenceSession(low_out["onnx"], providers=["CPUExecutionProvider"]).run(
        None, {ds.get_inputs()[0].name: raw.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    nvinfer = _nvinfer_segmentation(probs, 0.3) == 0
    low_spec = Bundle(low).spec
    placements = [Placement((64, 64), (64, 64), 0, 0, 64, 64)] * 2
    runtime = np.stack(finish(logits, placements, low_spec)).astype(bool)
    assert (nvinfer != runtime).mean() < 1e-3 and runtime.any()


def test_deepstream_int8_follows_the_target_tensorrt(bundle, tmp_path):
    import onnx

    from edgeseg.export.deepstream import read_config, write_config
    from edgeseg.export.trt_cache import read_cache

    # TensorRT 10: implicit INT8 from a cache whose header is that version's, with only the DeepStream ONNX's tensors
    out = write_config(bundle, tmp_path / "t10", trt_version="10.7.0")
    header, scales = read_cache(tmp_path / "t10" / "calibration.cache")
    g = onnx.load(out["onnx"]).graph
    names = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    assert header == "TRT-100700-EntropyCalibration2" and scales and set(scales) <= names
    assert out["calibration_tensors"] == len(scales)
    # TensorRT 11 has no implicit INT8: FP16, no calibration file, and the config says why
    out = write_config(bundle, tmp_path / "t11", trt_version="11.4.1")
    keys = read_config(tmp_path / "t11" / "config_infer_edgeseg.txt")
    assert keys["network-mode"] == "2" and "int8-calib-file" not in keys and keys["model-engine-file"].endswith("_fp16.engine")
    assert "TensorRT 11.4.1 has no implicit INT8" in (tmp_path / "t11" / "config_infer_edgeseg.txt").read_text()
    assert not (tmp_path / "t11" / "calibration.cache").exists()


def _images(sizes, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def test_tritonserver_is_found_without_importing_pytriton(monkeypatch):
    """`make setup` installs nvidia-pytriton with --no-deps, so its package cannot be imported (its
    pure-Python dependencies such as typing_inspect are missing); the server binary must be found anyway."""
    from edgeseg.export.triton_server import PYTRITON_INSTALL, find_tritonserver

    for name in [m for m in sys.modules if m == "pytriton" or m.startswith("pytriton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "typing_inspect", None)  # as in a fresh venv: `import typing_inspect` fails
    if importlib.util.find_spec("pytriton") is None and shutil.which("tritonserver") is None:
        pytest.fail(f"no tritonserver here, although `make setup` installs one: {PYTRITON_INSTALL}")
    binary = find_tritonserver()
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert "pytriton" not in sys.modules  # located, never imported


def test_a_real_triton_server_serves_the_bundle(repository, bundle, tmp_path):
    # `make setup` installs the client (dev extra) and the server (nvidia-pytriton): a missing one is a
    # broken set-up, reported as a failure with the line that installs it, never a skip.
    try:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient
    except ImportError as e:
        pytest.fail(f"tritonclient is missing ({e}): pip install 'tritonclient[all]>=2.40' (make setup installs it)")
    from edgeseg.export.triton_server import TritonServer, find_tritonserver
    from edgeseg.runtime.errors import BackendUnavailableError

    try:
        find_tritonserver()
    except BackendUnavailableError as e:
        pytest.fail(str(e))

    from edgeseg.runtime import Segmenter

    sizes = [(48, 64), (64, 64), (80, 40)]
    pool = _images(sizes, 12)
    with Segmenter(bundle, backend="onnxruntime-cpu") as seg:
        expected = [seg.predict([img])[0] for img in pool]

    def infer(client, module, image):
        x = module.InferInput("IMAGE", [1, *image.shape], "UINT8")
        x.set_data_from_numpy(image[None])
        return client.infer("edgeseg", [x], outputs=[module.InferRequestedOutput("MASK")]).as_numpy("MASK")[0]

    with TritonServer(repository, tmp_path / "work") as server:
        results, errors = {}, []

        def worker(t, protocol):
            module = httpclient if protocol == "http" else grpcclient
            client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
            try:
                for r in range(50):  # bounded: 50 requests per thread
                    k = (t * 50 + r) % len(pool)
                    results[(protocol, t, r)] = (k, infer(client, module, pool[k]))
            except Exception as e:  # reported below, never lost
                errors.append(repr(e))
            finally:
                client.close()

        threads = [threading.Thread(target=worker, args=(t, p)) for p in ("http", "grpc") for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        assert not errors, errors[:3]
        assert len(results) == 2 * 8 * 50  # none lost
        mismatched = [key for key, (k, mask) in results.items() if not np.array_equal(mask, expected[k])]
        assert not mismatched, f"{len(mismatched)} masks differ from Segmenter.predict, e.g. {mismatched[:3]}"
        # the server's counter can trail the responses the clients already hold (seen once on a loaded machine:
        # 799 after all 800 answers came back right), so it is read until it has caught up (bounded: 10 s)
        deadline = time.monotonic() + 10
        metrics = server.metrics()
        while metrics["nv_inference_count"] < 800 and time.monotonic() < deadline:
            time.sleep(0.2)
            metrics = server.metrics()
        assert metrics["nv_inference_count"] >= 800
        assert metrics["nv_inference_count"] > metrics["nv_inference_exec_count"]  # requests were batched

        # bad input: a clear error to the client, and the server keeps serving
        client = httpclient.InferenceServerClient(server.http_url)
        for shape, dtype, match in (([1, 48, 64], "UINT8", "IMAGE"), ([1, 48, 64, 3], "FP32", "UINT8|uint8|data type"),
                                    ([1, 0, 0, 3], "UINT8", "empty")):
            x = httpclient.InferInput("IMAGE", shape, dtype)
            x.set_data_from_numpy(np.zeros(shape, np.uint8 if dtype == "UINT8" else np.float32))
            with pytest.raises(Exception, match=match):
                client.infer("edgeseg", [x])
        assert np.array_equal(infer(client, httpclient, pool[0]), expected[0])
        client.close()

        # system shared memory (the serving benchmark's client): the frame and the mask never cross the socket
        from benchmarks.bench_serving import triton_sender

        same = [k for k, img in enumerate(pool) if img.shape[:2] == sizes[0]]
        send, close = triton_sender(grpcclient, server.grpc_url, (*sizes[0], 3), shm=True)()
        try:
            for k in same[:4]:
                assert np.array_equal(send(pool[k])[0], expected[k])
        finally:
            close()
        status = grpcclient.InferenceServerClient(server.grpc_url).get_system_shared_memory_status(as_json=True)
        assert not status.get("regions"), status  # every region unregistered again
    assert server.process.poll() is not None  # reaped


def test_serving_memory_is_measured_per_process_without_torch(bundle):
    """The memory benchmark's children: each its own process, the runtime's without torch, peaks read from /proc."""
    from benchmarks.memory import serving_memory

    out = serving_memory(bundle, batch=2)
    for kind in ("runtime", "bare"):
        p = out["processes"][kind]
        assert p["kind"] == kind and p["torch_imported"] is False, kind
        assert 0 < p["rss_start_mb"] <= p["rss_after_warmup_mb"] <= p["peak_rss_mb"], p
    pids = {out["processes"][kind]["pid"] for kind in ("runtime", "bare")}
    assert len(pids) == 2 and os.getpid() not in pids  # two fresh processes, neither this (torch-laden) one
    # each headline figure is its own child's peak, read from that child's /proc
    assert out["runtime_peak_rss_mb"] == out["processes"]["runtime"]["peak_rss_mb"]
    assert out["bare_session_peak_rss_mb"] == out["processes"]["bare"]["peak_rss_mb"]
    assert out["processes"]["runtime"]["model"] == out["processes"]["bare"]["model"]  # the same model file


def test_the_server_lookup_keeps_its_documented_import_path():
    """`from edgeseg.export.triton import find_tritonserver` (the set-up check uses it) finds the same binary."""
    from edgeseg.export import triton, triton_server

    assert triton.find_tritonserver is triton_server.find_tritonserver and triton.find_tritonserver().is_file()
