"""Writing results: ExportedProgram files, Hugging Face checkpoints, ONNX models and their sessions."""

from fxflatten.export.onnx import OnnxExport, to_onnx

__all__ = ["OnnxExport", "to_onnx"]
