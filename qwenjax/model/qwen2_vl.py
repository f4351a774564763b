"""Qwen2.5-VL: the decoder with 3D M-RoPE fed by the vision tower, and the host-side bookkeeping of a prompt.

A multimodal prompt is token ids in which each image or video stands as one run of pad tokens (`<|image_pad|>`
or `<|video_pad|>`), one per merged patch, between `<|vision_start|>` and `<|vision_end|>`. The tower's output
replaces the embeddings of those tokens, and every token gets a 3D rotary position (temporal, height, width):

    text        t = h = w = previous maximum + 1, + 1, ...
    image       starting at S: t = S, h = S + row, w = S + column (rows and columns of merged patches)
    video       t = S + floor(k * second_per_grid_t * tokens_per_second) for temporal patch k; h, w as images
    text after  continues from the maximum over all three axes + 1

(Qwen's definition, `get_rope_index` of the Qwen2.5-VL release.) After the prompt, decoding continues at
rotary position = cache position + rope_offset on all three axes, rope_offset = max position + 1 - prompt length.

    model = load_vl_model("Qwen2.5-VL-3B-Instruct/")
    prompt = vl_prompt(ids_with_one_pad_per_image, visuals, model.vl_cfg)   # expands pads, computes positions
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax._errors import ConfigError, InputError
from qwenjax.config import PRESETS, QwenConfig, read_field, read_json
from qwenjax.model.decoder import Qwen2
from qwenjax.multimodal.processing import ImageProcessorConfig, VisualInput
from qwenjax.model.vision import VISION_PRESETS, PatchBuckets, VisionConfig, VisionTower


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
  def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json") -> "QwenVLConfig":
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
  def from_file(cls, path: str | pathlib.Path) -> "QwenVLConfig":
    return cls.from_hf_config(read_json(path), source=str(path))

  def num_params(self) -> int:
    return self.text.num_params() + self.vision.num_params()


def is_vl_config(hf: Mapping[str, Any]) -> bool:
  return "vision_config" in hf or hf.get("model_type") == "qwen2_5_vl"


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
               rngs: nnx.Rngs):
    super().__init__(vl_cfg.text, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, rngs=rngs)
    self.vl_cfg = vl_cfg
    self.visual = VisionTower(vl_cfg.vision, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                              rngs=rngs)


@dataclasses.dataclass(frozen=True)
class VLPrompt:
  """A multimodal prompt ready for prefill: ids with pads expanded, positions [3, T], the rotary offset that
  decode continues with, and where each visual's tokens start."""

  ids: list[int]
  positions: np.ndarray  # [3, T] int32
  rope_offset: int
  visuals: tuple[VisualInput, ...]
  starts: tuple[int, ...]  # index in ids of each visual's first pad token


def expand_pads(ids: Sequence[int], visuals: Sequence[VisualInput], cfg: QwenVLConfig) -> list[int]:
  """Each single image / video pad token (as a chat template renders it) becomes one pad per merged patch.

  The i-th pad token takes the i-th visual; a pad of the wrong kind, or a count of pads that differs from the
  number of visuals, is an InputError."""
  out, i = [], 0
  pad_of = {"image": cfg.image_token_id, "video": cfg.video_token_id}
  for tok in ids:
    if tok not in (cfg.image_token_id, cfg.video_token_id):
      out.append(tok)
      continue
    if i >= len(visuals):
      raise InputError(f"the prompt holds more image/video placeholders than the {len(visuals)} images and videos "
                       "given.")
    if tok != pad_of[visuals[i].kind]:
      raise InputError(f"placeholder {i} of the prompt does not match its input, a {visuals[i].kind}.")
    out.extend([tok] * visuals[i].num_tokens)
    i += 1
  if i != len(visuals):
    raise InputError(f"{len(visuals)} images and videos were given, but the prompt has {i} placeholders for them.")
  return out


def mrope_positions(ids: Sequence[int], visuals: Sequence[VisualInput],
                    cfg: QwenVLConfig) -> tuple[np.ndarray, int, list[int]]:
  """3D rotary positions [3, T] of a prompt whose pads are expanded (one per merged patch), the rope offset
  decoding continues with, and the start index of each visual's run of pads.

  Qwen's definition (see the module docstring). Video time is `k * second_per_grid_t * tokens_per_second`
  computed in float32 and floored, as Qwen's reference does; text after a video continues from the maximum over
  all three axes (transformers 5.x's `get_rope_index` departs from this for long videos)."""
  merge = cfg.vision.spatial_merge_size
  ids = np.asarray(ids)
  n = len(ids)
  positions = np.zeros((3, n), np.int64)
  is_pad = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
  nxt, i, v, starts = 0, 0, 0, []  # next position, token index, visual index
  while i < n:
    if not is_pad[i]:
      positions[:, i] = nxt
      nxt, i = nxt + 1, i + 1
      continue
    if v >= len(visuals):
      raise InputError(f"pad token at index {i} has no image or video left to take its place.")
    vis = visuals[v]
    t, h, w = vis.grid_thw
    h, w = h // merge, w // merge
    count = t * h * w
    if i + count > n or not (ids[i:i + count] == ids[i]).all():
      raise InputError(f"image/video {v} needs {count} consecutive pad tokens from index {i}; the prompt has fewer.")
    if vis.kind == "video":
      scale = np.float32(vis.second_per_grid_t) * np.float32(cfg.tokens_per_second)
      time = np.floor(np.arange(t, dtype=np.float32) * scale).astype(np.int64)
    else:
      time = np.zeros(t, np.int64)
    grid = np.stack(np.meshgrid(time, np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)  # [3, t*h*w]
    positions[:, i:i + count] = grid + nxt
    starts.append(i)
    nxt = int(positions[:, i:i + count].max()) + 1
    i, v = i + count, v + 1
  if v != len(visuals):
    raise InputError(f"{len(visuals)} images and videos were given, but the prompt has pads for {v}.")
  offset = (int(positions.max()) + 1 if n else 0) - n
  return positions.astype(np.int32), offset, starts


def vl_prompt(ids: Sequence[int], visuals: Sequence[VisualInput], cfg: QwenVLConfig) -> VLPrompt:
  """Expands the pads of `ids` (one per image or video, as a chat template renders them) and computes the
  prompt's 3D positions."""
  visuals = tuple(visuals)
  expanded = expand_pads(ids, visuals, cfg)
  positions, offset, starts = mrope_positions(expanded, visuals, cfg)
  return VLPrompt(expanded, positions, offset, visuals, tuple(starts))


def encode_visuals(tower: VisionTower, visuals: Sequence[VisualInput], buckets: PatchBuckets) -> np.ndarray:
  """Vision features [sum of num_tokens, D] of a prompt's images and videos, in order.

  Every attention block of the tower stays within one frame (windows and full attention alike), so a video too
  large for the biggest bucket is encoded in pieces of whole temporal patches, with identical results."""
  pieces = []
  for v in visuals:
    t, h, w = v.grid_thw
    per_t = h * w
    step = max(1, min(t, buckets.maximum // per_t))
    for k in range(0, t, step):
      n = min(step, t - k)
      pieces.append((v.patches[k * per_t:(k + n) * per_t], (n, h, w)))
  return np.concatenate(tower.encode_images(pieces, buckets))


def patch_buckets(processor: ImageProcessorConfig) -> PatchBuckets:
  """Buckets up to the most patches one image may have under `processor`'s max_pixels (16384 at least)."""
  most = processor.max_pixels // processor.patch_size**2
  return PatchBuckets(maximum=max(PatchBuckets().maximum, 1 << (most - 1).bit_length()))
