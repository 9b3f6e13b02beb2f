"""Inference: ONNX Runtime sessions, the model registry, offline provisioning and checks."""
