"""Qwen2.5-VL: the Qwen2 decoder with 3D M-RoPE, fed by the vision tower.

A multimodal prompt is token ids in which each image or video stands as one run of pad tokens (`<|image_pad|>`
or `<|video_pad|>`), one per merged patch, between `<|vision_start|>` and `<|vision_end|>`. The tower's output
replaces the embeddings of those tokens (`qwenjax.multimodal.features.encode_visuals`), and every token gets a
3D rotary position (`qwenjax.multimodal.positions`, which expands the pads and computes the positions on the host).

    loaded = qwenjax.load("Qwen2.5-VL-3B-Instruct/")                    # loaded.model: a Qwen2VL
    prompt = positions.vl_prompt(ids, visuals, loaded.model.vl_cfg)     # pads expanded, 3D positions
    buckets = features.patch_buckets(loaded.image_processor)            # qwenjax.multimodal.features
    vision = features.encode_visuals(loaded.model.visual, prompt.visuals, buckets)
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.config import PRESETS, QwenConfig, read_field, read_json
from qwenjax.model.decoder import Qwen2
from qwenjax.model.vision import VisionTower
from qwenjax.model.vision_config import VISION_PRESETS, VisionConfig


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
  """A Qwen2.5-VL model: its decoder (with `mrope_section`), its vision tower and the special tokens that join
  them. `tokens_per_second` scales video time into temporal positions (2 in Qwen's released configs)."""

  text: QwenConfig
  vision: VisionConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tokens_per_second: float = 2.0

  def __post_init__(self):
    if self.text.mrope_section is None:
      raise ConfigError("a Qwen2.5-VL decoder needs rope_scaling.mrope_section (3D M-RoPE).")
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ConfigError(f"vision out_hidden_size {self.vision.out_hidden_size} differs from the decoder's hidden "
                        f"size {self.text.hidden_size}.")

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json") -> QwenVLConfig:
    """From a Qwen2.5-VL config.json: flat, as Qwen ships it (decoder fields at the top, `vision_config`), or
    nested, as transformers 5 writes it (`text_config`, `vision_config`)."""
    if hf.get("model_type") not in ("qwen2_5_vl", None):
      raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not Qwen2.5-VL ('qwen2_5_vl').")
    if "vision_config" not in hf:
      raise ConfigError(f"{source}: no vision_config; not a Qwen2.5-VL config.")
    text = dict(read_field(hf, "text_config", dict, source, {}))
    for key, value in hf.items():  # flat form; in the nested form top-level ids and tying still apply
      if key not in ("text_config", "vision_config"):
        text.setdefault(key, value)
    text["model_type"] = "qwen2_5_vl_text"
    vision = read_field(hf, "vision_config", dict, source)
    tokens_per_second = read_field(vision, "tokens_per_second", float, source,
                                   read_field(hf, "tokens_per_second", float, source, 2.0, positive=True),
                                   positive=True, within="vision_config")
    ids = {k: read_field(hf, k, int, source, default) for k, default in (
        ("image_token_id", 151655), ("video_token_id", 151656), ("vision_start_token_id", 151652),
        ("vision_end_token_id", 151653))}
    return cls(text=QwenConfig.from_hf_config(text, source), vision=VisionConfig.from_hf(vision, source),
               tokens_per_second=tokens_per_second, **ids)

  @classmethod
  def from_file(cls, path: str | pathlib.Path) -> QwenVLConfig:
    return cls.from_hf_config(read_json(path), source=str(path))

  def num_params(self) -> int:
    return self.text.num_params() + self.vision.num_params()


def _vl_preset(text: str, vision: str, **overrides) -> QwenVLConfig:
  decoder = dataclasses.replace(PRESETS[text], mrope_section=(16, 24, 24), max_position_embeddings=128000,
                                **overrides)
  return QwenVLConfig(text=decoder, vision=VISION_PRESETS[vision])


# The released Qwen2.5-VL models: the Qwen2.5 decoders of the same size (their config.json files), 3D M-RoPE
# sections [16, 24, 24], and the vision tower presets.
VL_PRESETS: dict[str, QwenVLConfig] = {
    "qwen2.5-vl-3b": _vl_preset("qwen2.5-3b", "qwen2.5-vl-3b"),
    "qwen2.5-vl-7b": _vl_preset("qwen2.5-7b", "qwen2.5-vl-7b"),
    "qwen2.5-vl-32b": _vl_preset("qwen2.5-32b", "qwen2.5-vl-32b", rms_norm_eps=1e-6),
    "qwen2.5-vl-72b": _vl_preset("qwen2.5-72b", "qwen2.5-vl-72b"),
}


class Qwen2VL(Qwen2):
  """Qwen2.5-VL: the Qwen2 decoder (`cfg` is its QwenConfig, with `mrope_section`) and `visual`, the tower.

  The decoder's weights keep Qwen2's checkpoint names (`model.layers...`, `lm_head.weight`); the tower's are
  `visual.*`, as Qwen's released checkpoints store them."""

  def __init__(self, vl_cfg: QwenVLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers: bool = True,
               quantize: str | None = None, quantize_embeddings: bool = False, rngs: nnx.Rngs):
    super().__init__(vl_cfg.text, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, quantize=quantize,
                     quantize_embeddings=quantize_embeddings, rngs=rngs)
    self.vl_cfg = vl_cfg
    self.visual = VisionTower(vl_cfg.vision, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                              quantize=quantize, rngs=rngs)
