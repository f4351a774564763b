"""The models: layers and weight declarations, the Qwen2 decoder and its KV cache, the Qwen2.5-VL vision tower, and
Qwen2.5-VL (the decoder with the tower)."""
