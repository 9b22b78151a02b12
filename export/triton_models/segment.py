"""Triton Python backend model: edgeseg's runtime serving a deploy bundle (written by edgeseg serve triton)."""
import os
import site

# A stub started by `edgeseg serve start` (or the tests) names the launching environment's site
# folders, so edgeseg and its dependencies import here as they do there (.pth files included).
for _d in filter(None, os.environ.get("EDGESEG_SITE_DIRS", "").split(os.pathsep)):
    site.addsitedir(_d)

import json  # noqa: E402  (after the site folders: edgeseg may live there)

import numpy as np  # noqa: E402

from edgeseg.export.triton_models.backend import error_response, get_array, response, version_folder  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from edgeseg.runtime import Segmenter

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        bundle = version_folder(args) / "bundle"
        self.segmenter = Segmenter(bundle, backend=params.get("backend", "auto"), threads=int(params.get("threads", "0")))

    def execute(self, requests):
        # Triton hands over the requests its dynamic batcher grouped; they are run as model batches.
        images, owners, responses = [], [], [None] * len(requests)
        for r, request in enumerate(requests):
            x = get_array(request, "IMAGE")
            problem = check_image(x)
            if problem:
                responses[r] = error_response(problem)
                continue
            images.extend(x)
            owners.extend([r] * len(x))
        if images:
            try:
                masks = self.segmenter.predict(images)
            except Exception as e:  # one bad batch fails its requests, the server keeps serving
                for r in set(owners):
                    responses[r] = error_response(f"edgeseg: {e}")
                masks = None
            if masks is not None:
                for r in sorted(set(owners)):
                    mine = np.stack([m for m, o in zip(masks, owners) if o == r])
                    responses[r] = response(MASK=mine)
        return responses

    def finalize(self):
        self.segmenter.close()


def check_image(x):
    """What is wrong with an IMAGE input (uint8 [batch, height, width, 3], not empty), or None."""
    if x.dtype != np.uint8:
        return f"IMAGE must be uint8 RGB, got {x.dtype}"
    if x.ndim != 4 or x.shape[-1] != 3:
        return f"IMAGE must be [batch, height, width, 3], got {list(x.shape)}"
    if x.shape[1] == 0 or x.shape[2] == 0:
        return f"IMAGE is empty ({x.shape[1]}x{x.shape[2]}); send a real image"
    return None
