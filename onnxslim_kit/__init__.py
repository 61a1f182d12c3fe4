"""onnxslim-kit: ONNX compression optimizer with an onnxruntime parity gate."""

__version__ = "0.1.0"
