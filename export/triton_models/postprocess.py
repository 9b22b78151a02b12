"""Triton Python model: masks at each image's size with edgeseg's runtime (written by edgeseg serve triton)."""
import os
import site

# The launching environment's site folders first (see segment.py).
for _d in filter(None, os.environ.get("EDGESEG_SITE_DIRS", "").split(os.pathsep)):
    site.addsitedir(_d)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from edgeseg.export.triton_models.backend import WithSpec, error_response, get_array, make_tensor  # noqa: E402


class TritonPythonModel(WithSpec):
    def execute(self, requests):
        from edgeseg.runtime.pipeline import finish
        from edgeseg.runtime.preprocess import Placement

        out = []
        for request in requests:
            logits = get_array(request, "LOGITS")
            place = get_array(request, "PLACEMENT")
            placements = [Placement((int(p[4]), int(p[5])), tuple(self.spec.image_size), *map(int, p[:4])) for p in place]
            masks = finish(logits, placements, self.spec)
            if len({m.shape for m in masks}) != 1:
                out.append(error_response("images of one request must share a size"))
                continue
            out.append(pb_utils.InferenceResponse(output_tensors=[make_tensor("MASK", np.stack(masks))]))
        return out
