"""A prompt's images and videos through the Qwen2.5-VL vision tower: the patch buckets an image processor needs,
and the features that replace the embeddings of the prompt's pad tokens (`qwenjax.model.qwen2_vl`).

    buckets = patch_buckets(loaded.image_processor)
    features = encode_visuals(loaded.model.visual, prompt.visuals, buckets)   # [sum of num_tokens, D]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwenjax.kernels.buckets import next_power_of_two
from qwenjax.model.vision import VisionTower
from qwenjax.model.vision_plan import PatchBuckets
from qwenjax.multimodal.processing import ImageProcessorConfig, VisualInput


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
  return PatchBuckets(maximum=max(PatchBuckets().maximum, next_power_of_two(most)))
