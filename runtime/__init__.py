"""edgeseg.runtime: torch-free batched person segmentation from a deploy bundle."""
