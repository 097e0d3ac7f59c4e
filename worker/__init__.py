"""Redis-fed, shape-bucketed image inference worker (ONNX Runtime on CPU, TensorRT on GPU)."""

__version__ = "0.1.0"
