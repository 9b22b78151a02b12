"""edgeseg.runtime: torch-free batched person segmentation from a deploy bundle.

``from edgeseg.runtime import Segmenter``; see :mod:`edgeseg.runtime.segmenter`.
"""
from edgeseg.runtime.segmenter import Segmenter

__all__ = ["Segmenter"]
