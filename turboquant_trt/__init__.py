"""turboquant-trt: KV-cache compression for TensorRT serving."""

__version__ = "0.1.0"
