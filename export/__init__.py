"""edgeseg.export: strip, ONNX, onnxsim, Q/DQ INT8, TensorRT engines and deploy bundles."""
