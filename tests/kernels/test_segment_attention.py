"""The vision tower's segment-attention kernel (Pallas, interpret mode) against `vision_attention_reference`:
float32 within 1e-5 and bfloat16 within 2e-2 over head dims 64/80/128, 1 and 16 heads, ragged patch counts,
the tower's own window and frame segments with padding; the kernel visits exactly the key blocks the host-side
overlap allows, and fewer than all of them for windows."""

import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import ConfigError
from qwenjax.kernels.attention import IMPLS, vision_attention, vision_attention_reference
from qwenjax.kernels.segment_attention import block_overlap, kv_block_ranges, segment_attention
from qwenjax.model.vision_config import VisionConfig
from qwenjax.model.vision_plan import plan

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# The tower's segments as `plan` lays them out: 56-pixel windows (16 patches, cut to 8 or 4 at image borders)
# or Qwen2.5-VL's 112-pixel ones (64 patches), numbered across images and frames, padding -1 at the end.
SMALL_WINDOWS = VisionConfig(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
                             window_size=56, fullatt_block_indexes=(1,))
QWEN_WINDOWS = VisionConfig(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
                            fullatt_block_indexes=(1,))


def _tower_segments(cfg, grids, bucket, which="window_segments"):
  return getattr(plan(grids, bucket, cfg).arrays, which).astype(np.int32)


def _random_runs(p, rng, longest, padding=0):
  """Contiguous runs of seeded random lengths in 1..longest, then `padding` patches of segment -1."""
  lengths = rng.integers(1, longest + 1, size=p)
  runs = np.repeat(np.arange(p), lengths)[:p - padding]
  return np.concatenate([runs, np.full(padding, -1)]).astype(np.int32)


def _segments(kind, p, rng):
  if kind == "frame":  # one whole-frame segment
    return np.zeros(p, np.int32)
  if kind == "frame_padded":
    return np.where(np.arange(p) < p - p // 4, 0, -1).astype(np.int32)
  if kind == "runs":
    return _random_runs(p, rng, longest=40)
  if kind == "runs_padded":
    return _random_runs(p, rng, longest=24, padding=p // 5)
  raise ValueError(kind)


def _inputs(p, n, h, dtype, seed):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((p, n, h)), dtype) for _ in range(3)), rng


def _check(q, k, v, segments, dtype, **blocks):
  segments = jnp.asarray(segments)
  got = segment_attention(q, k, v, segments, **blocks)
  want = vision_attention_reference(q, k, v, segments, block_q=q.shape[0])
  assert got.shape == want.shape and got.dtype == want.dtype == dtype
  diff = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
  assert diff <= TOL[dtype], (q.shape, dtype, blocks, diff)
  return diff


# (P, heads, head dim, segments): P of 1, a block (64) +- 1, block multiples and between them.
SHAPES = [
    (1, 1, 80, "frame"),
    (63, 16, 80, "runs"),
    (64, 1, 64, "frame_padded"),
    (65, 16, 128, "runs_padded"),
    (128, 16, 64, "runs"),
    (192, 1, 128, "frame"),
    (300, 16, 80, "runs_padded"),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("p,n,h,kind", SHAPES, ids=[f"P{p}-N{n}-H{h}-{kind}" for p, n, h, kind in SHAPES])
def test_kernel_equals_reference(p, n, h, kind, dtype):
  (q, k, v), rng = _inputs(p, n, h, dtype, seed=p + n + h)
  _check(q, k, v, _segments(kind, p, rng), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("which", ["window_segments", "frame_segments"])
def test_tower_windows_and_frames(which, dtype):
  """The tower's own layouts: border-cut windows over an image and a 2-frame video, padding to the bucket."""
  small = _tower_segments(SMALL_WINDOWS, [(1, 10, 6), (2, 4, 8)], 160, which)  # 124 patches + 36 padding
  qwen = _tower_segments(QWEN_WINDOWS, [(1, 20, 12)], 256, which)  # 64-patch windows, cut to 32 and 16
  assert (small[-36:] == -1).all() and len(np.unique(small)) > 2
  for segments, n, h in ((small, 16, 80), (qwen, 16, 80)):
    (q, k, v), _ = _inputs(len(segments), n, h, dtype, seed=len(segments))
    _check(q, k, v, segments, dtype)


@pytest.mark.parametrize("block_q,block_k", [(16, 64), (64, 16), (32, 32), (128, 128)])
def test_block_sizes_change_nothing(block_q, block_k):
  (q, k, v), rng = _inputs(150, 2, 80, jnp.float32, seed=7)
  _check(q, k, v, _random_runs(150, rng, longest=30, padding=20), jnp.float32, block_q=block_q, block_k=block_k)


def test_windows_skip_most_key_blocks():
  """Host-side overlap on a full-size bucket (4096 patches; 64-patch windows, or whole frames): the kernel's
  loop ranges cover exactly the overlapping key blocks (runs are contiguous) and, for windows, few of them."""
  grids = [(1, 36, 52), (2, 22, 30)]  # an image and a 2-frame video: 1872 + 1320 patches, windows cut at borders
  for which, most in (("window_segments", 0.1), ("frame_segments", 1.0)):
    segments = jnp.asarray(_tower_segments(QWEN_WINDOWS, grids, 4096, which))
    overlap = block_overlap(segments, block_q=64, block_k=64)  # [I, J]
    first, last = kv_block_ranges(overlap)
    visited = int((last - first + 1).sum())
    assert visited == int(overlap.sum()), which  # nothing visited that could be skipped
    assert overlap.shape == (64, 64) and visited <= most * overlap.size, (which, visited)
  # Windows of at most 64 patches in 64-patch blocks: at most 3 key blocks (of 64) per query block of real
  # patches; the 904 padding patches attend to each other, as the reference has them: key blocks 49 to 63.
  windows = jnp.asarray(_tower_segments(QWEN_WINDOWS, grids, 4096))
  first, last = (np.asarray(a) for a in kv_block_ranges(block_overlap(windows, block_q=64, block_k=64)))
  real = 3192 // 64  # query blocks of real patches only
  assert (last - first + 1)[:real].max() <= 3
  assert (first[real + 1:] == real).all() and (last[real:] == 63).all()


def test_kernel_visits_only_the_ranges():
  """Poison the values of one key block with NaN: exactly the query blocks whose range holds it turn NaN (even
  a masked key's 0 * NaN would), and every other query block is unchanged: the kernel never reads the rest."""
  p, block = 192, 16
  (q, k, v), rng = _inputs(p, 2, 64, jnp.float32, seed=11)
  segments = jnp.asarray(_random_runs(p, rng, longest=20, padding=12))
  first, last = (np.asarray(a) for a in kv_block_ranges(block_overlap(segments, block_q=block, block_k=block)))
  assert int((last - first + 1).sum()) <= (p // block) ** 2 // 4  # 36 of 144
  clean = np.asarray(segment_attention(q, k, v, segments, block_q=block, block_k=block))
  for j in (0, 5, p // block - 1):
    poisoned = v.at[j * block:(j + 1) * block].set(jnp.nan)
    out = np.asarray(segment_attention(q, k, poisoned, segments, block_q=block, block_k=block))
    nan_blocks = np.isnan(out).reshape(p // block, -1).any(1)
    np.testing.assert_array_equal(nan_blocks, (first <= j) & (j <= last), err_msg=f"key block {j}")
    np.testing.assert_array_equal(out.reshape(p // block, -1)[~nan_blocks], clean.reshape(p // block, -1)[~nan_blocks])


def test_dispatch():
  assert IMPLS == ("xla", "pallas")
  (q, k, v), rng = _inputs(96, 4, 80, jnp.float32, seed=3)
  segments = jnp.asarray(_random_runs(96, rng, longest=16, padding=8))
  xla = vision_attention(q, k, v, segments, block_q=32, kv_span=16)
  pallas = vision_attention(q, k, v, segments, block_q=32, kv_span=16, impl="pallas")
  np.testing.assert_allclose(np.asarray(pallas), np.asarray(xla), atol=1e-5, rtol=0)
  with pytest.raises(ConfigError, match=r"attention impl 'triton' is not one of xla, pallas"):
    vision_attention(q, k, v, segments, block_q=32, impl="triton")


def test_bad_arguments_name_the_culprit():
  (q, k, v), _ = _inputs(32, 2, 80, jnp.float32, seed=0)
  segments = jnp.zeros(32, jnp.int32)
  with pytest.raises(ConfigError, match=r"block_k=48 is not a power of two >= 16"):
    segment_attention(q, k, v, segments, block_k=48)
  with pytest.raises(ConfigError, match=r"segments have shape \(31,\); expected \(32,\)"):
    segment_attention(q, k, v, segments[:31])
  with pytest.raises(ConfigError, match=r"one dtype"):
    segment_attention(q, k, v.astype(jnp.bfloat16), segments)

