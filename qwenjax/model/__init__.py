"""The models: layers and weight declarations, the Qwen2 decoder and its KV cache, the Qwen2.5-VL vision tower and
the plans (windows, frames, buckets) it runs on, and Qwen2.5-VL (the decoder with the tower).

The model a checkpoint or a config needs is chosen in one place, `qwenjax.model.registry`."""
