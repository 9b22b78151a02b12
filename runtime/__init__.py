"""edgeseg.runtime: torch-free batched person segmentation from a deploy bundle.

``from runtime import Segmenter``; see :mod:`runtime.segmenter`.
"""
from runtime.segmenter import Segmenter

__all__ = ["Segmenter"]
