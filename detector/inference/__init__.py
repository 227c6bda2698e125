"""Prediction on images, folders, videos and streams; results; ONNX export."""
