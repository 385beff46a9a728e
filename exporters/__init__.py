"""PyTorch → the phone's files: ONNX, ONNX Runtime training artifacts, ExecuTorch, bundles."""
