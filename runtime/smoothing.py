"""Temporal smoothing of one stream's person probabilities: masks that hold still between frames.

A per-frame segmenter decides each edge pixel afresh, so sensor noise and compression flip
pixels at a person's outline from frame to frame (flicker). An exponential moving average of
the probabilities, ``p_t = (1 - s) * p_frame + s * p_{t-1}``, keeps a pixel's label until the
evidence moves it. Like MediaPipe's segmenters (temporal smoothing of the mask across video
frames), the average is per stream and restarts where it would smear two pictures together: a
scene cut, or a change of frame size (the letterbox moves).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the CLI reads DEFAULT_SMOOTHING when it starts: no OpenCV import for that
    from edgeseg.runtime.preprocess import Placement
    from edgeseg.runtime.spec import ModelSpec

# On by default for video (``Segmenter.stream``, ``edgeseg runtime infer`` on a video, camera or stream), at 0.5:
# chosen by measurement on the demo clip against its ground truth (benchmarks/results/runtime.json
# `video.smoothing`: mIoU and flicker per strength). There 0.5 cut the flicker figure by about a third
# and did not cost mIoU (it gained a little: an edge pixel's noise averages out), while 0.7 and above
# began to cost mIoU (the average lags a walking person). 0.5 remembers about 2 frames (1 / (1 - s)).
DEFAULT_SMOOTHING = 0.5
THUMB = (16, 16)  # (width, height) of the grey thumbnails compared for a scene cut


def thumbnail(image: np.ndarray) -> np.ndarray:
    """(16, 16) float32 grey thumbnail in [0, 1] of an (H, W, 3) uint8 frame (area average), for cut detection."""
    import cv2

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return cv2.resize(grey, THUMB, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def probabilities(scores: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The model's (H, W) output as float32 person probabilities (sigmoid of logits; a 0/1 mask as is)."""
    s = np.asarray(scores, np.float32)
    if spec.output == "logits":
        p = np.negative(s)
        np.exp(p, out=p)
        p += 1.0
        return np.reciprocal(p, out=p)
    return s.copy()


class TemporalSmoother:
    """EMA of person probabilities at the model's resolution, for one stream.

    Args:
        strength: weight of the past, ``s`` in ``p_t = (1 - s) * p_frame + s * p_{t-1}``; 0 is off
            (each frame's own probabilities), 0.5 weighs the new frame and the past equally.
        cut: a scene cut when the mean absolute difference of consecutive frames' grey thumbnails
            exceeds this share of the full range; the average restarts there.
    """

    def __init__(self, strength: float, cut: float = 0.2):
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"smoothing strength must be in [0, 1) (0 = off), got {strength}")
        self.strength, self.cut = strength, cut
        self._state: np.ndarray | None = None
        self._thumb: np.ndarray | None = None
        self._placement: Placement | None = None
        self.resets = 0  # restarts after the first frame: scene cuts and size changes

    def reset(self) -> None:
        self._state = self._thumb = self._placement = None

    def __call__(self, probs: np.ndarray, thumb: np.ndarray, placement: Placement) -> np.ndarray:
        """(H, W) float32 probabilities of the next frame -> the smoothed ones (the state, do not modify)."""
        if self._state is not None and (placement != self._placement or self._state.shape != probs.shape
                                        or float(np.abs(thumb - self._thumb).mean()) > self.cut):
            self.resets += 1
            self._state = None
        self._thumb, self._placement = thumb, placement
        if self._state is None or self.strength == 0.0:
            self._state = np.array(probs, np.float32, copy=True)
        else:
            self._state *= self.strength
            self._state += (1.0 - self.strength) * probs
        return self._state
