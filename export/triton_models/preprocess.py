"""Triton Python model: letterbox + normalise with edgeseg's runtime (written by edgeseg serve triton)."""
import os
import site

# The launching environment's site folders first (see segment.py).
for _d in filter(None, os.environ.get("EDGESEG_SITE_DIRS", "").split(os.pathsep)):
    site.addsitedir(_d)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from edgeseg.export.triton_models.backend import WithSpec, get_array, make_tensor  # noqa: E402


class TritonPythonModel(WithSpec):
    def execute(self, requests):
        from edgeseg.runtime.pipeline import BatchBuffers, prepare

        out = []
        for request in requests:
            images = list(get_array(request, "IMAGE"))
            feed, placements = prepare(images, self.spec, BatchBuffers(self.spec))
            place = np.array([[p.top, p.left, p.height, p.width, *p.src_hw] for p in placements], np.int32)
            out.append(pb_utils.InferenceResponse(output_tensors=[make_tensor("INPUT", feed), make_tensor("PLACEMENT", place)]))
        return out
