"""The models: layers and weight declarations, the Qwen2 decoder and its KV cache, the Qwen2.5-VL vision tower and
the plans (windows, frames, buckets) it runs on, and Qwen2.5-VL (the decoder with the tower)."""


def model_class(cfg) -> type:
  """The model a config builds: `qwen2_vl.Qwen2VL` for a `QwenVLConfig`, `decoder.Qwen2` for a `QwenConfig`."""
  # Imported here: every `qwenjax.model.<module>` import runs this file, and should not load the vision tower.
  from qwenjax.model.decoder import Qwen2  # pylint: disable=g-import-not-at-top
  from qwenjax.model.qwen2_vl import Qwen2VL, QwenVLConfig  # pylint: disable=g-import-not-at-top

  return Qwen2VL if isinstance(cfg, QwenVLConfig) else Qwen2
