"""ONNX export of the hot paths and ONNX Runtime runners (CPU, CUDA, TensorRT)."""
