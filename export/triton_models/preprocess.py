"""Triton Python model: letterbox + normalise with edgeseg's runtime (written by edgeseg serve triton)."""
import os
import site

for _d in filter(None, os.environ.get("EDGESEG_SITE_DIRS", "").split(os.pathsep)):  # first: see segment.py
    site.addsitedir(_d)

import numpy as np  # noqa: E402  (after the site folders: edgeseg may live there)

from edgeseg.export.triton_models.backend import WithSpec, get_array, response  # noqa: E402
from edgeseg.runtime.pipeline import BatchBuffers, prepare  # noqa: E402


class TritonPythonModel(WithSpec):
    def respond(self, request):
        images = list(get_array(request, "IMAGE"))
        feed, placements = prepare(images, self.spec, BatchBuffers(self.spec))
        place = np.array([[p.top, p.left, p.height, p.width, *p.src_hw] for p in placements], np.int32)
        return response(INPUT=feed, PLACEMENT=place)
