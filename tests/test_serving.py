"""Serving beyond one process: the Triton repository (against a real tritonserver on 127.0.0.1) and DeepStream."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading

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
    write_repository(bundle, out, max_batch=4, instances=1, max_queue_delay_us=20000)
    return out


def test_every_config_parses_with_tritons_own_schema(repository):
    from edgeseg.export.triton import validate_config

    configs = {p.parent.name: validate_config(p.read_text(), str(p)) for p in repository.glob("*/config.pbtxt")}
    assert set(configs) == {"edgeseg", "edgeseg_trt", "edgeseg_onnx", "edgeseg_preprocess", "edgeseg_postprocess",
                            "edgeseg_gpu"}
    cpu = configs["edgeseg"]
    assert cpu.backend == "python" and cpu.max_batch_size == 4 and cpu.dynamic_batching.max_queue_delay_microseconds == 20000
    assert [i.name for i in cpu.input] == ["IMAGE"] and list(cpu.input[0].dims) == [-1, -1, 3]
    assert cpu.instance_group[0].count == 1
    assert configs["edgeseg_trt"].platform == "tensorrt_plan"
    assert configs["edgeseg_onnx"].optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
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


def test_deepstream_config_keys_and_arithmetic(bundle, tmp_path):
    from edgeseg.export.deepstream import NVINFER_KEYS, read_config, write_config
    from edgeseg.runtime.bundle import Bundle
    from edgeseg.runtime.preprocess import normalise_batch

    out = write_config(bundle, tmp_path, batch_size=2)
    keys = read_config(tmp_path / "config_infer_edgeseg.txt")
    assert set(keys) <= NVINFER_KEYS
    assert keys["network-type"] == "2" and keys["net-scale-factor"] == "1.0" and keys["offsets"] == "0;0;0"
    assert keys["output-blob-names"] == "mask_logits" and keys["batch-size"] == "2" and keys["num-detected-classes"] == "1"
    assert float(keys["segmentation-threshold"]) == pytest.approx(0.0)  # logit(0.5): the output is logits
    assert keys["network-mode"] == "1" and (tmp_path / keys["int8-calib-file"]).is_file()
    # nvinfer feeds float NCHW RGB in [0, 255]: the DeepStream ONNX on raw pixels equals the model on normalised ones
    spec = Bundle(bundle).spec
    raw = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ds = ort.InferenceSession(out["onnx"], providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    got = ds.run(None, {ds.get_inputs()[0].name: raw.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    want = ref.run(None, {"images": normalise_batch(raw, spec.mean, spec.std)})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(InputError, match=r"--batch-size must be in 1\.\.4"):
        write_config(bundle, tmp_path / "x", batch_size=9)


def _images(sizes, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def test_tritonserver_is_found_without_importing_pytriton(monkeypatch):
    """`make setup` installs nvidia-pytriton with --no-deps, so its package cannot be imported (its
    pure-Python dependencies such as typing_inspect are missing); the server binary must be found anyway."""
    from edgeseg.export.triton import PYTRITON_INSTALL, find_tritonserver

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
    from edgeseg.export.triton import TritonServer, find_tritonserver
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
    assert server.process.poll() is not None  # reaped
