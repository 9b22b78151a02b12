"""Video through the runtime: sources, the pipelined stream, sinks, smoothing, broken input, the demo clip.

Clips are written here with cv2.VideoWriter; a local MJPEG server on 127.0.0.1 plays the network
camera that drops. The model is the tiny real ONNX of test_runtime (random but fixed weights).
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeseg.runtime.errors import InputError
from tests.conftest import run_cli
from tests.test_runtime import tiny_onnx  # noqa: F401 - the module's tiny exported model, as a fixture


@pytest.fixture(scope="module")
def brightness_onnx(tmp_path_factory) -> Path:
    """A tiny real ONNX segmenter whose masks follow the picture: logits = 4 x the mean normalised channel.

    Its masks change from frame to frame with the content (the random tiny student's are nearly all
    person on these frames), so order, equality and flicker can be checked pixel by pixel.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeseg.runtime.spec import ModelSpec

    spec = ModelSpec(image_size=(64, 64), max_batch=4, opt_batch=2)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1], keepdims=1),
         helper.make_node("Mul", ["mean", "gain"], ["mask_logits"])], "brightness",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("mask_logits", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [numpy_helper.from_array(np.array(4.0, np.float32), "gain")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"edgeseg.io": json.dumps(spec.to_dict())})
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("brightness") / "model.onnx"
    onnx.save(model, str(path))
    return path


def _frames(n: int, hw=(48, 64), seed=0) -> list[np.ndarray]:
    """``n`` RGB frames of a textured scene moving right, so consecutive frames differ a little."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (hw[0], hw[1] + n, 3), dtype=np.uint8), (0, 0), 2)
    return [np.ascontiguousarray(base[:, i:i + hw[1]]) for i in range(n)]


def _write_clip(path: Path, frames: list[np.ndarray], fps: float = 12.0, fourcc: str = "mp4v") -> Path:
    w = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), fps,
                        (frames[0].shape[1], frames[0].shape[0]))
    assert w.isOpened(), f"OpenCV cannot write {fourcc} here"
    for f in frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    return path


def _read_video(path: Path) -> list[np.ndarray]:
    """Every decodable frame of ``path`` (RGB), read to the end: the playable frames, not the header's count."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    assert cap.isOpened(), f"{path} is not playable"
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def test_the_video_modules_import_no_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys, edgeseg.runtime.video, edgeseg.runtime.sources, edgeseg.runtime.sinks, edgeseg.runtime.stream, "
            "edgeseg.runtime.smoothing; bad = [m for m in ('torch', 'edgeseg.distill') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --- sources ----------------------------------------------------------------------------------------

def test_each_kind_of_source_is_recognised(tmp_path):
    from PIL import Image

    from edgeseg.runtime.sources import CaptureSource, ImageSource, open_source

    for i, f in enumerate(_frames(3)):
        Image.fromarray(f).save(tmp_path / f"f{i}.png")
    clip = _write_clip(tmp_path / "clip.mp4", _frames(5))
    assert isinstance(open_source(str(tmp_path)), ImageSource)
    glob_source = open_source(str(tmp_path / "f*.png"))
    assert isinstance(glob_source, ImageSource) and [f.name for f in glob_source] == ["f0", "f1", "f2"]
    assert open_source(str(clip)).kind == "video"
    assert open_source("0").kind == "camera" and open_source("0").name == "camera 0"
    assert open_source("rtsp://10.0.0.9/stream1").kind == "stream"
    assert isinstance(open_source("https://example.com/cam.mjpg"), CaptureSource)
    with pytest.raises(InputError, match="unsupported scheme 'ftp'"):
        open_source("ftp://example.com/a.mp4")
    with pytest.raises(InputError, match="no such file or folder, and not a camera index"):
        open_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(InputError, match="matches no image file"):
        open_source(str(tmp_path / "*.jpg"))
    with open_source(str(clip)) as video:
        frames = list(video)
        assert (video.total, video.fps, video.live) == (5, 12.0, False)
    assert [f.index for f in frames] == list(range(5)) and frames[0].image.shape == (48, 64, 3)


# --- the stream: order, batching, back-pressure, drops ---------------------------------------------

def test_stream_returns_predicts_masks_in_order_across_size_changes(brightness_onnx):
    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.stream import FrameStream

    path = brightness_onnx
    # a stream whose frame size changes mid-way (twice), in a generator: nothing is materialised
    frames = _frames(10, (48, 64)) + _frames(7, (90, 50), seed=1) + _frames(6, (48, 64), seed=2)
    with Segmenter(path, backend="onnxruntime-cpu", threads=1) as seg:
        expected = seg.predict(frames)
        stream = FrameStream(seg, (f for f in frames), max_wait_ms=50.0)
        got = list(stream)
        one_by_one = list(seg.stream(iter(frames), max_batch=1, smooth=0.0))
    assert [f.index for f, _ in got] == list(range(len(frames)))
    assert all(np.array_equal(m, e) for (_, m), e in zip(got, expected))
    assert all(np.array_equal(m, e) for m, e in zip(one_by_one, expected)) and len(one_by_one) == len(frames)
    assert [m.shape for _, m in got] == [f.shape[:2] for f in frames]
    assert len({m.tobytes() for m in expected}) == len(frames)  # every mask its own: order is checked
    s = stream.stats.summary()
    assert s["frames"] == len(frames) and s["dropped"] == 0 and s["mean_batch"] > 1  # micro-batched
    assert 0 < s["latency_p50_ms"] <= s["latency_p99_ms"]


def test_a_slow_consumer_holds_the_reader_back(tiny_onnx):
    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.stream import FrameStream

    path, _ = tiny_onnx
    pulled = 0
    frames = _frames(40)

    def source():
        nonlocal pulled
        for f in frames:
            pulled += 1
            yield f

    with Segmenter(path, backend="onnxruntime-cpu", threads=1) as seg:
        stream = FrameStream(seg, source(), max_batch=2, queue_frames=3)
        ahead = []
        for i, _ in enumerate(stream):
            time.sleep(0.01)  # a slow writer
            ahead.append(pulled - (i + 1))
    # at most: the queue, the batch in hand and the frame the reader holds while waiting for room
    assert max(ahead) <= 3 + 2 + 1, ahead
    assert pulled == 40 and stream.stats.dropped == 0


def test_reading_inference_and_writing_overlap(brightness_onnx, tmp_path):
    """A source and a sink that each wait 8 ms a frame (a camera's pace, a slow disk): pipelined, the
    run takes about the slower stage's time, not the sum of both."""
    from edgeseg.runtime import Segmenter, video
    from edgeseg.runtime.sinks import Sink
    from edgeseg.runtime.sources import Frame, Source

    frames = _frames(30)

    class PacedCamera(Source):
        kind = "camera"

        def __iter__(self):
            for i, f in enumerate(frames):
                time.sleep(0.008)
                yield Frame(i, f, f"{i:05d}", time.perf_counter())

    class SlowDisk(Sink):
        def write(self, frame, mask):
            time.sleep(0.008)
            self.order = getattr(self, "order", []) + [frame.index]
            self.written += 1

    with Segmenter(brightness_onnx, backend="onnxruntime-cpu", threads=1) as seg:
        sink = SlowDisk(tmp_path)
        t0 = time.perf_counter()
        summary = video.run(seg, PacedCamera("paced camera"), sink, video.RunOptions(smooth=0.0))
        wall = time.perf_counter() - t0
    serial = 30 * (0.008 + 0.008)
    assert sink.order == list(range(30)) and summary["written"] == 30
    assert wall < 0.75 * serial, f"{wall:.3f} s pipelined vs {serial:.3f} s of waiting in series"


def test_drop_late_drops_the_oldest_frames_and_counts_them(tiny_onnx):
    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.stream import FrameStream

    path, _ = tiny_onnx
    frames = _frames(60)

    def camera():  # a live source: a frame every 2 ms, whether or not anyone is ready for it
        for f in frames:
            time.sleep(0.002)
            yield f

    with Segmenter(path, backend="onnxruntime-cpu", threads=1) as seg:
        live = FrameStream(seg, camera(), max_batch=1, queue_frames=2, drop_late=True)
        indices = []
        for frame, _ in live:
            time.sleep(0.01)  # the model "falls behind" a source that never waits
            indices.append(frame.index)
        kept = FrameStream(seg, camera(), max_batch=1, queue_frames=2)  # the same, not asked to drop
        every = []
        for frame, _ in kept:
            time.sleep(0.002)
            every.append(frame.index)
    assert live.stats.dropped > 0 and len(indices) + live.stats.dropped == 60
    assert indices == sorted(set(indices)) and indices[-1] == 59  # never reordered; the oldest go, the newest stay
    assert every == list(range(60)) and kept.stats.dropped == 0


def test_a_failing_source_ends_the_stream_after_the_frames_before_it(tiny_onnx):
    from edgeseg.runtime import Segmenter

    path, _ = tiny_onnx

    def source():
        yield from _frames(5)
        raise InputError("camera 3: unplugged")

    with Segmenter(path, backend="onnxruntime-cpu", threads=1) as seg:
        got = []
        with pytest.raises(InputError, match="camera 3: unplugged"):
            for mask in seg.stream(source()):
                got.append(mask)
        assert len(got) == 5
        with pytest.raises(InputError, match="frame 1: expected an HxW, HxWx3 or HxWx4 image"):
            list(seg.stream([_frames(1)[0], np.zeros((4, 4, 7), np.uint8)]))


def test_streaming_memory_does_not_grow_with_the_clip(tiny_onnx):
    """VGA frames from a generator: RSS after 600 frames within 10% of RSS after 150."""
    from edgeseg.runtime import Segmenter
    from tests.test_runtime import _rss_mib

    path, _ = tiny_onnx
    base = _frames(8, (480, 640))

    def clip(n):
        for i in range(n):
            yield base[i % 8]

    with Segmenter(path, backend="onnxruntime-cpu", threads=1) as seg:
        assert sum(m.shape == (480, 640) for m in seg.stream(clip(150))) == 150
        after_150 = _rss_mib()
        assert sum(m.shape == (480, 640) for m in seg.stream(clip(600))) == 600
        after_600 = _rss_mib()
    assert after_600 <= 1.10 * after_150, f"RSS grew from {after_150:.0f} to {after_600:.0f} MiB"


# --- smoothing and the flicker figure ----------------------------------------------------------------

def test_smoother_by_hand_and_its_restarts():
    from edgeseg.runtime.preprocess import place
    from edgeseg.runtime.smoothing import TemporalSmoother

    p, q = place((48, 64), (64, 64)), place((90, 50), (64, 64))
    still = np.zeros((16, 16), np.float32)
    s = TemporalSmoother(0.75)
    ones, zeros = np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32)
    assert np.allclose(s(ones, still, p), 1.0)
    assert np.allclose(s(zeros, still, p), 0.75)  # 0.25 * 0 + 0.75 * 1
    assert np.allclose(s(zeros, still, p), 0.5625)
    assert np.allclose(s(ones, still + 0.5, p), 1.0) and s.resets == 1  # a scene cut: the new frame alone
    assert np.allclose(s(zeros, still + 0.5, q), 0.0) and s.resets == 2  # a new frame size
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        TemporalSmoother(1.0)


def test_stream_smoothing_is_the_moving_average_of_the_models_probabilities(brightness_onnx):
    from edgeseg.runtime import Segmenter
    from edgeseg.runtime.pipeline import BatchBuffers, masks_at_source, prepare

    path = brightness_onnx
    rng = np.random.default_rng(1)  # one still scene under sensor noise: per-frame masks flicker
    frames = [np.clip(_frames(1)[0] + rng.normal(0, 30, (48, 64, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    with Segmenter(path, backend="onnxruntime-cpu", threads=1, exact_masks=True) as seg:
        smoothed = list(seg.stream(frames, smooth=0.6))
        plain = list(seg.stream(frames, smooth=0.0))
        feed, placements = prepare(frames, seg.spec, BatchBuffers(seg.spec))
        logits = seg.runner.infer(feed)[:, 0].copy()
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ema = [probs[0]]
    for p in probs[1:]:
        ema.append(0.4 * p + 0.6 * ema[-1])
    expected = masks_at_source(np.stack(ema).astype(np.float32), placements, seg.spec.threshold)
    moved = [int((a != b).sum()) for a, b in zip(smoothed, expected)]
    assert sum(moved) <= 2, moved  # float32 vs float64 rounding at the cut, at most
    assert sum(int((a != b).sum()) for a, b in zip(smoothed, plain)) > 20  # and smoothing did change masks


def test_flicker_counts_label_changes_where_the_truth_holds_still():
    from edgeseg.runtime.metrics import FlickerMeter

    truth = np.zeros((2, 4), bool)
    moving = truth.copy()
    moving[0, 0] = True  # the truth itself changes here in frame 2
    m = FlickerMeter()
    m.update(np.array([[1, 0, 0, 0], [0, 0, 0, 0]]), truth)
    m.update(np.array([[1, 1, 0, 0], [0, 0, 0, 1]]), moving)  # 2 of the 7 still pixels flipped
    assert (m.pairs, m.stable, m.changed) == (1, 7, 2) and m.flicker == pytest.approx(2 / 7)
    m.update(np.zeros((2, 4)), truth, follows=False)  # after a dropped frame: no pair
    assert m.pairs == 1


def test_the_overlay_is_todays_picture():
    from edgeseg.runtime.sinks import overlay

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = np.zeros((37, 53), np.uint8)
    mask[5:20, 30:50] = rng.random((15, 20)) > 0.3
    expected = image.copy()
    person = mask.astype(bool)
    expected[person] = (expected[person] * 0.45 + np.array([255, 40, 40]) * 0.55).astype(np.uint8)
    assert np.array_equal(overlay(image, mask), expected)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    assert np.array_equal(overlay(bgr, mask * 255, bgr=True)[:, :, ::-1], expected)
    assert np.array_equal(overlay(image, np.zeros_like(mask)), image)


# --- the command on files -----------------------------------------------------------------------------

def test_a_clip_gives_playable_mask_and_overlay_videos(brightness_onnx, tmp_path):
    from PIL import Image

    from edgeseg.runtime import Segmenter

    path = brightness_onnx
    clip = _write_clip(tmp_path / "clip.mp4", _frames(30, (96, 128)), fps=12.0)
    out = tmp_path / "out"
    # the old spelling still works for one release, and says so once
    r = run_cli("runtime", "infer", "--bundle", str(path), "--input", str(clip), "--output", str(out),
                "--save-masks", "--threads", "1", "--smooth", "0")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("`--input` is renamed `--images`") == 1
    result = json.loads(r.stdout)
    assert result["frames"] == 30 and Path(result["mask"]).name == "mask.mp4"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 30 and summary["dropped"] == 0 and summary["backend"] == "onnxruntime-cpu"
    assert "30 frames in" in r.stderr and "frames/s, latency p50" in r.stderr and "onnxruntime-cpu on cpu" in r.stderr
    for name in ("mask.mp4", "overlay.mp4"):
        cap = cv2.VideoCapture(str(out / name))
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
        assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (128, 96)
        assert len(_read_video(out / name)) == 30
    # the masks, frame by frame in order, are the masks of the decoded clip's frames
    with Segmenter(path, backend="onnxruntime-cpu", threads=1) as seg:
        expected = seg.predict(_read_video(clip))
    pngs = [np.asarray(Image.open(out / "masks" / f"{i:05d}.png")) for i in range(30)]
    assert all(set(np.unique(p)) <= {0, 255} for p in pngs) and len({p.tobytes() for p in pngs}) == 30
    assert all(np.array_equal(p // 255, e) for p, e in zip(pngs, expected))
    decoded = _read_video(out / "mask.mp4")
    agree = np.mean([((d[:, :, 0] > 127) == e.astype(bool)).mean() for d, e in zip(decoded, expected)])
    assert agree > 0.97  # lossy MPEG-4: only edges may blur


def test_truth_scoring_in_the_summary(brightness_onnx, tmp_path):
    path = brightness_onnx
    clip = _write_clip(tmp_path / "clip.avi", _frames(12), fourcc="MJPG")
    first = tmp_path / "first"
    r = run_cli("runtime", "infer", "--bundle", str(path), "--images", str(clip), "--out", str(first), "--save-masks")
    assert r.returncode == 0, r.stderr
    # the first run's own masks as the truth: a perfect score and no flicker
    r = run_cli("runtime", "infer", "--bundle", str(path), "--images", str(clip), "--out", str(tmp_path / "again"),
                "--truth", str(first / "masks"), "--drop-late")
    assert r.returncode == 0, r.stderr
    assert "--drop-late applies to live sources" in r.stderr  # a file's frames are never dropped
    s = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert (s["scored_frames"], s["flicker_pairs"], s["miou"], s["flicker"]) == (12, 11, 1.0, 0.0)
    from edgeseg.runtime.smoothing import DEFAULT_SMOOTHING

    assert s["smooth"] == DEFAULT_SMOOTHING > 0  # a video is smoothed unless told otherwise
    assert "vs truth: mIoU 1.0000, flicker 0.000%" in r.stderr


def test_smoothing_lowers_flicker_on_a_noisy_camera(brightness_onnx, tmp_path):
    """A still scene under sensor noise: per-frame masks flicker at every edge; --smooth holds them still."""
    from edgeseg.runtime import Segmenter

    path = brightness_onnx
    scene = _frames(1, (48, 64))[0]
    rng = np.random.default_rng(2)
    noisy = [np.clip(scene + rng.normal(0, 12, scene.shape), 0, 255).astype(np.uint8) for _ in range(24)]
    clip = _write_clip(tmp_path / "still.avi", noisy, fourcc="MJPG")
    with Segmenter(path, backend="onnxruntime-cpu", threads=1) as seg:
        clean = seg.predict([scene])[0]  # the truth: the noise-free scene's mask, in every frame
    truth = tmp_path / "truth"
    truth.mkdir()
    for i in range(24):
        cv2.imwrite(str(truth / f"{i:05d}.png"), clean * 255)
    figures = {}
    for smooth in ("0", "0.7"):
        r = run_cli("runtime", "infer", "--bundle", str(path), "--images", str(clip), "--out", str(tmp_path / smooth),
                    "--truth", str(truth), "--smooth", smooth)
        assert r.returncode == 0, r.stderr
        figures[smooth] = json.loads((tmp_path / smooth / "summary.json").read_text())
    assert figures["0"]["flicker"] > 0.01  # the noise does flip edge pixels frame to frame
    assert figures["0.7"]["flicker"] < 0.5 * figures["0"]["flicker"]
    assert figures["0.7"]["miou"] >= figures["0"]["miou"]  # and the average is nearer the clean scene's masks


# --- bad and broken input ----------------------------------------------------------------------------

def _garbage(tmp_path: Path) -> Path:
    p = tmp_path / "noise.mp4"
    p.write_bytes(b"\x00not a video" * 50)
    return p


def _zero_frame_video(tmp_path: Path) -> Path:
    p = tmp_path / "empty.avi"
    cv2.VideoWriter(str(p), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48)).release()
    assert p.is_file()
    return p


def _truncated_mp4(tmp_path: Path) -> Path:
    full = _write_clip(tmp_path / "full.mp4", _frames(20))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[:full.stat().st_size // 2])  # the MP4 index (moov) is at the end
    return cut


@pytest.mark.parametrize("case, make, message", [
    ("garbage", _garbage, "noise.mp4: not a readable video"),
    ("zero frames", _zero_frame_video, "empty.avi: video has no frames"),
    ("truncated mp4", _truncated_mp4, "cut.mp4: not a readable video"),
    ("no such camera", lambda d: "7", "camera 7: cannot be opened"),
    ("closed port", lambda d: "http://127.0.0.1:9/cam.mjpg", "http://127.0.0.1:9/cam.mjpg: the stream did not answer"),
])
def test_bad_sources_fail_with_one_line_naming_them(tiny_onnx, tmp_path, case, make, message):
    path, _ = tiny_onnx
    source = make(tmp_path)
    t0 = time.perf_counter()
    r = run_cli("runtime", "infer", "--bundle", str(path), "--images", str(source), "--out", str(tmp_path / "out"),
                "--timeout", "2")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert time.perf_counter() - t0 < 30


def test_a_truncated_file_that_still_plays_gives_what_it_holds(tiny_onnx, tmp_path):
    path, _ = tiny_onnx
    full = _write_clip(tmp_path / "full.mkv", _frames(20), fourcc="MJPG")  # Matroska plays up to the cut
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(full.read_bytes()[:full.stat().st_size // 2])
    playable = len(_read_video(cut))
    assert 0 < playable < 20
    r = run_cli("runtime", "infer", "--bundle", str(path), "--images", str(cut), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert f"ended after {playable} of the 20 frames" in r.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["truncated"] is True and s["written"] == playable
    assert len(_read_video(tmp_path / "out" / "overlay.mp4")) == playable


class _LocalServer:
    """An HTTP server on 127.0.0.1 for one test: served from a thread, always shut down by ``running()``."""

    def _serve(self, handler, path: str) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{path}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @contextmanager
    def running(self):
        self._thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(timeout=10)


class _MjpegCamera(_LocalServer):
    """An MJPEG network camera (multipart/x-mixed-replace) on 127.0.0.1.

    Connection ``k`` gets the frames of ``sessions[k]`` (sizes), then the camera drops it; once the
    sessions are used up it answers 503.
    """

    def __init__(self, sessions: list[list[tuple[int, int]]]):
        self.sessions, self.connections = sessions, 0
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                k = camera.connections
                camera.connections += 1
                if k >= len(camera.sessions):
                    self.send_error(503, "camera offline")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for i, (h, w) in enumerate(camera.sessions[k]):
                        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(_frames(1, (h, w), seed=10 * k + i)[0],
                                                                   cv2.COLOR_RGB2BGR))
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpg) + jpg.tobytes() + b"\r\n")
                        self.wfile.flush()
                        time.sleep(0.01)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away first

            def log_message(self, *args):
                pass

        self._serve(Handler, "cam.mjpg")


def test_a_stream_that_drops_reconnects_then_stops_with_playable_output(tiny_onnx, tmp_path):
    path, _ = tiny_onnx
    # two sessions, the second at another frame size (the camera changed resolution), then offline
    camera = _MjpegCamera([[(48, 64)] * 8, [(60, 80)] * 6])
    out = tmp_path / "out"
    t0 = time.perf_counter()
    with camera.running():
        r = run_cli("runtime", "infer", "--bundle", str(path), "--images", camera.url, "--out", str(out),
                    "--reconnects", "2", "--timeout", "3", "--save-masks")
    assert time.perf_counter() - t0 < 60
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{camera.url}: stream lost after 14 frames; 2 reconnection attempt(s) failed" in errors[0]
    assert camera.connections == 4  # the first, one successful reconnection, two refused
    s = json.loads((out / "summary.json").read_text())
    assert (s["written"], s["reconnects"], s["dropped"]) == (14, 1, 0) and "stream lost" in s["error"]
    # the videos are finalised: playable to the end, every frame in them; the masks keep each frame's size
    assert len(_read_video(out / "mask.mp4")) == 14 and len(_read_video(out / "overlay.mp4")) == 14
    from PIL import Image

    sizes = [Image.open(out / "masks" / f"{i:05d}.png").size for i in range(14)]
    assert sizes[:8] == [(64, 48)] * 8 and set(sizes[8:]) in ({(80, 60)}, {(64, 48)})  # OpenCV may rescale


class _FileServer(_LocalServer):
    """A video file over HTTP on 127.0.0.1 with byte ranges (as FFmpeg seeks); the first connection drops half-way."""

    def __init__(self, data: bytes):
        self.data, self.requests = data, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                import re

                server.requests.append(self.headers.get("Range"))
                m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(m.group(1)) if m else 0
                body = server.data[start:]
                if len(server.requests) == 1:
                    body = body[:len(body) // 2]  # the network drops the first connection
                self.send_response(206 if m else 200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(server.data) - start))
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self._serve(Handler, "clip.mkv")


def test_a_video_url_that_drops_goes_on_where_it_stopped(tmp_path):
    from edgeseg.runtime.sources import open_source

    clip = _write_clip(tmp_path / "clip.mkv", _frames(30, (48, 64)), fourcc="MJPG")
    expected = _read_video(clip)
    server = _FileServer(clip.read_bytes())
    with server.running():
        source = open_source(server.url, timeout_s=3, reconnects=2)
        source.reconnect_wait_s = 0.05
        with source:
            frames = [f.image for f in source]
            assert (source.live, source.total, source.reconnects) == (False, 30, 1)
    # a second connection was made; whether FFmpeg's seek asks for a byte range or reads its buffer is its own
    # choice (both seen), so where the source went on is checked on the frames: each once, in order
    assert len(server.requests) >= 2
    assert len(frames) == 30 and all(np.array_equal(a, b) for a, b in zip(frames, expected))


def test_ctrl_c_ends_a_camera_run_with_its_output_finalised(tiny_onnx, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    path, _ = tiny_onnx
    camera = _MjpegCamera([[(48, 64)] * 6000])  # live for 60 s or more: longer than a slow start under load; ends with the client
    out = tmp_path / "out"
    with camera.running():
        env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
        proc = subprocess.Popen([sys.executable, "-m", "edgeseg", "runtime", "infer", "--bundle", str(path), "--images",
                                 camera.url, "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                # a suite started in the background (nohup, &) ignores SIGINT, and a child inherits
                                # that: Ctrl-C as a terminal delivers it
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 30
            while not (out / ".overlay.tmp.mp4").is_file() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)  # until the first frame is written (the videos are open)
            time.sleep(2.0)  # frames written past the first, also on a loaded machine
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, stderr
    assert "stopped (Ctrl-C)" in stderr and "Traceback" not in stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["written"] > 0 and len(_read_video(out / "overlay.mp4")) == s["written"]


def test_progress_line_says_the_drops():
    import logging

    from edgeseg.runtime.progress import LoggedProgress

    log = logging.getLogger("edgeseg.test.video_progress")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        bar = LoggedProgress(total=3, desc="segmenting cam", logger=log, every_s=0.0, status=lambda: "2 dropped")
        bar.update(1)
        bar.close()
    finally:
        log.removeHandler(handler)
    assert records and records[0].getMessage().startswith("segmenting cam: 1/3 (") and "; 2 dropped)" in records[0].getMessage()


# --- the demo clip ------------------------------------------------------------------------------------

def test_the_demo_clip_is_deterministic_and_moves(tmp_path):
    from PIL import Image

    from edgeseg.distill.demo_video import generate_demo_clip, render_clip

    video = generate_demo_clip(tmp_path / "a", (64, 64), seed=3, frames=16)
    again = generate_demo_clip(tmp_path / "b", (64, 64), seed=3, frames=16)
    stamp = json.loads((video.parent / "clip.json").read_text())
    assert stamp["frames"] == 16 and stamp["condition"] in ("low_light", "backlight", "colour_cast")
    masks = [np.asarray(Image.open(video.parent / "masks" / f"{i:05d}.png")) for i in range(16)]
    masks_b = [np.asarray(Image.open(again.parent / "masks" / f"{i:05d}.png")) for i in range(16)]
    assert all(np.array_equal(a, b) for a, b in zip(masks, masks_b))
    assert sum(m.any() for m in masks) >= 12  # people in (nearly) every frame
    assert not np.array_equal(masks[0], masks[-1])  # and they move
    frames = _read_video(video)
    assert len(frames) == 16 and frames[0].shape == (64, 64, 3)
    first, _ = next(render_clip((64, 64), seed=4, frames=16))
    assert not np.array_equal(first, next(render_clip((64, 64), seed=3, frames=16))[0])
    mtime = video.stat().st_mtime_ns
    assert generate_demo_clip(tmp_path / "a", (64, 64), seed=3, frames=16) == video and video.stat().st_mtime_ns == mtime


# --- the benchmark's video section, on a tiny model ----------------------------------------------------

def test_the_video_benchmark_measures_what_it_says(brightness_onnx, tmp_path):
    from benchmarks.bench_video import STRENGTHS, run
    from edgeseg.distill.demo_video import generate_demo_clip

    clip = _write_clip(tmp_path / "clip.mp4", _frames(16, (96, 128)), fps=25.0)
    demo = generate_demo_clip(tmp_path / "demo", (64, 64), seed=0, frames=12)
    out = run(brightness_onnx, clip, rounds=2, demo_clip=demo, truth=demo.parent / "masks", live_frames=8)
    for block in (out, out["threads_1"]):
        t = block["timings"]
        assert block["frames"] == 16 and block["frame_size"] == [96, 128]
        assert block["video_pipeline_efficiency"] == pytest.approx(t["in_memory"]["median_ms"] / t["end_to_end"]["median_ms"])
        assert block["end_to_end_fps"] == pytest.approx(16 / (t["end_to_end"]["median_ms"] / 1000))
        for mode in ("batch_1", "micro_batched"):
            live = block["live"][mode]
            assert 0 < live["latency_p50_ms"] <= live["latency_p99_ms"] and live["dropped"] == 0
    assert out["threads_1"]["threads"] == 1 and out["threads"] == "default"
    mem = out["memory"]
    assert mem["processes"]["clip_x4"]["frames"] == 64 and not mem["processes"]["clip_x4"]["torch_imported"]
    assert mem["peak_rss_x4_vs_x1"] < 1.2
    rows = out["smoothing"]["strengths"]
    assert list(rows) == [f"{s:g}" for s in STRENGTHS] and all(r["frames"] == 12 for r in rows.values())
    assert out["smoothing"]["flicker_ratio_0.5"] == pytest.approx(rows["0.5"]["flicker"] / rows["0"]["flicker"])


def test_the_runtime_bench_video_key_on_the_tiny_run(tiny_run, brightness_onnx):
    """bench_runtime.video_block as `python -m benchmarks.run --only video` calls it (a tiny model, a short clip)."""
    from benchmarks.bench_runtime import video_block

    _, cfg = tiny_run
    out = video_block(cfg, rounds=2, vga_frames=8, model=brightness_onnx, live_frames=6)
    assert out["frames"] == 8 and out["frame_size"] == [480, 640] and out["video_pipeline_efficiency"] > 0
    assert out["smoothing"]["clip"] == str(cfg.data_root / "clip" / "clip.mp4")
    assert out["smoothing"]["strengths"]["0"]["frames"] == 112


def test_a_video_file_without_a_frame_count_is_read_once_to_its_end(tmp_path, monkeypatch):
    """A file whose header gives no frame count (common for .webm) ends; it is not a live source to reconnect."""
    import cv2

    from edgeseg.runtime.sources import open_source

    path = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(7):
        w.write(np.full((24, 32, 3), 20 * i, np.uint8))
    w.release()
    real_get = cv2.VideoCapture.get
    monkeypatch.setattr(cv2.VideoCapture, "get",  # the container declares no count
                        lambda self, prop: 0.0 if prop == cv2.CAP_PROP_FRAME_COUNT else real_get(self, prop))
    with open_source(str(path), reconnects=2) as source:
        assert source.total is None and not source.live
        frames = list(source)
    assert len(frames) == 7 and source.reconnects == 0
