"""Reading and writing weights: Hugging Face safetensors, GGUF, Orbax, the embedded default model, and `load`, the
one entry point that picks among them (with `convert`, which writes any of them as an Orbax checkpoint)."""
