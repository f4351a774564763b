"""Hyperparameters of the Qwen2.5-VL vision tower, and the released towers' presets.

Apart from the tower module (`qwenjax.model.vision`) so that host-side planning (`qwenjax.model.vision_plan`)
reads the same config without importing the NNX modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwenjax._errors import ConfigError
from qwenjax.config import REQUIRED, read_field


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Hyperparameters of the Qwen2.5-VL vision tower (`Qwen2_5_VisionTransformerPretrainedModel`)."""

  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  window_size: int = 112  # pixels
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e4

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"vision hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}.")
    if self.head_dim % 4:
      raise ConfigError(f"vision head_dim {self.head_dim} is not a multiple of 4 (2D RoPE needs it).")
    unit_px = self.patch_size * self.spatial_merge_size
    if self.window_size % unit_px:
      raise ConfigError(f"vision window_size {self.window_size} is not a multiple of patch_size * "
                        f"spatial_merge_size ({unit_px}).")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ConfigError(f"vision fullatt_block_indexes {bad} lie outside the {self.depth} blocks.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """C: pixel values per patch row (3 * 2 * 14 * 14 = 1176)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    """Patches merged into one output token (2 x 2 = 4)."""
    return self.spatial_merge_size ** 2

  @property
  def window_merge_units(self) -> int:
    """Side of an attention window in merge units (112 px / 28 px = 4)."""
    return self.window_size // (self.patch_size * self.spatial_merge_size)

  @property
  def window_patches(self) -> int:
    """The most patches one window holds (8 x 8 = 64)."""
    return (self.window_merge_units * self.spatial_merge_size) ** 2

  def full_attention_layers(self) -> np.ndarray:
    """[depth] bool: the blocks that attend over a whole frame instead of a window."""
    full = np.zeros(self.depth, bool)
    full[list(self.fullatt_block_indexes)] = True
    return full

  def rope_inv_freq(self) -> np.ndarray:
    """[H / 4] float32 inverse frequencies of the 2D RoPE, the same for the h and the w axis."""
    dim = self.head_dim // 2
    return (1.0 / np.float32(self.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)

  def num_params(self) -> int:
    """Parameter count from the formula (a test checks it against the module tree)."""
    d, f, e, o = self.hidden_size, self.intermediate_size, self.hidden_size * self.merge_unit, self.out_hidden_size
    per_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * (d * f + f) + (f * d + d)
    return self.patch_dim * d + self.depth * per_layer + d + (e * e + e) + (e * o + o)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> VisionConfig:
    """From the `vision_config` dict of a Qwen2.5-VL config.json (or the whole config holding one), in the form
    Qwen ships (`in_chans`, `spatial_patch_size`) or transformers 5 writes (`in_channels`, `rope_parameters`).
    Unknown keys are ignored. The blocks' RMSNorm eps is 1e-6 whatever the config says, as in the reference."""
    if "vision_config" in hf:
      hf = read_field(hf, "vision_config", dict, source)

    def first(*keys, kind=int, default=REQUIRED, positive=True):  # the first of keys that is set
      key = next((k for k in keys if hf.get(k) is not None), keys[0])
      return read_field(hf, key, kind, source, default, positive=positive, within="vision_config")

    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ConfigError(f"{source}: vision_config hidden_act {act!r} is not Qwen2.5-VL's 'silu' (Qwen2-VL's "
                        "tower is not supported).")
    rope = read_field(hf, "rope_parameters", dict, source, {}, within="vision_config")
    kw = dict(
        depth=first("depth", "num_hidden_layers"),
        hidden_size=first("hidden_size", "embed_dim"),
        intermediate_size=first("intermediate_size"),
        num_heads=first("num_heads", "num_attention_heads"),
        out_hidden_size=first("out_hidden_size"),
        in_channels=first("in_channels", "in_chans", default=3),
        patch_size=first("patch_size", "spatial_patch_size", default=14),
        spatial_merge_size=first("spatial_merge_size", default=2),
        temporal_patch_size=first("temporal_patch_size", default=2),
        window_size=first("window_size", default=112),
        fullatt_block_indexes=first("fullatt_block_indexes", kind=list[int], default=(7, 15, 23, 31),
                                    positive=False),
        rope_theta=read_field(rope, "rope_theta", float, source, first("rope_theta", kind=float, default=1e4),
                              positive=True, within="vision_config.rope_parameters"),
    )
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None


def _preset(out_hidden_size: int, intermediate_size: int) -> VisionConfig:
  return VisionConfig(depth=32, hidden_size=1280, intermediate_size=intermediate_size, num_heads=16,
                      out_hidden_size=out_hidden_size)


# The released Qwen2.5-VL towers: one architecture, the merger's output width matching each language model.
# 3B and 7B from their config.json (and checkpoint shapes: gate_proj [3420, 1280]); 32B and 72B declare an
# MLP of 3456 (the technical report's Table 1 gives 3456 for all four).
VISION_PRESETS: dict[str, VisionConfig] = {
    "qwen2.5-vl-3b": _preset(2048, 3420),
    "qwen2.5-vl-7b": _preset(3584, 3420),
    "qwen2.5-vl-32b": _preset(5120, 3456),
    "qwen2.5-vl-72b": _preset(8192, 3456),
}
