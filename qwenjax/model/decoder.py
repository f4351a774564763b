"""The Qwen2 / Qwen2.5 dense decoder as Flax NNX modules, and its KV cache.

Every weight is declared once, by `_weight`: its shape, logical axes, initialiser, and where it comes from in
a Hugging Face checkpoint. Abstract shapes (`nnx.eval_shape`), shardings (`qwenjax.parallel.sharding`) and checkpoint
loading (`qwenjax.checkpoints.hf`) all read those declarations.

Layers are either stacked and scanned (one `Block` whose weights carry a leading "layers" axis: compile time
independent of depth, the TPU/GPU default) or unrolled (a list of `Block`s with separate arrays: faster decode on
XLA:CPU). `scan_layers` picks one; the math is the same code.

Einsum legend:
  B batch            T query tokens of this step     S key positions (cache length)
  D embed (hidden)   N query heads                   K KV heads
  G query heads per KV head (N = K*G)                H head dim
  F MLP hidden       V vocabulary                    L layers
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.config import QwenConfig
from qwenjax.parallel.sharding import constrain

# Logical axis names. Sharding rules (qwenjax.parallel.sharding) map these, and only these, onto mesh axes.
BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS = (
    "batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")

_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """Where a weight lives in a Hugging Face checkpoint.

  name: tensor name; "{layer}" stands for the layer index of per-layer weights.
  shape: the tensor's shape in the checkpoint.
  transpose: the checkpoint holds a torch Linear weight [out, in]; ours is [in..., out...]. A Conv weight
    [out, C, kernel...] whose stride equals its kernel (a patch embedding) is the Linear [out, C * prod(kernel)].
  """

  name: str
  shape: tuple[int, ...]
  transpose: bool = False

  def to_param(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Checkpoint layout -> param layout (transpose, then split fused head dims)."""
    if self.transpose:
      array = array.reshape(array.shape[0], -1).T if array.ndim > 2 else array.T
    return np.ascontiguousarray(array.reshape(shape))


def _weight(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], hf: HFTensor, *,
            stack: tuple[int, ...], dtype, init: str = "normal") -> nnx.Param:
  """Declares one weight. `stack` is (L,) for scanned layers: it prepends the "layers" axis."""
  full_shape = (*stack, *shape)
  full_axes = (LAYERS,) * len(stack) + axes
  assert len(shape) == len(axes), (shape, axes)
  if init == "ones":
    value = jnp.ones(full_shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(full_shape, dtype)
  else:
    value = (_INIT_STD * jax.random.normal(rngs.params(), full_shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=full_axes, hf=hf)


class RMSNorm(nnx.Module):
  """RMSNorm in float32, cast back to the input dtype, then times the weight (Qwen2's order)."""

  def __init__(self, dim: int, eps: float, hf_name: str, *, stack=(), dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _weight(rngs, (dim,), (EMBED,), HFTensor(hf_name, (dim,)), stack=stack, dtype=dtype, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...] * xf.astype(x.dtype)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding in the half-split layout. x: [B, T, N, H]; cos, sin: [B, T, H/2] float32."""
  h2 = x.shape[-1] // 2
  x1, x2 = x[..., :h2], x[..., h2:]
  c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope_tables(inv_freq: np.ndarray, scale: float, positions: jax.Array,
                mrope_section: tuple[int, ...] | None = None) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, H/2] in float32 for integer positions [B, T], or, with `mrope_section`, for 3D M-RoPE
  positions [3, B, T] (temporal, height, width): frequency i turns with the axis whose section holds it."""
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2] or [3, B, T, H/2]
  if mrope_section is not None:
    axis_of_freq = np.repeat(np.arange(len(mrope_section)), mrope_section)  # [H/2]
    angles = jnp.take_along_axis(angles, jnp.asarray(axis_of_freq)[None, None, None, :], axis=0)[0]
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer, one row per sequence.

  k, v: [L, B, K, S, H], logical axes (layers, batch, kv_heads, length, head_dim). Position p of sequence b
    lives at [:, b, :, p]; keys are stored after RoPE. Heads before positions, so that attention reads each
    head's [S, H] block contiguously (no per-step transpose of the cache).
  lengths: [B] int32, tokens held per sequence = the position the next token is written to. Slots at or past
    `lengths` hold stale data; attention never reads them because keys past the query's position are masked.
  rope_offset: [B] int32, RoPE position minus cache position of the tokens that follow (0 for text; with
    M-RoPE, an image's tokens advance the rotary position by less than their count: Qwen's `rope_deltas`).
  A step writing T tokens (a padded prompt bucket) at position p needs p + T <= S: `qwenjax.Engine` allocates
  its largest prefill chunk of headroom past the context it serves.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  rope_offset: jax.Array

  AXES = (LAYERS, BATCH, KV_HEADS, LENGTH, HEAD_DIM)

  @classmethod
  def zeros(cls, cfg: QwenConfig, batch: int, max_len: int, dtype=jnp.float32,
            sharding: "KVCache | None" = None) -> "KVCache":
    """An empty cache; `sharding` (a KVCache of shardings, `qwenjax.parallel.sharding.cache_sharding`) allocates each
    device's shards in place."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    where = sharding or cls(None, None, None, None)
    return cls(jnp.zeros(shape, dtype, device=where.k), jnp.zeros(shape, dtype, device=where.v),
               jnp.zeros((batch,), jnp.int32, device=where.lengths),
               jnp.zeros((batch,), jnp.int32, device=where.rope_offset))

  def constrained(self) -> "KVCache":
    """Inside a jitted step under a mesh: the cache pinned to its sharding, so that a step returns it laid out as
    it came (donation reuses the buffers, and the layout never drifts). Without a mesh: itself."""
    return KVCache(constrain(self.k, self.AXES), constrain(self.v, self.AXES), constrain(self.lengths, (BATCH,)),
                   constrain(self.rope_offset, (BATCH,)))

  @property
  def max_len(self) -> int:
    return self.k.shape[3]


def _write_rows(cache: jax.Array, layer, rows: jax.Array, start: jax.Array, new: jax.Array) -> jax.Array:
  """cache[layer, rows[b], :, start[b]:start[b]+T] = new[b] for each b. cache: [L, C, K, S, H]; new: [B, T, K, H].

  One in-place dynamic_update_slice per row, in a loop: XLA:CPU lowers the equivalent scatter to a loop fusion
  that rewrites the whole cache, once per layer (4.8 GB per step for 32 rows of 256 positions of the 0.5B model).
  A slice that would run past the cache's end is clamped by XLA, so callers leave T positions of headroom.
  """
  new = new.astype(cache.dtype).transpose(0, 2, 1, 3)  # [B, K, T, H]

  def body(b, cache):
    return jax.lax.dynamic_update_slice(cache, new[b][None, None], (layer, rows[b], 0, start[b], 0))

  return jax.lax.fori_loop(0, new.shape[0], body, cache)


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What every layer of one step shares: RoPE tables, positions, target cache rows, attention span."""

  cos: jax.Array  # [B, T, H/2] float32
  sin: jax.Array  # [B, T, H/2] float32
  positions: jax.Array  # [B, T] cache position of each token
  rows: jax.Array | None  # [B] cache row of each sequence; None: row b holds sequence b
  attend_to_cache: bool  # False: attend within this step's tokens only (prefill into empty rows)
  kv_len: int | None = None  # attend to cache positions [0, kv_len) only (all queries lie below it)


class Attention(nnx.Module):
  """Grouped-query attention with q/k/v bias and no output bias."""

  def __init__(self, cfg: QwenConfig, *, stack, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w = lambda shape, axes, hf, init="normal": _weight(rngs, shape, axes, hf, stack=stack, dtype=param_dtype,
                                                       init=init)
    pre = "model.layers.{layer}.self_attn."
    self.q_kernel = w((d, n, h), (EMBED, HEADS, HEAD_DIM), HFTensor(pre + "q_proj.weight", (n * h, d), True))
    self.q_bias = w((n, h), (HEADS, HEAD_DIM), HFTensor(pre + "q_proj.bias", (n * h,)), "zeros")
    self.k_kernel = w((d, k, h), (EMBED, KV_HEADS, HEAD_DIM), HFTensor(pre + "k_proj.weight", (k * h, d), True))
    self.k_bias = w((k, h), (KV_HEADS, HEAD_DIM), HFTensor(pre + "k_proj.bias", (k * h,)), "zeros")
    self.v_kernel = w((d, k, h), (EMBED, KV_HEADS, HEAD_DIM), HFTensor(pre + "v_proj.weight", (k * h, d), True))
    self.v_bias = w((k, h), (KV_HEADS, HEAD_DIM), HFTensor(pre + "v_proj.bias", (k * h,)), "zeros")
    self.o_kernel = w((n, h, d), (HEADS, HEAD_DIM, EMBED), HFTensor(pre + "o_proj.weight", (d, n * h), True))
    self.num_groups = cfg.num_groups
    self.dtype = dtype

  def __call__(self, x, ctx: "StepContext", cache_k, cache_v, layer, window):
    """x: [B, T, D]; cache_k/v: [L, C, K, S, H] (all layers, all C cache rows).

    Writes this step's keys and values at `ctx.positions` of `layer` in cache rows `ctx.rows`, then attends
    causally: over the whole cache row (decode, chunked prefill) or over this step's tokens alone
    (`ctx.attend_to_cache=False`, prefill into an empty row, which skips the T x S work). Returns the output
    [B, T, D] and the updated caches.
    """
    positions = ctx.positions
    dt = self.dtype
    q = jnp.einsum("btd,dnh->btnh", x, self.q_kernel[...].astype(dt)) + self.q_bias[...].astype(dt)
    k = jnp.einsum("btd,dkh->btkh", x, self.k_kernel[...].astype(dt)) + self.k_bias[...].astype(dt)
    v = jnp.einsum("btd,dkh->btkh", x, self.v_kernel[...].astype(dt)) + self.v_bias[...].astype(dt)
    q, k = rope(q, ctx.cos, ctx.sin), rope(k, ctx.cos, ctx.sin)
    # Under a mesh: query heads split over tensor; KV heads too where the tensor axis divides them, else whole
    # (replicated, exact). Pinning k and v keeps XLA from splitting the cache's KV heads like the query heads.
    q = constrain(q, (BATCH, LENGTH, HEADS, HEAD_DIM))
    k, v = constrain(k, (BATCH, LENGTH, KV_HEADS, HEAD_DIM)), constrain(v, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))

    rows = jnp.arange(x.shape[0]) if ctx.rows is None else ctx.rows  # [B] cache row of each sequence
    cache_k = constrain(_write_rows(cache_k, layer, rows, positions[:, 0], k), KVCache.AXES)
    cache_v = constrain(_write_rows(cache_v, layer, rows, positions[:, 0], v), KVCache.AXES)
    if ctx.attend_to_cache:
      keys, values = cache_k[layer], cache_v[layer]  # [C, K, S, H]
      if ctx.kv_len is not None:  # static: decode reads only the part of the cache that is in use
        keys, values = keys[:, :, :ctx.kv_len], values[:, :, :ctx.kv_len]
      if ctx.rows is not None:
        keys, values = keys[ctx.rows], values[ctx.rows]  # [B, K, S, H]
      keys, values = keys.astype(dt), values.astype(dt)
      key_pos = jnp.arange(keys.shape[2])[None, :]  # [1, S]
    else:
      keys, values, key_pos = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions  # [B, K, T, H]

    b, t, n, h = q.shape
    # [B, T, K, G, H]. With query heads split over tensor and KV heads whole (tensor > K), a device's heads are a
    # block of (K, G): it reads its own K's keys, all on device, and the math is that of one device.
    q = q.reshape(b, t, n // self.num_groups, self.num_groups, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32) * (h ** -0.5)
    delta = positions[:, :, None] - key_pos[:, None, :]  # [B, T, S] query minus key position
    mask = (delta >= 0) & (delta < window)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, values).reshape(b, t, n * h)
    # One [N*H, D] matmul: contracting (n, h) in an einsum let XLA:CPU transpose the weight every step.
    o_kernel = self.o_kernel[...].astype(dt).reshape(n * h, -1)
    return jnp.einsum("bte,ed->btd", out, o_kernel), cache_k, cache_v


class FeedForward(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: QwenConfig, *, stack, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    pre = "model.layers.{layer}.mlp."
    self.gate = _weight(rngs, (d, f), (EMBED, MLP), HFTensor(pre + "gate_proj.weight", (f, d), True), stack=stack,
                        dtype=param_dtype)
    self.up = _weight(rngs, (d, f), (EMBED, MLP), HFTensor(pre + "up_proj.weight", (f, d), True), stack=stack,
                      dtype=param_dtype)
    self.down = _weight(rngs, (f, d), (MLP, EMBED), HFTensor(pre + "down_proj.weight", (d, f), True), stack=stack,
                        dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    g = jnp.einsum("btd,df->btf", x, self.gate[...].astype(dt))
    u = jnp.einsum("btd,df->btf", x, self.up[...].astype(dt))
    return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, self.down[...].astype(dt))


class Block(nnx.Module):
  """Pre-norm decoder layer: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

  def __init__(self, cfg: QwenConfig, *, stack=(), dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "model.layers.{layer}.input_layernorm.weight",
                             stack=stack, dtype=param_dtype, rngs=rngs)
    self.attn = Attention(cfg, **kw)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                            "model.layers.{layer}.post_attention_layernorm.weight", stack=stack, dtype=param_dtype,
                            rngs=rngs)
    self.mlp = FeedForward(cfg, **kw)

  def __call__(self, x, ctx: "StepContext", cache_k, cache_v, layer, window):
    a, cache_k, cache_v = self.attn(self.attn_norm(x), ctx, cache_k, cache_v, layer, window)
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), cache_k, cache_v


class Qwen2(nnx.Module):
  """The Qwen2 / Qwen2.5 causal LM.

  dtype: compute dtype of activations and matmuls (float32 on CPU, bfloat16 on TPU/GPU); norms, softmax and
    logits are float32 regardless. param_dtype: storage dtype of weights.
  scan_layers: stacked weights under `lax.scan` (True) or one array per layer, unrolled (False).
  """

  def __init__(self, cfg: QwenConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers: bool = True,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.scan_layers = scan_layers
    d, v = cfg.hidden_size, cfg.vocab_size
    self.embed = _weight(rngs, (v, d), (VOCAB, EMBED), HFTensor("model.embed_tokens.weight", (v, d)), stack=(),
                         dtype=param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if scan_layers:
      self.layers = Block(cfg, stack=(cfg.num_layers,), **kw)
    else:
      self.layers = nnx.List([Block(cfg, **kw) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(d, cfg.rms_norm_eps, "model.norm.weight", dtype=param_dtype, rngs=rngs)
    if not cfg.tie_word_embeddings:
      # [V, D] as checkpoints store it (like the embedding): the largest weight loads without a transpose.
      self.lm_head = _weight(rngs, (v, d), (VOCAB, EMBED), HFTensor("lm_head.weight", (v, d)), stack=(),
                             dtype=param_dtype)

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, rows: jax.Array | None = None,
               attend_to_cache: bool = True, kv_len: int | None = None, rope_positions: jax.Array | None = None,
               embeds: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, KVCache]:
    """tokens, positions: [B, T] int32 (positions: where in the cache each token goes); rows: [B] cache row of
    each sequence (None: row b is sequence b); kv_len: static bound on the cache positions attended to (every
    position in `positions` must be below it). rope_positions: the rotary positions, [B, T], or [3, B, T] for
    M-RoPE (None: `positions`). embeds: (features [M, D], index [B, T]): token (b, t) takes the embedding
    features[index[b, t]] instead of its token's where index >= 0 (vision features at image pad tokens).

    Returns final hidden states [B, T, D] and the cache with this step's keys and values written (lengths are
    the caller's to advance)."""
    x = self.embed[...][tokens].astype(self.dtype)  # [B, T, D]
    if embeds is not None:
      features, index = embeds
      x = jnp.where((index >= 0)[..., None], features.astype(self.dtype)[jnp.maximum(index, 0)], x)
    if rope_positions is None:
      rope_positions = positions
    if self.cfg.mrope_section is not None and rope_positions.ndim == 2:  # text: the same on all three axes
      rope_positions = jnp.broadcast_to(rope_positions, (3, *rope_positions.shape))
    cos, sin = rope_tables(*self.cfg.rope_frequencies(), rope_positions, self.cfg.mrope_section)
    ctx = StepContext(cos, sin, positions, rows, attend_to_cache, kv_len)
    windows = self.cfg.layer_windows()  # [L]
    ck, cv = cache.k, cache.v
    if self.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(carry, xs):
        x, ck, cv = carry
        layer_state, layer, window = xs
        return nnx.merge(graphdef, layer_state)(x, ctx, ck, cv, layer, window), None

      xs = (stacked, jnp.arange(self.cfg.num_layers), jnp.asarray(windows))
      (x, ck, cv), _ = jax.lax.scan(body, (x, ck, cv), xs)
    else:
      for i, block in enumerate(self.layers):
        x, ck, cv = block(x, ctx, ck, cv, i, int(windows[i]))
    return self.final_norm(x), dataclasses.replace(cache, k=ck, v=cv)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final hidden states [..., D] -> float32 logits [..., V]."""
    head = self.embed if self.cfg.tie_word_embeddings else self.lm_head  # [V, D]
    return jnp.einsum("...d,vd->...v", h, head[...].astype(h.dtype), preferred_element_type=jnp.float32)


def abstract_model(cfg: QwenConfig, **kwargs) -> Qwen2:
  """The model with ShapeDtypeStructs for weights: nothing allocated."""
  return nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), **kwargs))


def weight_declarations(model: Qwen2) -> list[tuple[tuple, nnx.Param]]:
  """(path, Param) for every weight, in a fixed order; each Param carries `axes` and `hf` metadata."""
  return [(path, var) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]

