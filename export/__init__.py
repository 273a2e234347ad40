"""Export formats (``chimera export``): safetensors, transformers (native and remote code), ONNX, GGUF."""
