"""Where frames come from: image folders and globs, video files, cameras and network streams.

    with open_source("clip.mp4") as source:      # or "frames/", "shots/*.jpg", "0", "rtsp://cam/1"
        for frame in source:                      # Frame(index, image (H, W, 3) uint8 RGB, name, t_read)
            ...

Video files, cameras and streams are read by OpenCV's VideoCapture: its FFmpeg backend for
files and URLs (mp4, avi, mkv, mov; rtsp://, http(s)://), the platform's camera API for an
index. A file ends at its last frame; a live source (camera, or a stream whose length is
unknown) that stops delivering is reopened up to ``reconnects`` times per outage, then
:class:`StreamLostError` ends the run with one line (what was read stays read).
"""
from __future__ import annotations

import abc
import glob
import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeseg.runtime.errors import InputError
from edgeseg.runtime.images import IMAGE_SUFFIXES, read_rgb

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
DEFAULT_FPS = 25.0  # written videos' rate when a source does not say its own (many cameras and MJPEG streams)


class StreamLostError(InputError):
    """A live source stopped delivering frames and did not come back within its reconnection attempts."""


@dataclass
class Frame:
    """One frame of a source, as the pipeline carries it."""

    index: int  # position in the source, from 0 (a live source's dropped frames leave gaps downstream)
    image: np.ndarray  # (H, W, 3) uint8 RGB
    name: str  # output file stem: the image file's stem, or the frame index as 5 digits
    t_read: float  # time.perf_counter() when the frame was read: per-frame latency starts here


class Source(abc.ABC):
    """Frames from one place; a context manager. ``open`` fails with one clear line (InputError)."""

    kind = "source"  # images | video | camera | stream

    def __init__(self, name: str):
        self.name = name  # how messages name the source (path, "camera 0", URL)
        self.live = False  # frames arrive in real time: late frames may be dropped (--drop-late)
        self.fps: float | None = None  # frames per second the source declares (None: images)
        self.total: int | None = None  # frames to expect, when known
        self.skipped: list[str] = []  # frames that could not be read and were left out (image folders)
        self.reconnects = 0  # successful reconnections of a live source

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Frame]: ...


class ImageSource(Source):
    """Image files in order; a file that is not an image, or not readable, is skipped with a warning."""

    kind = "images"

    def __init__(self, paths: list[Path], name: str):
        super().__init__(name)
        self.paths = paths
        self.total = sum(p.suffix.lower() in IMAGE_SUFFIXES for p in paths)

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        for path in self.paths:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                self.skipped.append(path.name)
                log.warning("skipping %s: not an image file", path.name)
                continue
            try:
                image = read_rgb(path)
            except InputError as e:
                self.skipped.append(path.name)
                log.warning("skipping %s", e)
                continue
            yield Frame(index, image, path.stem, time.perf_counter())
            index += 1


@contextmanager
def _quiet_opencv():
    """OpenCV's own warnings off for one call (a failed open logs several lines before our one clear line)."""
    import cv2

    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


class CaptureSource(Source):
    """A video file, camera or stream read by ``cv2.VideoCapture``.

    Args:
        target: a file path or URL (FFmpeg backend), or a camera index.
        kind: ``video``, ``camera`` or ``stream``.
        timeout_s: how long opening, and each read of a stream, may take before it counts as failed.
        reconnects: attempts to reopen a live source each time it stops delivering (0: stop at once).
        reconnect_wait_s: pause before the first attempt, doubled after each failed one (at most 5 s).
    """

    def __init__(self, target: str | int, kind: str, timeout_s: float = 10.0, reconnects: int = 3,
                 reconnect_wait_s: float = 0.5):
        super().__init__(f"camera {target}" if kind == "camera" else str(target))
        if reconnects < 0 or timeout_s <= 0:
            raise InputError(f"reconnects must be >= 0 and the timeout > 0 s, got {reconnects} and {timeout_s}")
        self.target, self.kind = target, kind
        self.timeout_s, self.max_reconnects, self.reconnect_wait_s = timeout_s, reconnects, reconnect_wait_s
        self._cap = None
        self._first: np.ndarray | None = None
        self.truncated = False  # a file that ended before the frame count its header declares
        # close() may come from another thread (the stream's caller) while the reader waits in read() or between
        # reconnects: the lock keeps release() out of a read in progress, the event ends the waits at once
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def _capture(self):
        import cv2

        # Timeouts as open parameters of the FFmpeg backend (OpenCV videoio flags: CAP_PROP_OPEN_TIMEOUT_MSEC,
        # CAP_PROP_READ_TIMEOUT_MSEC), so an address that never answers fails in timeout_s, not in FFmpeg's
        # own defaults (minutes for a stalled RTSP read; opencv-python issue 788).
        ms = int(self.timeout_s * 1000)
        with _quiet_opencv():
            if self.kind == "camera":
                return cv2.VideoCapture(int(self.target))
            return cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG,
                                    [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])

    def _read(self) -> np.ndarray | None:
        import cv2

        with self._lock:
            if self._cap is None:
                return None
            ok, bgr = self._cap.read()
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok and bgr is not None and bgr.size else None

    def open(self) -> None:
        import cv2

        self._closing.clear()
        self._cap = self._capture()
        if not self._cap.isOpened():
            self.close()
            raise InputError(self._unopened())
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps <= 1000 else None
        # CAP_PROP_FRAME_COUNT is the container's count (FFmpeg may estimate it from duration x rate);
        # streams report 0, -1 or a huge negative number: unknown, a live source.
        count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.total = int(count) if 0 < count < 1e9 else None
        # live: a camera, or a stream of no known length; a file without a frame count is still a file (it ends)
        self.live = self.kind == "camera" or (self.kind == "stream" and self.total is None)
        self._first = self._read()
        if self._first is None:
            self.close()
            raise InputError(self._no_frames())
        log.info("%s: %dx%d, %s fps, %s frames", self.name, self._first.shape[1], self._first.shape[0],
                 f"{self.fps:g}" if self.fps else "unknown", self.total if self.total else "unknown")

    def _unopened(self) -> str:
        if self.kind == "camera":
            return (f"camera {self.target}: cannot be opened (no such device, or another program holds it); "
                    "list the cameras (`v4l2-ctl --list-devices` on Linux) and pass an existing index")
        if self.kind == "stream":
            return (f"{self.target}: the stream did not answer within {self.timeout_s:g} s (refused, unreachable or "
                    "not a video stream); check the address, and that the camera serves it")
        return (f"{self.target}: not a readable video (OpenCV's FFmpeg backend cannot open it: broken, truncated "
                "before its index, or an unknown format); check that it plays, or re-encode it as .mp4")

    def _no_frames(self) -> str:
        if self.kind == "video":
            return f"{self.target}: video has no frames (a zero-frame or broken file); check that it plays"
        return f"{self.name}: opened but delivered no frame within {self.timeout_s:g} s; check that it is streaming"

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if self._cap is not None:
                self._cap.release()
                self._cap = None

    def __iter__(self) -> Iterator[Frame]:
        if self._cap is None:
            raise RuntimeError(f"{self.name}: iterate inside `with source:` (or after open())")
        image, index = self._first, 0
        self._first = None
        while True:
            if image is not None:
                yield Frame(index, image, f"{index:05d}", time.perf_counter())
                index += 1
            image = self._read()
            if image is not None:
                continue
            if self._closing.is_set():  # closed by the caller: no reconnect, just the end
                return
            # a URL of known length that stops short dropped its connection: reconnect (and seek) as for a live one
            if not self.live and not (self.kind == "stream" and self.total and index < self.total):
                if self.total and index < self.total:
                    self.truncated = True
                    log.warning("%s: ended after %d of the %d frames its header declares (a truncated file?)",
                                self.name, index, self.total)
                return
            self._reconnect(index)
            image, self._first = self._first, None  # the reconnected source's first frame

    def _reconnect(self, index: int) -> None:
        """Reopen a live source that stopped delivering, or raise StreamLostError after ``max_reconnects`` tries."""
        import cv2

        wait = self.reconnect_wait_s
        for attempt in range(1, self.max_reconnects + 1):
            log.warning("%s: no frame after frame %d; reconnecting (%d of %d) in %.1f s", self.name, index - 1,
                        attempt, self.max_reconnects, wait)
            if self._closing.wait(wait):  # closed while waiting: stop here
                return
            wait = min(2 * wait, 5.0)
            with self._lock:
                if self._closing.is_set():
                    return
                if self._cap is not None:
                    self._cap.release()
                self._cap = self._capture()
                if not self._cap.isOpened():
                    continue
                if self.total:  # a URL of a known length: go on from where it stopped, not from its start
                    self._cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            self._first = self._read()
            if self._first is not None:
                self.reconnects += 1
                log.warning("%s: reconnected", self.name)
                return
        self.close()
        raise StreamLostError(f"{self.name}: stream lost after {index} frames; {self.max_reconnects} reconnection "
                              f"attempt(s) failed; what was read so far is written")


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def open_source(spec: str, timeout_s: float = 10.0, reconnects: int = 3) -> Source:
    """The source ``spec`` names (not yet opened): a folder of images, an image or video file, a glob of
    images, a camera index (``0``) or a stream URL (``rtsp://``, ``http(s)://``, ...)."""
    spec = str(spec).strip()
    path = Path(spec)
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", spec)
    if scheme:
        if scheme.group(1).lower() not in STREAM_SCHEMES:
            raise InputError(f"{spec}: unsupported scheme {scheme.group(1)!r}; streams are "
                             f"{', '.join(s + '://' for s in STREAM_SCHEMES)}")
        return CaptureSource(spec, "stream", timeout_s, reconnects)
    if spec.isdigit() and not path.exists():
        return CaptureSource(int(spec), "camera", timeout_s, reconnects)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        if not files:
            raise InputError(f"{path}: input folder is empty; put images in it, or pass a video file, camera or URL")
        return ImageSource(files, str(path))
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageSource([path], str(path))
        return CaptureSource(spec, "video", timeout_s, reconnects)
    if _is_glob(spec):
        matches = [Path(p) for p in sorted(glob.glob(spec)) if Path(p).is_file()]
        images = [p for p in matches if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise InputError(f"{spec}: the pattern matches no image file (globs take images; pass a video by its path)")
        return ImageSource(images, spec)
    raise InputError(f"{spec}: no such file or folder, and not a camera index (0, 1, ...) or a stream URL "
                     "(rtsp://, http://); check the path")
