"""Host-side planning for the Qwen2.5-VL vision tower: patch buckets, and the index arrays of one call.

An image is a grid of t x h x w patches in the image processor's order (each 2 x 2 block of patches, a merge
unit, contiguous). `plan` (numpy) turns the grids of one call into index arrays for one patch-count bucket P:
Qwen's window order (a permutation of merge units, windows contiguous), rotary (h, w) ids, window and frame
segment ids, and the inverse permutation that puts merged tokens back in the processor's order. The tower
(`qwenjax.model.vision`) runs on those arrays, so its shapes depend on P alone. `PatchBuckets` are the P it is
compiled at; `query_block` sizes its attention blocks for a bucket.

Legend: P patches (the bucket), M merged tokens (P / 4), N heads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from qwenjax._errors import InputError
from qwenjax.kernels.buckets import LengthBuckets
from qwenjax.model.vision_config import VisionConfig

# Upper bound on the float32 attention scores one query block holds ([N, Q, S] elements): 256 MB.
_SCORE_BUDGET = 1 << 26
_PAD_SEGMENT = -1  # segment id of padding patches: they attend only to each other, and nothing attends to them


@dataclasses.dataclass(frozen=True)
class PatchBuckets(LengthBuckets):
  """The patch counts the tower is compiled at: powers of two from `minimum`, capped at `maximum`.

  The default cap, 16384 patches, holds one 1792 x 1792 image (4096 output tokens); a model serving larger
  images (Qwen's processor allows up to 12845056 pixels, 65536 patches) raises it.
  """

  maximum: int = 16384
  minimum: int = 256

  def bucket(self, length: int) -> int:
    """The smallest bucket that holds `length` patches."""
    if length > self.sizes[-1]:
      raise InputError(f"{length} patches exceed the largest vision bucket ({self.sizes[-1]} patches); "
                       "resize the image or raise PatchBuckets.maximum.")
    return super().bucket(length)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlanArrays:
  """What the device needs to run one bucket: index arrays in window order (position i of the tower's
  sequence). Leaves are numpy arrays on the host, jax arrays inside `encode`.

  patch_index: [P] int32, the input row (processor order, padding after) at each position.
  positions: [P, 2] int32, the patch's (row, column) in its image: the 2D RoPE ids.
  window_segments: [P] int32, the attention window (numbered across all images and frames); padding -1.
  frame_segments: [P] int32, the frame (numbered across all images); padding -1.
  valid: [P] bool, false at padding.
  merge_restore: [M] int32, the merged token (window order) that goes to each output row (processor order).
  """

  patch_index: Any
  positions: Any
  window_segments: Any
  frame_segments: Any
  valid: Any
  merge_restore: Any


@dataclasses.dataclass(frozen=True)
class VisionPlan:
  """The host's plan for one call: the grids it serves, in order, and the device arrays for their bucket."""

  grids: tuple[tuple[int, int, int], ...]
  arrays: PlanArrays
  merge_unit: int

  @property
  def bucket(self) -> int:
    return int(self.arrays.patch_index.shape[0])

  @property
  def num_patches(self) -> int:
    return sum(t * h * w for t, h, w in self.grids)

  @property
  def tokens(self) -> list[int]:
    """Output tokens of each grid (t * h * w / 4)."""
    return [t * h * w // self.merge_unit for t, h, w in self.grids]

  def split(self, merged: np.ndarray) -> list[np.ndarray]:
    """The tower's output [M, O] (processor order, padding last) -> one [tokens_i, O] array per grid."""
    bounds = np.cumsum([0] + self.tokens)
    return [merged[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def check_grid(i: int, grid, merge: int) -> tuple[int, int, int]:
  """Image `i`'s grid_thw as (t, h, w), or an InputError naming it."""
  try:
    t, h, w = (int(v) for v in grid)
  except (TypeError, ValueError):
    raise InputError(f"image {i}: grid_thw {grid!r} is not three integers (t, h, w).") from None
  if min(t, h, w) < 1 or h % merge or w % merge:
    raise InputError(f"image {i}: grid_thw {(t, h, w)} needs t >= 1 and h, w positive multiples of "
                     f"spatial_merge_size {merge}.")
  return t, h, w


def plan(grids: Sequence[tuple[int, int, int]], bucket: int, cfg: VisionConfig) -> VisionPlan:
  """Index arrays that run `grids` (patch grids (t, h, w) in processor order) as one sequence of `bucket` patches.

  Window order is Qwen's `get_window_index`: per image and frame, the merge grid padded to whole windows, windows
  row-major, merge units row-major inside each window, padding dropped; offset across images. Windows and frames
  are contiguous runs in that order, none longer than `cfg.window_patches` for windows.
  """
  merge, unit, win = cfg.spatial_merge_size, cfg.merge_unit, cfg.window_merge_units
  grids = tuple(check_grid(i, g, merge) for i, g in enumerate(grids))
  n = sum(t * h * w for t, h, w in grids)
  if not grids:
    raise InputError("a vision plan needs at least one image grid.")
  if bucket % unit:
    raise InputError(f"vision bucket {bucket} is not a multiple of {unit} patches (one merge unit).")
  if n > bucket:
    raise InputError(f"{len(grids)} image(s) of {n} patches in all (grids {list(grids)}) exceed the vision bucket "
                     f"of {bucket} patches.")

  order, window_ids, frame_ids, positions = [], [], [], []  # per merge unit, window order
  unit_offset = window_offset = frame_offset = 0
  for t, h, w in grids:
    gh, gw = h // merge, w // merge
    # (row, column) of every patch, merge units in processor order: [t * gh * gw, unit, 2]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    hw = np.stack([rows, cols], -1).reshape(gh, merge, gw, merge, 2).transpose(0, 2, 1, 3, 4)
    hw = np.tile(hw.reshape(1, gh * gw, unit, 2), (t, 1, 1, 1)).reshape(t * gh * gw, unit, 2)

    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    index = np.pad(index, ((0, 0), (0, -gh % win), (0, -gw % win)), constant_values=-1)
    nh, nw = index.shape[1] // win, index.shape[2] // win
    index = index.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
    kept = index >= 0
    local = index[kept]  # merge units of this image in window order
    order.append(local + unit_offset)
    window_ids.append(window_offset + np.repeat(np.arange(t * nh * nw), kept.sum(1)))
    frame_ids.append(frame_offset + local // (gh * gw))
    positions.append(hw[local])
    unit_offset += t * gh * gw
    window_offset += t * nh * nw
    frame_offset += t

  m_real, m = n // unit, bucket // unit
  window_index = np.concatenate(order + [np.arange(m_real, m)]).astype(np.int32)  # [M] merge unit at each slot
  pad = bucket - n
  arrays = PlanArrays(
      patch_index=(window_index[:, None] * unit + np.arange(unit)).reshape(bucket).astype(np.int32),
      positions=np.concatenate(positions + [np.zeros((pad // unit, unit, 2), np.int64)]).reshape(bucket, 2)
      .astype(np.int32),
      window_segments=np.concatenate([np.repeat(np.concatenate(window_ids), unit),
                                      np.full(pad, _PAD_SEGMENT)]).astype(np.int32),
      frame_segments=np.concatenate([np.repeat(np.concatenate(frame_ids), unit),
                                     np.full(pad, _PAD_SEGMENT)]).astype(np.int32),
      valid=np.arange(bucket) < n,
      merge_restore=np.argsort(window_index).astype(np.int32),
  )
  return VisionPlan(grids, arrays, unit)


def query_block(num_patches: int, num_heads: int, maximum: int = 512) -> int:
  """Queries per attention block for a bucket: a divisor of P, at most `maximum`, scores within `_SCORE_BUDGET`."""
  limit = max(1, min(maximum, _SCORE_BUDGET // (num_heads * num_patches)))
  return math.gcd(num_patches, 1 << (limit.bit_length() - 1))
