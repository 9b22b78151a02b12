"""Triton Python-backend models as real modules: the repository writer copies each one to ``<model>/1/model.py``.

``segment.py`` serves the bundle through edgeseg's runtime (the CPU model ``edgeseg``);
``preprocess.py`` and ``postprocess.py`` are the CPU ends of the GPU ensemble. What they share
(tensors through DLPack, the bundle's spec) is :mod:`edgeseg.export.triton_models.backend`.
Each model file first adds the launching environment's site folders (``EDGESEG_SITE_DIRS``), so
edgeseg imports inside Triton's Python stub as it does where the server was started.
"""
