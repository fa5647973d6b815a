"""Export backends: folded model -> ONNX / ExecuTorch artifacts. Reads compress only through compress.format."""
