"""edgeseg.calibration: diffusion-synthesised INT8 calibration sets."""
