"""Writing results: ExportedProgram files (and, later, HF checkpoints and ONNX)."""
