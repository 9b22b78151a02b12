"""Triton Python model: masks at each image's size with edgeseg's runtime (written by edgeseg serve triton)."""
import os
import site

for _d in filter(None, os.environ.get("EDGESEG_SITE_DIRS", "").split(os.pathsep)):  # first: see segment.py
    site.addsitedir(_d)

import numpy as np  # noqa: E402

from edgeseg.export.triton_models.backend import WithSpec, error_response, get_array, response  # noqa: E402
from edgeseg.runtime.pipeline import finish  # noqa: E402
from edgeseg.runtime.preprocess import Placement  # noqa: E402


class TritonPythonModel(WithSpec):
    def respond(self, request):
        logits, place = get_array(request, "LOGITS"), get_array(request, "PLACEMENT")
        placements = [Placement((int(p[4]), int(p[5])), tuple(self.spec.image_size), *map(int, p[:4])) for p in place]
        masks = finish(logits, placements, self.spec)
        if len({m.shape for m in masks}) != 1:
            return error_response("images of one request must share a size")
        return response(MASK=np.stack(masks))
