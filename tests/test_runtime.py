"""Runtime: torch-free import, pre/post-processing, backends, Segmenter, the micro-batching queue, CLIs."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgeseg.runtime.errors import BackendUnavailableError, InputError, IntegrityError
from edgeseg.runtime.preprocess import fit_image, fit_mask, normalise_batch, place
from edgeseg.runtime.spec import ModelSpec
from tests.conftest import run_cli, write_config


def test_importing_the_runtime_does_not_import_torch(tmp_path):
    # Run outside the repository so that only the installed `edgeseg` namespace can be imported.
    code = ("import sys, edgeseg, edgeseg.cli, edgeseg.runtime, edgeseg.runtime.cli, edgeseg.runtime.segmenter, "
            "edgeseg.runtime.profiler, edgeseg.runtime.backends.onnxrt, edgeseg.runtime.backends.tensorrt_engine, "
            "edgeseg.runtime.bundle; from edgeseg.runtime import Segmenter; "
            "bad = [m for m in ('torch', 'edgeseg.distill', 'edgeseg.calibration', 'edgeseg.export', 'timm', "
            "'segmentation_models_pytorch', 'onnx') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --- pre- and post-processing --------------------------------------------------------------------

def test_letterbox_placement_by_hand():
    p = place((100, 200), (64, 64), "letterbox")
    assert (p.top, p.left, p.height, p.width) == (16, 0, 32, 64)
    p = place((300, 150), (64, 64), "letterbox")
    assert (p.top, p.left, p.height, p.width) == (0, 16, 64, 32)
    assert place((7, 9), (64, 64), "stretch").height == 64
    with pytest.raises(InputError, match=r"zero size"):
        place((0, 5), (64, 64))


@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
def test_the_inverse_is_exact(mode):
    h, w = 90, 160
    mask = np.zeros((h, w), np.uint8)
    mask[20:70, 30:120] = 1
    img = np.stack([mask * 200] * 3, axis=-1).astype(np.uint8)
    from edgeseg.runtime.pipeline import finish

    fitted, p = fit_image(img, (64, 64), mode, pad_value=(0, 0, 0))
    probs = fit_mask(mask, p).astype(np.float32)[None, None]  # 1 inside, 0 outside, at model size
    back = finish(probs, [p], ModelSpec(image_size=(64, 64), output="probabilities"))[0].astype(bool)
    assert back.shape == (h, w)
    assert (back != mask.astype(bool)).mean() < 0.02  # only boundary pixels may move
    if mode == "letterbox":
        assert (fitted[:p.top] == 0).all() and p.top > 0  # the padding is cropped away exactly


def test_normalise_batch_matches_the_formula():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalise_batch(batch, mean, std)
    ref = ((batch / 255.0 - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2)
    assert out.shape == (2, 3, 4, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)


# --- a tiny exported model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tiny_run, tmp_path_factory):
    """(ONNX path, torch student) exported with max batch 4; the student is random but fixed."""
    import torch

    from edgeseg.distill.models import build_model
    from edgeseg.export.onnx_model import export_onnx

    _, base = tiny_run
    d = tmp_path_factory.mktemp("rt")
    from edgeseg.distill.config import load_config
    from edgeseg.export.config import Config

    cfg = load_config(write_config(d, export={"max_batch": 4, "opt_batch": 2}), Config)
    torch.manual_seed(3)
    student = build_model(cfg.student).eval()
    with torch.no_grad():
        student.segmentation_head[0].bias.fill_(0.05)  # masks neither empty nor full
    export_onnx(cfg, student, d)
    return d / "model.onnx", student


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _torch_masks(student, spec, images):
    """The reference: the same pipeline with the torch model (tests only)."""
    import torch

    from edgeseg.runtime.pipeline import BatchBuffers, finish, prepare

    feed, placements = prepare(images, spec, BatchBuffers(spec))
    with torch.no_grad():
        out = student(torch.from_numpy(feed.copy())).numpy()
    return finish(out, placements, spec)


def test_segmenter_masks_match_the_torch_reference(tiny_onnx):
    from edgeseg.runtime import Segmenter

    path, student = tiny_onnx
    imgs = _images([(64, 64), (100, 50), (31, 77), (200, 120), (64, 64), (10, 10)])
    with Segmenter(path, backend="onnxruntime-cpu") as seg:
        assert (seg.backend, seg.device) == ("onnxruntime-cpu", "cpu")
        masks = seg.predict(imgs)  # 6 images, max batch 4: two model calls
    ref = _torch_masks(student, ModelSpec.from_onnx(path), imgs)
    for img, m, r in zip(imgs, masks, ref):
        assert m.shape == img.shape[:2] and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert (m != r).mean() < 0.001


def test_segmenter_converts_odd_images_and_refuses_bad_input(tiny_onnx):
    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx
    gray = np.full((40, 40), 128, np.uint8)
    rgba = np.full((40, 40, 4), 128, np.uint8)
    deep = np.full((40, 40, 3), 128 * 257, np.uint16)
    with Segmenter(path) as seg:
        a, b, c = seg.predict([gray, rgba, deep])
        assert np.array_equal(a, b) and np.array_equal(b, c)
        with pytest.raises(InputError, match=r"empty list"):
            seg.predict([])
        with pytest.raises(InputError, match=r"image 0: image has zero size"):
            seg.predict([np.zeros((0, 5, 3), np.uint8)])
        with pytest.raises(InputError, match=r"takes a list of images"):
            seg.predict(np.zeros((4, 4, 3), np.uint8))


# --- the backend contract ----------------------------------------------------------------------------

def _backends():
    out = [pytest.param("onnxruntime-cpu", id="onnxruntime-cpu")]
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    out.append(pytest.param("onnxruntime-cuda", id="onnxruntime-cuda",
                            marks=pytest.mark.skipif(not cuda, reason="needs onnxruntime-gpu and a CUDA GPU")))
    return out


@pytest.mark.parametrize("backend", _backends())
def test_every_backend_honours_the_runner_contract(tiny_onnx, backend):
    from edgeseg.runtime.backends.onnxrt import OnnxRuntimeRunner

    path, _ = tiny_onnx
    spec = ModelSpec.from_onnx(path)
    runner = OnnxRuntimeRunner(path, spec, backend.removeprefix("onnxruntime-"))
    x = np.zeros((2, 3, 64, 64), np.float32)
    with pytest.raises(RuntimeError, match=r"inside `with runner:`"):
        runner.infer(x)
    with runner:
        out = runner.infer(x)
        assert out.shape == (2, 1, 64, 64) and out.dtype == np.float32
        assert set(runner.timings_ms) == {"copy_in", "infer", "copy_out"} and runner.timings_ms["infer"] > 0
        with pytest.raises(InputError, match=r"input 'images' got float64 \(2, 3, 64, 64\), expected float32"):
            runner.infer(x.astype(np.float64))
        with pytest.raises(InputError, match=r"expected float32 \(2, 3, 64, 64\)"):
            runner.infer(np.zeros((2, 3, 32, 64), np.float32))
        with pytest.raises(InputError, match=r"batch 5 outside 1..4"):
            runner.infer(np.zeros((5, 3, 64, 64), np.float32))


def test_unavailable_backends_say_what_to_install(tiny_onnx):
    import onnxruntime as ort

    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailableError, match=r"install onnxruntime-gpu"):
            Segmenter(path, backend="onnxruntime-cuda")
    with pytest.raises(InputError, match=r"backend must be auto or one of"):
        Segmenter(path, backend="tflite")


def test_a_provider_that_silently_fell_back_is_refused(tiny_onnx, monkeypatch):
    # ONNX Runtime drops a provider it cannot start and runs on the next one (here the CPU) with
    # only a warning. Claim CUDA is available so the real session takes that path.
    import onnxruntime as ort

    from edgeseg.runtime.backends.onnxrt import OnnxRuntimeRunner, trt_profile
    from edgeseg.runtime.spec import ModelSpec

    path, _ = tiny_onnx
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is really available here")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*real, "CUDAExecutionProvider"])
    runner = OnnxRuntimeRunner(path, None, provider="cuda")
    with pytest.raises(BackendUnavailableError, match=r"could not start CUDAExecutionProvider here \(it fell back to "
                                                      r"CPUExecutionProvider\)"):
        runner.activate()
    spec = ModelSpec(image_size=(64, 96), max_batch=8, opt_batch=4)
    assert trt_profile(spec) == {"trt_profile_min_shapes": "images:1x3x64x96",
                                 "trt_profile_opt_shapes": "images:4x3x64x96",
                                 "trt_profile_max_shapes": "images:8x3x64x96"}


def test_engine_for_another_gpu_or_tensorrt_is_refused(tmp_path):
    from edgeseg.runtime.backends.tensorrt_engine import check_engine_compatible

    meta = {"tensorrt_version": "10.3.0", "compute_capability": "8.7", "gpu_name": "Orin", "precision": "int8"}
    check_engine_compatible(meta, "10.3.0", "8.7", "Orin", tmp_path / "m.engine")
    with pytest.raises(IntegrityError, match=r"built for TensorRT 10.3.0 \(this machine has 10.8.0\).*build_engine.py"):
        check_engine_compatible(meta, "10.8.0", "8.7", "Orin", tmp_path / "m.engine")
    with pytest.raises(IntegrityError, match=r"compute capability 8.7 \(Orin\); this one is 9.0 \(H100\)"):
        check_engine_compatible(meta, "10.3.0", "9.0", "H100", tmp_path / "m.engine")


# --- the micro-batching queue ------------------------------------------------------------------------

def test_queue_under_load_answers_every_request_correctly(tiny_onnx):
    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx
    sizes = [(48 + 7 * (i % 5), 40 + 11 * (i % 7)) for i in range(40)]
    pool = _images(sizes, seed=1)
    with Segmenter(path, max_wait_ms=20, queue_size=16) as seg:
        expected = seg.predict(pool)  # single-call reference
        results: dict[tuple[int, int], np.ndarray] = {}
        lock = threading.Lock()

        def caller(t: int):
            futures = [(t, r, seg.submit(pool[(t * 200 + r) % len(pool)])) for r in range(200)]
            for tt, r, f in futures:
                m = f.result(timeout=120)
                with lock:
                    results[(tt, r)] = m

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(caller, range(8)))
        assert time.monotonic() - t0 < 300
        assert len(results) == 8 * 200  # none lost, none duplicated
        for (t, r), m in results.items():
            assert np.array_equal(m, expected[(t * 200 + r) % len(pool)])
        assert seg.mean_batch_size > 1.0


def test_close_finishes_or_fails_pending_requests(tiny_onnx):
    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx
    img = _images([(64, 64)])[0]
    seg = Segmenter(path, max_wait_ms=50)
    futures = [seg.submit(img) for _ in range(10)]
    seg.close()
    assert all(f.result(timeout=30).shape == (64, 64) for f in futures)
    with pytest.raises(RuntimeError, match=r"segmenter is closed"):
        seg.submit(img)

    from edgeseg.runtime.batcher import MicroBatcher

    gate = threading.Event()
    b = MicroBatcher(lambda items: (gate.wait(10), [1] * len(items))[1], max_batch=1, max_wait_ms=0)
    first = b.submit(np.zeros(1))
    time.sleep(0.1)  # the worker now holds `first`
    pending = [b.submit(np.zeros(1)) for _ in range(3)]
    closer = threading.Thread(target=b.close, kwargs={"cancel": True})
    closer.start()
    time.sleep(0.1)
    gate.set()
    closer.join(10)
    assert first.result(timeout=10) == 1
    for f in pending:
        with pytest.raises(RuntimeError, match=r"closed before this request ran"):
            f.result(timeout=10)


def test_a_caller_blocked_on_a_full_queue_holds_up_no_one():
    import queue as queue_module

    from edgeseg.runtime.batcher import MicroBatcher
    from edgeseg.runtime.errors import ClosedError

    gate = threading.Event()
    b = MicroBatcher(lambda items: (gate.wait(20), list(items))[1], max_batch=1, max_wait_ms=0, queue_size=1)
    first = b.submit(1)
    deadline = time.monotonic() + 5
    while b._pending and time.monotonic() < deadline:  # the worker takes `first` and blocks on the gate
        time.sleep(0.01)
    queued = b.submit(2)  # fills the queue
    outcome = {}

    def blocked():
        try:
            b.submit(3)  # no timeout: waits for room
            outcome["blocked"] = "submitted"
        except ClosedError as e:
            outcome["blocked"] = e

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    with pytest.raises(queue_module.Full):
        b.submit(4, timeout=0.2)  # its own timeout holds although another caller is blocked
    assert time.monotonic() - t0 < 5
    closer = threading.Thread(target=b.close, kwargs={"cancel": True})
    closer.start()
    t.join(5)
    assert not t.is_alive() and isinstance(outcome["blocked"], ClosedError)  # woken by close, told why
    assert "closed" in str(outcome["blocked"])
    with pytest.raises(ClosedError, match="closed before this request ran"):
        queued.result(timeout=5)
    gate.set()
    closer.join(10)
    assert not closer.is_alive() and first.result(timeout=5) == 1


def test_submit_after_close_never_builds_a_new_batcher(tiny_onnx):
    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.errors import ClosedError

    path, _ = tiny_onnx
    img = _images([(64, 64)])[0]
    seg = Segmenter(path)
    seg.close()  # before any submit: there is no batcher yet
    with pytest.raises(ClosedError, match="segmenter is closed; submit"):
        seg.submit(img)
    with pytest.raises(ClosedError, match="segmenter is closed; predict"):
        seg.predict([img])
    assert seg._batcher is None
    seg.close()  # idempotent


def test_a_short_result_list_fails_every_future():
    from edgeseg.runtime.batcher import MicroBatcher

    b = MicroBatcher(lambda items: list(items)[:-1], max_batch=4, max_wait_ms=20)
    fs = [b.submit(i) for i in range(5)]
    for f in fs:
        with pytest.raises(RuntimeError, match=r"returned \d results for a batch of \d"):
            f.result(timeout=10)
    b.close()


def test_batch_errors_reach_every_caller():
    from edgeseg.runtime.batcher import MicroBatcher

    def boom(items):
        raise ValueError("model exploded")

    b = MicroBatcher(boom, max_batch=4, max_wait_ms=20)
    fs = [b.submit(np.zeros(1)) for _ in range(3)]
    for f in fs:
        with pytest.raises(ValueError, match="model exploded"):
            f.result(timeout=10)
    b.close()


# --- CLIs ----------------------------------------------------------------------------------------------

def test_infer_cli_writes_masks_and_skips_non_images(tiny_onnx, tmp_path):
    from PIL import Image

    path, _ = tiny_onnx
    src = tmp_path / "in"
    src.mkdir()
    for i, img in enumerate(_images([(50, 70), (64, 64), (30, 90)])):
        Image.fromarray(img).save(src / f"{i}.png")
    Image.fromarray(np.full((20, 20), 7, np.uint8)).save(src / "gray.png")
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"nope")
    r = run_cli("runtime", "infer", "--bundle", str(path), "--input", str(src), "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 4 and out["skipped"] == 2
    mask = np.asarray(Image.open(tmp_path / "out" / "0.mask.png"))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
    assert (tmp_path / "out" / "gray.overlay.png").is_file()
    assert "skipped 2" in r.stderr


def test_profile_cli_writes_json_and_plot(tiny_onnx, tmp_path):
    path, _ = tiny_onnx
    r = run_cli("runtime", "profile", "--bundle", str(path), "--batch", "1,4", "--iters", "3", "--warmup", "1",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["backend"] == "onnxruntime-cpu" and set(prof["batches"]) == {"1", "4"}
    b4 = prof["batches"]["4"]
    assert b4["p50_ms"] <= b4["p90_ms"] <= b4["p99_ms"] and b4["throughput_ips"] > 0
    assert set(b4["stages_ms"]) == {"preprocess", "copy_in", "infer", "copy_out", "postprocess"}
    assert (tmp_path / "latency.png").stat().st_size > 1000
    r = run_cli("runtime", "profile", "--bundle", str(path), "--batch", "1,9", "--out", str(tmp_path))
    assert r.returncode == 2 and "outside 1..4" in r.stderr and "Traceback" not in r.stderr


def test_runtime_cli_refuses_a_missing_bundle(tmp_path):
    r = run_cli("runtime", "profile", "--bundle", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "does not exist" in r.stderr


def test_long_steps_log_progress_off_a_terminal(caplog):
    import logging

    from edgeseg.runtime.progress import LoggedProgress

    log = logging.getLogger("edgeseg.test.progress")
    with caplog.at_level(logging.INFO, logger="edgeseg.test.progress"):
        assert list(LoggedProgress(range(4), desc="sampling", logger=log, every_s=0.0)) == [0, 1, 2, 3]
        quiet = LoggedProgress(total=10, desc="quiet", logger=log, every_s=3600)
        quiet.update(5)
        quiet.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [l.split(" (")[0] for l in lines] == ["sampling: 1/4", "sampling: 2/4", "sampling: 3/4", "sampling: 4/4"]
    assert "s left" in lines[0]


def test_fast_shrink_stays_close_to_area_averaging():
    import cv2

    from edgeseg.runtime.preprocess import resize_image

    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (0, 0), 2)
    fast = resize_image(frame, (96, 128)).astype(np.float32)
    area = cv2.resize(frame, (128, 96), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert fast.shape == area.shape and np.abs(fast - area).mean() < 1.0
    # at most 2x: exactly one area pass; up: bilinear
    small = frame[:150, :200]
    assert np.array_equal(resize_image(small, (96, 128)), cv2.resize(small, (128, 96), interpolation=cv2.INTER_AREA))
    assert np.array_equal(resize_image(small, (300, 400)), cv2.resize(small, (400, 300), interpolation=cv2.INTER_LINEAR))


def _rss_mib() -> float:
    """This process's resident set now (not the peak), from /proc."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_serving_memory_does_not_grow_with_the_requests_served(tiny_onnx):  # noqa: F811
    """1,000 VGA frames through the queue from 4 callers: RSS after them within 10% of RSS after 100."""
    from concurrent.futures import ThreadPoolExecutor

    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx
    frames = _images([(480, 640)] * 4, seed=5)
    with Segmenter(path, backend="onnxruntime-cpu", threads=1, max_wait_ms=1.0) as seg, \
            ThreadPoolExecutor(4) as callers:
        def serve(n):  # each mask checked and dropped: the test must not hold what it measures
            served = 0
            for i in range(0, n, 5):
                futures = [seg.submit(frames[(i + k) % 4]) for k in range(5)]
                served += sum(f.result(timeout=60).shape == (480, 640) for f in futures)
            return served

        assert sum(callers.map(serve, [25] * 4)) == 100  # buffers, arenas and caches reach their size
        after_100 = _rss_mib()
        assert sum(callers.map(serve, [225] * 4)) == 900
        after_1000 = _rss_mib()
    assert after_1000 <= 1.10 * after_100, f"RSS grew from {after_100:.0f} to {after_1000:.0f} MiB over 900 requests"


# --- the camera-frame fast paths: per-image work across threads, uint8 masks -------------------------

def test_workers_run_every_image_once_and_raise_a_workers_error():
    import threading
    import time

    from edgeseg.runtime.pipeline import Workers

    workers = Workers(3, min_pixels=1)
    seen, names = [], set()

    def one(i):
        seen.append(i)
        names.add(threading.current_thread().name)

    workers.each(one, 8, pixels=10**6)
    assert sorted(seen) == list(range(8))  # three chunks: the first in this thread, the others in the pool
    assert threading.current_thread().name in names and any(n.startswith("edgeseg-pre") for n in names)

    def bad(i):
        if i == 7:  # in the last chunk: a pool thread's error
            raise ValueError("image 7 is bad")

    with pytest.raises(ValueError, match="image 7"):
        workers.each(bad, 8, pixels=10**6)
    done = []

    def first_fails(i):
        if i == 0:  # this thread's chunk fails while the pool's is still at work
            raise ValueError("image 0 is bad")
        time.sleep(0.05)
        done.append(i)

    with pytest.raises(ValueError, match="image 0"):
        workers.each(first_fails, 2, pixels=10**6)
    assert done == [1]  # no chunk outlives the call: it never writes into the next call's buffers
    seen.clear()
    workers.each(one, 8, pixels=100)  # too little work to hand over: all in the caller's thread
    assert sorted(seen) == list(range(8))
    workers.close()
    workers.each(one, 2)  # closed: serial, still correct
    assert Workers(1)._pool is None


def _smooth_logits(n, hw, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    return np.stack([cv2.resize(rng.standard_normal((8, 8)).astype(np.float32) * 6, (hw[1], hw[0]),
                                interpolation=cv2.INTER_CUBIC) for _ in range(n)])[:, None]


def test_float_masks_are_todays_bit_for_bit_in_any_thread():
    """exact masks (the evaluations' path): resize the float crop, threshold; with or without worker threads."""
    import cv2

    from edgeseg.runtime.pipeline import Workers, masks_at_source

    logits = _smooth_logits(5, (64, 64))
    # (1200, 2000): above SCRATCH_MAX_PIXELS, resized without the thread's scratch buffer
    placements = [place(hw, (64, 64)) for hw in ((480, 640), (1080, 1920), (64, 64), (50, 90), (1200, 2000))]
    ref = []
    for s, p in zip(logits[:, 0], placements):  # the formula, written out
        crop = np.ascontiguousarray(s[p.top:p.top + p.height, p.left:p.left + p.width])
        if crop.shape != p.src_hw:
            crop = cv2.resize(crop, (p.src_hw[1], p.src_hw[0]), interpolation=cv2.INTER_LINEAR)
        ref.append((crop > 0).astype(np.uint8))
    for workers in (None, Workers(2, min_pixels=1)):
        for _ in range(2):  # the second call reuses the threads' scratch buffers
            got = masks_at_source(logits, placements, 0.0, workers=workers)
            assert all(g.dtype == np.uint8 and np.array_equal(g, r) for g, r in zip(got, ref))
    assert not np.shares_memory(got[0], got[1])  # every mask its own array


def test_no_thread_keeps_a_scratch_buffer_above_1080p():
    """The float mask path reuses one scratch image per thread up to SCRATCH_MAX_PIXELS (1080p) and keeps none
    for a larger frame: a thread's buffer stays at most 1080 x 1920 floats (8 MiB), whatever it served."""
    import threading

    from edgeseg.runtime import pipeline
    from edgeseg.runtime.pipeline import SCRATCH_MAX_PIXELS, masks_at_source

    logits = _smooth_logits(1, (64, 64))

    def kept_after(*sizes):
        """The scratch buffer a fresh thread holds after exact masks for frames of ``sizes``, in turn."""
        held = {}

        def work():
            for hw in sizes:
                masks_at_source(logits, [place(hw, (64, 64))], 0.0)
            buf = getattr(pipeline._scratch, "buf", None)
            held["shape"] = None if buf is None else buf.shape

        t = threading.Thread(target=work)
        t.start()
        t.join()
        return held["shape"]

    assert SCRATCH_MAX_PIXELS == 1080 * 1920
    assert kept_after((480, 640)) == (480, 640)
    assert kept_after((1080, 1920)) == (1080, 1920)  # at the cap: kept for the next frame
    assert kept_after((1200, 2000)) is None  # above it: OpenCV allocates, the thread keeps nothing
    assert kept_after((480, 640), (1200, 2000)) == (480, 640)  # a large frame does not grow the kept one


@pytest.mark.parametrize("hw", [(480, 640), (1080, 1920), (200, 120)])
def test_uint8_masks_move_only_boundary_pixels_and_few_of_them(hw):
    """The runtime's default mask path against the exact one: a moved pixel lies between source pixels
    on both sides of the cut (provable, docs/runtime.md), and under 0.1% of pixels move, on logits far
    smoother at the boundary than a trained model's (0.055% here; the demo student's: runtime.json)."""
    import cv2

    from edgeseg.runtime.pipeline import QUANT_STEPS, masks_at_source

    logits = _smooth_logits(6, (64, 64), seed=1)
    placements = [place(hw, (64, 64))] * len(logits)
    exact = masks_at_source(logits, placements, 0.0)
    fast = masks_at_source(logits, placements, 0.0, quant_steps=QUANT_STEPS["logits"])
    moved = total = 0
    kernel = np.ones((3, 3), np.uint8)
    for s, p, e, f in zip(logits[:, 0], placements, exact, fast):
        side = (s[p.top:p.top + p.height, p.left:p.left + p.width] > 0).astype(np.uint8)
        mixed = cv2.dilate(side, kernel) != cv2.erode(side, kernel)  # a 3x3 window holds any bilinear footprint
        boundary = cv2.resize(mixed.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
        assert f.dtype == np.uint8 and f.shape == hw and set(np.unique(f)) <= {0, 1}
        assert not ((e != f) & ~boundary).any(), "a pixel away from the boundary moved"
        moved += int((e != f).sum())
        total += e.size
    assert moved / total < 1e-3, f"{moved} of {total} pixels moved"


def test_segmenter_threads_and_mask_paths_agree(tiny_onnx):
    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx
    frames = _images([(480, 640)] * 3 + [(300, 200)], seed=4)
    with Segmenter(path, backend="onnxruntime-cpu", pre_threads=1, exact_masks=True) as serial, \
            Segmenter(path, backend="onnxruntime-cpu", pre_threads=2, exact_masks=True) as threaded, \
            Segmenter(path, backend="onnxruntime-cpu", pre_threads=2) as default:
        a, b, c = serial.predict(frames), threaded.predict(frames), default.predict(frames)
        assert default._workers.threads == 2 and not default.exact_masks
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # threads change nothing
    moved = sum(int((x != z).sum()) for x, z in zip(a, c))
    assert moved / sum(x.size for x in a) < 1e-3
    assert default._workers._pool is None  # closed with the segmenter


def test_the_runtime_leaves_no_thread_spinning_after_a_call(tiny_onnx):
    """ONNX Runtime's intra-op threads spin about 50 ms after each call by default, on the cores the next
    batch's letterboxing needs; the runtime's sessions stop them when the call returns (CPU time, not wall)."""
    import time

    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx
    frames = _images([(240, 320)] * 4, seed=5)
    with Segmenter(path, backend="onnxruntime-cpu", threads=2) as seg:
        assert seg.spin_after_run is False
        for _ in range(3):
            seg.predict(frames)
        c0 = time.process_time()
        time.sleep(0.1)
        idle_cpu_ms = (time.process_time() - c0) * 1000
    assert idle_cpu_ms < 15, f"{idle_cpu_ms:.0f} ms of CPU in 100 ms idle after a call"
