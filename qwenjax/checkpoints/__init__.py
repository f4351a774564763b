"""Reading and writing weights: Hugging Face safetensors, GGUF, Orbax, the embedded default model, and `load`, the
one entry point that picks among them."""
