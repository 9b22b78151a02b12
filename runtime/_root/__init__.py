"""edgeseg: distil, calibrate, quantize and deploy person segmentation for edge GPUs.

The installed namespace is ``edgeseg`` with one sub-package per stage: :mod:`edgeseg.distill`,
:mod:`edgeseg.calibration`, :mod:`edgeseg.export` and the torch-free :mod:`edgeseg.runtime`
(``from edgeseg.runtime import Segmenter``). This root holds only the ``edgeseg`` command; it
imports no stage until one of its commands runs, so an edge device with the runtime alone can use it.
"""
from importlib import metadata

try:
    __version__ = metadata.version("edgeseg")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
