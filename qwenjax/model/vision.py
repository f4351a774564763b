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

The host plans each call (`qwenjax.model.vision_plan.plan`: window order, rotary ids, segments, the inverse
permutation); `encode` is the jitted pure step of (graphdef, params, patches [P, C], plan arrays);
`VisionTower.encode_images` pads, plans, runs it and splits the result per image. The config and its presets
(`VisionConfig`, `VISION_PRESETS`) are in `qwenjax.model.vision_config`; attention runs through
`qwenjax.kernels.attention.vision_attention`.

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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax._errors import InputError
from qwenjax.kernels.attention import vision_attention
from qwenjax.model.layers import HFTensor, RMSNorm, check_quantize, declare, linear, read, rope
from qwenjax.model.vision_config import VisionConfig
from qwenjax.model.vision_plan import PatchBuckets, PlanArrays, check_grid, plan, query_block
from qwenjax.parallel.axes import EMBED, HEAD_DIM, HEADS, MLP


@dataclasses.dataclass(frozen=True)
class _TowerContext:
  """What every block of one call shares."""

  cos: jax.Array  # [P, H/2] float32
  sin: jax.Array  # [P, H/2] float32
  window_segments: jax.Array  # [P]
  frame_segments: jax.Array  # [P]
  block_q: int
  kv_span: int
  impl: str = "xla"  # attention implementation, `qwenjax.kernels.attention.IMPLS`


class VisionAttention(nnx.Module):
  """Fused qkv with bias, 2D RoPE, attention within a window or a frame, output projection with bias."""

  def __init__(self, cfg: VisionConfig, *, stack, dtype, param_dtype, quantize=None, rngs: nnx.Rngs):
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    w = lambda shape, axes, hf, init="normal", contract=(0,): declare(
        rngs, shape, axes, hf, stack=stack, dtype=param_dtype, init=init, quantize=quantize, contract=contract)
    pre = "visual.blocks.{layer}.attn."
    # Checkpoint rows are (q|k|v, head, head_dim); the size-3 axis has no logical name: never sharded.
    self.qkv_kernel = w((d, 3, n, h), (EMBED, None, HEADS, HEAD_DIM), HFTensor(pre + "qkv.weight", (3 * d, d), True))
    self.qkv_bias = w((3, n, h), (None, HEADS, HEAD_DIM), HFTensor(pre + "qkv.bias", (3 * d,)), "zeros")
    self.o_kernel = w((n, h, d), (HEADS, HEAD_DIM, EMBED), HFTensor(pre + "proj.weight", (d, d), True),
                      contract=(0, 1))
    self.o_bias = w((d,), (EMBED,), HFTensor(pre + "proj.bias", (d,)), "zeros")
    self.dtype = dtype

  def __call__(self, x: jax.Array, ctx: _TowerContext, full) -> jax.Array:
    """x: [P, D]; full: this block attends over frames (a Python bool, or a traced one under scan)."""
    dt = self.dtype
    qkv = (linear(x, self.qkv_kernel, dt, ctx.impl) + read(self.qkv_bias, dt)).transpose(1, 0, 2, 3)  # [3, P, N, H]
    # RoPE in float32, as the reference does, then back to the compute dtype.
    q, k = (rope(a[None].astype(jnp.float32), ctx.cos[None], ctx.sin[None])[0].astype(dt) for a in qkv[:2])
    attend = functools.partial(vision_attention, q, k, qkv[2], block_q=ctx.block_q, impl=ctx.impl)
    in_frames = lambda: attend(ctx.frame_segments)
    in_windows = lambda: attend(ctx.window_segments, kv_span=ctx.kv_span)
    if isinstance(full, bool):
      out = in_frames() if full else in_windows()
    else:
      out = jax.lax.cond(full, in_frames, in_windows)  # [P, N, H]
    n, h = self.o_kernel.shape[-3:-1]
    return linear(out.reshape(-1, n * h), self.o_kernel, dt, ctx.impl, n_in=2) + read(self.o_bias, dt)


class VisionMLP(nnx.Module):
  """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: VisionConfig, *, stack, dtype, param_dtype, quantize=None, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    w = lambda shape, axes, hf, init="normal": declare(rngs, shape, axes, hf, stack=stack, dtype=param_dtype,
                                                       init=init, quantize=quantize)
    pre = "visual.blocks.{layer}.mlp."
    self.gate = w((d, f), (EMBED, MLP), HFTensor(pre + "gate_proj.weight", (f, d), True))
    self.gate_bias = w((f,), (MLP,), HFTensor(pre + "gate_proj.bias", (f,)), "zeros")
    self.up = w((d, f), (EMBED, MLP), HFTensor(pre + "up_proj.weight", (f, d), True))
    self.up_bias = w((f,), (MLP,), HFTensor(pre + "up_proj.bias", (f,)), "zeros")
    self.down = w((f, d), (MLP, EMBED), HFTensor(pre + "down_proj.weight", (d, f), True))
    self.down_bias = w((d,), (EMBED,), HFTensor(pre + "down_proj.bias", (d,)), "zeros")
    self.dtype = dtype

  def __call__(self, x: jax.Array, impl: str = "xla") -> jax.Array:
    dt = self.dtype
    g = linear(x, self.gate, dt, impl) + read(self.gate_bias, dt)  # [P, F]
    u = linear(x, self.up, dt, impl) + read(self.up_bias, dt)
    return linear(jax.nn.silu(g) * u, self.down, dt, impl) + read(self.down_bias, dt)


class VisionBlock(nnx.Module):
  """x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

  def __init__(self, cfg: VisionConfig, *, stack=(), dtype, param_dtype, quantize=None, rngs: nnx.Rngs):
    kw = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, quantize=quantize, rngs=rngs)
    norm = lambda name: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, f"visual.blocks.{{layer}}.{name}.weight",
                                stack=stack, dtype=param_dtype, rngs=rngs)
    self.norm1 = norm("norm1")
    self.attn = VisionAttention(cfg, **kw)
    self.norm2 = norm("norm2")
    self.mlp = VisionMLP(cfg, **kw)

  def __call__(self, x: jax.Array, ctx: _TowerContext, full) -> jax.Array:
    x = x + self.attn(self.norm1(x), ctx, full)
    return x + self.mlp(self.norm2(x), ctx.impl)


class PatchMerger(nnx.Module):
  """RMSNorm per patch, 2 x 2 units concatenated to E = 4 D, Linear -> exact GELU -> Linear to O."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, quantize=None, rngs: nnx.Rngs):
    d, e, o = cfg.hidden_size, cfg.hidden_size * cfg.merge_unit, cfg.out_hidden_size
    w = lambda shape, axes, hf, init="normal": declare(rngs, shape, axes, hf, stack=(), dtype=param_dtype,
                                                       init=init, quantize=quantize)
    self.ln_q = RMSNorm(d, cfg.rms_norm_eps, "visual.merger.ln_q.weight", dtype=param_dtype, rngs=rngs)
    self.fc1 = w((e, e), (EMBED, MLP), HFTensor("visual.merger.mlp.0.weight", (e, e), True))
    self.fc1_bias = w((e,), (MLP,), HFTensor("visual.merger.mlp.0.bias", (e,)), "zeros")
    self.fc2 = w((e, o), (MLP, EMBED), HFTensor("visual.merger.mlp.2.weight", (o, e), True))
    self.fc2_bias = w((o,), (EMBED,), HFTensor("visual.merger.mlp.2.bias", (o,)), "zeros")
    self.dtype = dtype

  def __call__(self, x: jax.Array, impl: str = "xla") -> jax.Array:
    """x: [P, D], merge units contiguous -> [M, O]."""
    dt = self.dtype
    x = self.ln_q(x).reshape(-1, self.fc1.shape[0])  # [M, E]
    x = jax.nn.gelu(linear(x, self.fc1, dt, impl) + read(self.fc1_bias, dt), approximate=False)
    return linear(x, self.fc2, dt, impl) + read(self.fc2_bias, dt)


class VisionTower(nnx.Module):
  """The Qwen2.5-VL vision encoder: pixel rows of one bucket -> language-model embeddings of the merged tokens.

  dtype: compute dtype (float32 on CPU, bfloat16 on TPU/GPU); norms, RoPE and softmax are float32 regardless.
  param_dtype: storage dtype of weights. scan_layers: stacked weights under `lax.scan` (True; window and full
  blocks then pick their attention with `lax.cond`) or one array per block, unrolled (False).
  max_query_block: the most queries one attention block takes (fewer where scores would pass 256 MB).
  attention_impl: "xla" (the reference) or "pallas" (`qwenjax.kernels.segment_attention`, which skips blocks of
  different segments); a static attribute, so the engine may set it before it splits the model. It picks the
  int8 matmuls' implementation too.
  quantize: None, "int8" or "w8a8": every Linear of the tower (patch embedding, attention, MLP, merger) is then a
  `qwenjax.model.layers.QuantizedWeight`.
  """

  def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers: bool = True,
               max_query_block: int = 512, attention_impl: str = "xla", quantize: str | None = None,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.max_query_block = max_query_block
    self.attention_impl = attention_impl
    self.dtype = dtype
    self.scan_layers = scan_layers
    c, d = cfg.patch_dim, cfg.hidden_size
    conv = (d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    # Conv3d with stride = kernel over rows already cut into patches: a [C, D] matmul. Pixel axis never sharded.
    quantize = check_quantize(quantize)
    self.patch_embed = declare(rngs, (c, d), (None, EMBED), HFTensor("visual.patch_embed.proj.weight", conv, True),
                               stack=(), dtype=param_dtype, quantize=quantize)
    kw = dict(dtype=dtype, param_dtype=param_dtype, quantize=quantize, rngs=rngs)
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
    impl = self.attention_impl
    x = linear(patches[plan.patch_index].astype(dt), self.patch_embed, dt, impl)  # [P, D] window order
    angles = plan.positions.astype(jnp.float32)[..., None] * jnp.asarray(cfg.rope_inv_freq())  # [P, 2, H/4]
    angles = angles.reshape(p, -1)  # [P, H/2]: h frequencies, then w frequencies
    ctx = _TowerContext(jnp.cos(angles), jnp.sin(angles), plan.window_segments, plan.frame_segments,
                        query_block(p, cfg.num_heads, self.max_query_block), cfg.window_patches,
                        self.attention_impl)
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
    merged = self.merger(x, impl)  # [M, O] window order
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
      t, h, w = check_grid(i, grid, cfg.spatial_merge_size)
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
