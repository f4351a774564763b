"""The Qwen2.5-VL vision tower as Flax NNX modules, with bucketed dynamic resolution.

An image is a grid of t x h x w patches (t = frames / 2, patches of 14 x 14 pixels); the image processor gives
one row of C = 3 * 2 * 14 * 14 = 1176 pixel values per patch, each 2 x 2 block of patches (a merge unit)
contiguous. The tower embeds each row (Conv3d with stride = kernel is a [C, D] matmul), runs `depth` pre-norm
blocks with 2D RoPE, attending within 112-pixel windows (4 x 4 merge units) except in `fullatt_block_indexes`
where a whole frame attends to itself, then merges each 2 x 2 unit into one token of the language model's width.

Shapes depend only on a patch-count bucket P, never on the image sizes, so one program per bucket serves every
mix of images and videos:

    tower = VisionTower(VISION_PRESETS["qwen2.5-vl-7b"], rngs=nnx.Rngs(0))    # or load weights, see below
    [features] = tower.encode_images([(patches, (1, 32, 44))])                  # [32 * 44 / 4, 3584]

`plan` (host, numpy) turns the grids into index arrays for one bucket: Qwen's window order (a permutation of
merge units, windows contiguous), rotary (h, w) ids, window and frame segment ids, and the inverse permutation
that puts merged tokens back in the processor's order. `encode` is the jitted pure step of (graphdef, params,
patches [P, C], plan arrays); `VisionTower.encode_images` pads, plans, runs it and splits the result per image.

Weights load with `qwenjax.checkpoints.hf.load_params`: every weight is declared with its Hugging Face name as Qwen's
released checkpoints store it (`visual.blocks.{layer}.attn.qkv.weight`, ...), its layout and its logical axes.

Einsum legend:
  P patches (the bucket)          M merged tokens (P / 4)        C pixel values of one patch (1176)
  D hidden (1280)                 N heads                        H head dim (D / N)
  F MLP hidden                    E merger input (4 D)           O output width (the language model's hidden)
  Q queries of one block          S keys one query block reads   L layers
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax._errors import ConfigError, InputError
from qwenjax.config import REQUIRED, read_field
from qwenjax.model.decoder import EMBED, HEAD_DIM, HEADS, MLP, HFTensor, RMSNorm, _weight, rope
from qwenjax.engine.programs import LengthBuckets

# Upper bound on the float32 attention scores one query block holds ([N, Q, S] elements): 256 MB.
_SCORE_BUDGET = 1 << 26
_PAD_SEGMENT = -1  # segment id of padding patches: they attend only to each other, and nothing attends to them


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
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "VisionConfig":
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


# --- Host-side planning --------------------------------------------------------------------------------------


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


def _check_grid(i: int, grid, merge: int) -> tuple[int, int, int]:
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
  grids = tuple(_check_grid(i, g, merge) for i, g in enumerate(grids))
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


# --- Device side ---------------------------------------------------------------------------------------------


def vision_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block_q: int,
                               kv_span: int | None = None) -> jax.Array:
  """Non-causal attention within segments, in plain JAX (the reference a Pallas kernel will match).

  q, k, v: [P, N, H]; segments: [P] int32. Query i attends to key j iff segments[i] == segments[j]; every token
  attends to itself, so no row is empty. Queries go `block_q` at a time (P a multiple of it), so scores take
  [N, Q, S] float32, never [N, P, P]: S = P, or with `kv_span` (every segment a contiguous run of at most
  `kv_span` tokens: windows) S = Q + 2 * kv_span keys around the block. Returns [P, N, H] in q's dtype.
  """
  p, _, h = q.shape
  assert p % block_q == 0, (p, block_q)
  span = p if kv_span is None else min(p, block_q + 2 * kv_span)

  def one_block(i):
    start = i * block_q
    qb = jax.lax.dynamic_slice_in_dim(q, start, block_q)  # [Q, N, H]
    q_seg = jax.lax.dynamic_slice_in_dim(segments, start, block_q)  # [Q]
    k_start = jnp.clip(start - (span - block_q) // 2, 0, p - span)
    kb, vb = (jax.lax.dynamic_slice_in_dim(a, k_start, span) for a in (k, v))  # [S, N, H]
    k_seg = jax.lax.dynamic_slice_in_dim(segments, k_start, span)  # [S]
    scores = jnp.einsum("qnh,snh->nqs", qb, kb, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where((q_seg[:, None] == k_seg[None, :])[None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("nqs,snh->qnh", probs, vb)

  return jax.lax.map(one_block, jnp.arange(p // block_q)).reshape(q.shape)


def query_block(num_patches: int, num_heads: int, maximum: int = 512) -> int:
  """Queries per attention block for a bucket: a divisor of P, at most `maximum`, scores within `_SCORE_BUDGET`."""
  limit = max(1, min(maximum, _SCORE_BUDGET // (num_heads * num_patches)))
  return math.gcd(num_patches, 1 << (limit.bit_length() - 1))


@dataclasses.dataclass(frozen=True)
class _TowerContext:
  """What every block of one call shares."""

  cos: jax.Array  # [P, H/2] float32
  sin: jax.Array  # [P, H/2] float32
  window_segments: jax.Array  # [P]
  frame_segments: jax.Array  # [P]
  block_q: int
  kv_span: int


class VisionAttention(nnx.Module):
  """Fused qkv with bias, 2D RoPE, attention within a window or a frame, output projection with bias."""

  def __init__(self, cfg: VisionConfig, *, stack, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    w = lambda shape, axes, hf, init="normal": _weight(rngs, shape, axes, hf, stack=stack, dtype=param_dtype,
                                                       init=init)
    pre = "visual.blocks.{layer}.attn."
    # Checkpoint rows are (q|k|v, head, head_dim); the size-3 axis has no logical name: never sharded.
    self.qkv_kernel = w((d, 3, n, h), (EMBED, None, HEADS, HEAD_DIM), HFTensor(pre + "qkv.weight", (3 * d, d), True))
    self.qkv_bias = w((3, n, h), (None, HEADS, HEAD_DIM), HFTensor(pre + "qkv.bias", (3 * d,)), "zeros")
    self.o_kernel = w((n, h, d), (HEADS, HEAD_DIM, EMBED), HFTensor(pre + "proj.weight", (d, d), True))
    self.o_bias = w((d,), (EMBED,), HFTensor(pre + "proj.bias", (d,)), "zeros")
    self.dtype = dtype

  def __call__(self, x: jax.Array, ctx: _TowerContext, full) -> jax.Array:
    """x: [P, D]; full: this block attends over frames (a Python bool, or a traced one under scan)."""
    dt = self.dtype
    qkv = jnp.einsum("pd,dsnh->spnh", x, self.qkv_kernel[...].astype(dt)) + self.qkv_bias[...].astype(dt)[:, None]
    # RoPE in float32, as the reference does, then back to the compute dtype.
    q, k = (rope(a[None].astype(jnp.float32), ctx.cos[None], ctx.sin[None])[0].astype(dt) for a in qkv[:2])
    attend = functools.partial(vision_attention_reference, q, k, qkv[2], block_q=ctx.block_q)
    in_frames = lambda: attend(ctx.frame_segments)
    in_windows = lambda: attend(ctx.window_segments, kv_span=ctx.kv_span)
    if isinstance(full, bool):
      out = in_frames() if full else in_windows()
    else:
      out = jax.lax.cond(full, in_frames, in_windows)  # [P, N, H]
    n, h, d = self.o_kernel.shape[-3:]
    return out.reshape(-1, n * h) @ self.o_kernel[...].astype(dt).reshape(n * h, d) + self.o_bias[...].astype(dt)


class VisionMLP(nnx.Module):
  """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: VisionConfig, *, stack, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    w = lambda shape, axes, hf, init="normal": _weight(rngs, shape, axes, hf, stack=stack, dtype=param_dtype,
                                                       init=init)
    pre = "visual.blocks.{layer}.mlp."
    self.gate = w((d, f), (EMBED, MLP), HFTensor(pre + "gate_proj.weight", (f, d), True))
    self.gate_bias = w((f,), (MLP,), HFTensor(pre + "gate_proj.bias", (f,)), "zeros")
    self.up = w((d, f), (EMBED, MLP), HFTensor(pre + "up_proj.weight", (f, d), True))
    self.up_bias = w((f,), (MLP,), HFTensor(pre + "up_proj.bias", (f,)), "zeros")
    self.down = w((f, d), (MLP, EMBED), HFTensor(pre + "down_proj.weight", (d, f), True))
    self.down_bias = w((d,), (EMBED,), HFTensor(pre + "down_proj.bias", (d,)), "zeros")
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    g = x @ self.gate[...].astype(dt) + self.gate_bias[...].astype(dt)  # [P, F]
    u = x @ self.up[...].astype(dt) + self.up_bias[...].astype(dt)
    return (jax.nn.silu(g) * u) @ self.down[...].astype(dt) + self.down_bias[...].astype(dt)


class VisionBlock(nnx.Module):
  """x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

  def __init__(self, cfg: VisionConfig, *, stack=(), dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = lambda name: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, f"visual.blocks.{{layer}}.{name}.weight",
                                stack=stack, dtype=param_dtype, rngs=rngs)
    self.norm1 = norm("norm1")
    self.attn = VisionAttention(cfg, **kw)
    self.norm2 = norm("norm2")
    self.mlp = VisionMLP(cfg, **kw)

  def __call__(self, x: jax.Array, ctx: _TowerContext, full) -> jax.Array:
    x = x + self.attn(self.norm1(x), ctx, full)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm per patch, 2 x 2 units concatenated to E = 4 D, Linear -> exact GELU -> Linear to O."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, e, o = cfg.hidden_size, cfg.hidden_size * cfg.merge_unit, cfg.out_hidden_size
    w = lambda shape, axes, hf, init="normal": _weight(rngs, shape, axes, hf, stack=(), dtype=param_dtype,
                                                       init=init)
    self.ln_q = RMSNorm(d, cfg.rms_norm_eps, "visual.merger.ln_q.weight", dtype=param_dtype, rngs=rngs)
    self.fc1 = w((e, e), (EMBED, MLP), HFTensor("visual.merger.mlp.0.weight", (e, e), True))
    self.fc1_bias = w((e,), (MLP,), HFTensor("visual.merger.mlp.0.bias", (e,)), "zeros")
    self.fc2 = w((e, o), (MLP, EMBED), HFTensor("visual.merger.mlp.2.weight", (o, e), True))
    self.fc2_bias = w((o,), (EMBED,), HFTensor("visual.merger.mlp.2.bias", (o,)), "zeros")
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [P, D], merge units contiguous -> [M, O]."""
    dt = self.dtype
    x = self.ln_q(x).reshape(-1, self.fc1.shape[0])  # [M, E]
    x = jax.nn.gelu(x @ self.fc1[...].astype(dt) + self.fc1_bias[...].astype(dt), approximate=False)
    return x @ self.fc2[...].astype(dt) + self.fc2_bias[...].astype(dt)


class VisionTower(nnx.Module):
  """The Qwen2.5-VL vision encoder: pixel rows of one bucket -> language-model embeddings of the merged tokens.

  dtype: compute dtype (float32 on CPU, bfloat16 on TPU/GPU); norms, RoPE and softmax are float32 regardless.
  param_dtype: storage dtype of weights. scan_layers: stacked weights under `lax.scan` (True; window and full
  blocks then pick their attention with `lax.cond`) or one array per block, unrolled (False).
  max_query_block: the most queries one attention block takes (fewer where scores would pass 256 MB).
  """

  def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers: bool = True,
               max_query_block: int = 512, rngs: nnx.Rngs):
    self.cfg = cfg
    self.max_query_block = max_query_block
    self.dtype = dtype
    self.scan_layers = scan_layers
    c, d = cfg.patch_dim, cfg.hidden_size
    conv = (d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    # Conv3d with stride = kernel over rows already cut into patches: a [C, D] matmul. Pixel axis never sharded.
    self.patch_embed = _weight(rngs, (c, d), (None, EMBED), HFTensor("visual.patch_embed.proj.weight", conv, True),
                               stack=(), dtype=param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if scan_layers:
      self.layers = VisionBlock(cfg, stack=(cfg.depth,), **kw)
    else:
      self.layers = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, **kw)

  def __call__(self, patches: jax.Array, plan_arrays: PlanArrays) -> jax.Array:
    """patches: [P, C] in processor order, padding after; plan_arrays: `plan(...).arrays` for bucket P.

    Returns [M, O] embeddings of the merged tokens in processor order; rows past the real tokens are zero."""
    cfg, dt = self.cfg, self.dtype
    p, plan = patches.shape[0], plan_arrays
    assert plan.patch_index.shape == (p,), (patches.shape, plan.patch_index.shape)
    x = patches[plan.patch_index].astype(dt) @ self.patch_embed[...].astype(dt)  # [P, D] window order
    angles = plan.positions.astype(jnp.float32)[..., None] * jnp.asarray(cfg.rope_inv_freq())  # [P, 2, H/4]
    angles = angles.reshape(p, -1)  # [P, H/2]: h frequencies, then w frequencies
    ctx = _TowerContext(jnp.cos(angles), jnp.sin(angles), plan.window_segments, plan.frame_segments,
                        query_block(p, cfg.num_heads, self.max_query_block), cfg.window_patches)
    full = cfg.full_attention_layers()
    if self.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(x, xs):
        layer_state, layer_full = xs
        return nnx.merge(graphdef, layer_state)(x, ctx, layer_full), None

      x, _ = jax.lax.scan(body, x, (stacked, jnp.asarray(full)))
    else:
      for i, block in enumerate(self.layers):
        x = block(x, ctx, bool(full[i]))
    merged = self.merger(x)  # [M, O] window order
    valid = plan.valid.reshape(-1, cfg.merge_unit)[:, 0]  # [M]
    return jnp.where(valid[plan.merge_restore][:, None], merged[plan.merge_restore], 0)

  def encode_images(self, images: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
                    buckets: PatchBuckets | None = None) -> list[np.ndarray]:
    """Encodes images and videos: (patches [t*h*w, C] float32 in processor order, grid_thw) each.

    Consecutive images share one call while their patches fit the largest bucket; each call pads to its bucket
    and runs the jitted `encode`, so any mix of sizes compiles one program per bucket. Returns one
    [t*h*w/4, O] numpy array per image, in order.
    """
    cfg, buckets = self.cfg, buckets or PatchBuckets()
    checked = []
    for i, (patches, grid) in enumerate(images):
      t, h, w = _check_grid(i, grid, cfg.spatial_merge_size)
      patches = np.asarray(patches)
      if patches.shape != (t * h * w, cfg.patch_dim):
        raise InputError(f"image {i}: patches have shape {patches.shape}, expected {(t * h * w, cfg.patch_dim)} "
                         f"for grid_thw {(t, h, w)}.")
      if t * h * w > buckets.maximum:
        raise InputError(f"image {i}: {t * h * w} patches (grid_thw {(t, h, w)}) exceed the largest vision bucket "
                         f"({buckets.maximum} patches); resize the image or raise PatchBuckets.maximum.")
      checked.append((patches, (t, h, w)))

    groups, size = [], buckets.maximum + 1  # size: patches in the last group (none yet: over the cap)
    for item in checked:
      n = item[0].shape[0]
      if size + n > buckets.maximum:
        groups.append([])
        size = 0
      groups[-1].append(item)
      size += n

    graphdef, params = nnx.split(self)
    out = []
    for group in groups:
      n = sum(p.shape[0] for p, _ in group)
      call = plan([g for _, g in group], buckets.bucket(n), cfg)
      padded = np.zeros((call.bucket, cfg.patch_dim), np.float32)
      padded[:n] = np.concatenate([p for p, _ in group])
      out.extend(call.split(np.asarray(encode(graphdef, params, padded, call.arrays))))
    return out


def encode_impl(graphdef, params, patches: jax.Array, plan_arrays: PlanArrays) -> jax.Array:
  """The tower as a pure function: patches [P, C] and plan arrays of bucket P -> merged embeddings [M, O]."""
  return nnx.merge(graphdef, params)(patches, plan_arrays)


encode = jax.jit(encode_impl, static_argnames=("graphdef",))
