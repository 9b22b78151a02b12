"""edgeseg.distill: knowledge distillation of a B0 student from a B3 teacher and an ONNX feature teacher."""
