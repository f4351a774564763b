"""The host-side bookkeeping of a Qwen2.5-VL prompt: one pad token per merged patch, and 3D rotary positions.

A multimodal prompt is token ids in which each image or video stands as one run of pad tokens (`<|image_pad|>`
or `<|video_pad|>`), one per merged patch, between `<|vision_start|>` and `<|vision_end|>`. Every token gets a
3D rotary position (temporal, height, width):

    text        t = h = w = previous maximum + 1, + 1, ...
    image       starting at S: t = S, h = S + row, w = S + column (rows and columns of merged patches)
    video       t = S + floor(k * second_per_grid_t * tokens_per_second) for temporal patch k; h, w as images
    text after  continues from the maximum over all three axes + 1

(Qwen's definition, `get_rope_index` of the Qwen2.5-VL release.) After the prompt, decoding continues at
rotary position = cache position + rope_offset on all three axes, rope_offset = max position + 1 - prompt length.

    prompt = vl_prompt(ids_with_one_pad_per_image, visuals, model.vl_cfg)   # expands pads, computes positions
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from qwenjax._errors import InputError
from qwenjax.model.qwen2_vl import QwenVLConfig
from qwenjax.multimodal.processing import VisualInput


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
