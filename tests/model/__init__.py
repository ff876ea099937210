"""Model behaviour on the tiny GGUF and Hugging Face models the tests build (llama.cpp, ONNX Runtime)."""
