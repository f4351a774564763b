"""The Qwen2 / Qwen2.5 dense decoder as Flax NNX modules.

Built from `qwenjax.model.layers` (each weight declared once, with its logical axes and its Hugging Face name, and
read through one helper), writing into `qwenjax.model.kv_cache.KVCache`, attending through
`qwenjax.kernels.attention`.

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
from flax import nnx

from qwenjax.config import QwenConfig
from qwenjax.kernels.attention import attention, paged_attention
from qwenjax.kernels.paged_attention import quantize_kv
from qwenjax.model.kv_cache import KVCache, PagedKVCache, write_rows, write_slots
from qwenjax.model.layers import (
  HFTensor,
  RMSNorm,
  check_quantize,
  declare,
  linear,
  lookup,
  read,
  rope,
  rope_tables,
  vocab_logits,
)
from qwenjax.model.lora import LoraBank
from qwenjax.parallel.axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LENGTH, MLP, VOCAB, constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedInputs:
  """Where a step's tokens go in a `PagedKVCache` and which pages each row reads (the host's page tables).

  slots: [B, T] int32, the flat pool slot (page * page_size + offset) of each token; -1 for padding, not written.
  page_table: [B, P] int32, each row's pages in position order (padded with any page id: never attended).
  num_new: [B] int32, real tokens of each row (its first num_new; 0 for an idle row).
  """

  slots: jax.Array
  page_table: jax.Array
  num_new: jax.Array


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What every layer of one step shares: RoPE tables, positions, target cache rows, attention span."""

  cos: jax.Array  # [B, T, H/2] float32
  sin: jax.Array  # [B, T, H/2] float32
  positions: jax.Array  # [B, T] cache position of each token
  rows: jax.Array | None  # [B] cache row of each sequence; None: row b holds sequence b
  attend_to_cache: bool  # False: attend within this step's tokens only (prefill into empty rows)
  kv_len: int | None = None  # attend to cache positions [0, kv_len) only (all queries lie below it)
  paged: PagedInputs | None = None  # a PagedKVCache step: its slots and page tables (rows and kv_len unused)
  impl: str = "xla"  # attention implementation, `qwenjax.kernels.attention.IMPLS`
  sliding_window: int | None = None  # the model's window, when some layer slides (static)
  lora: LoraBank | None = None  # the model's adapters, when it has a bank
  lora_index: jax.Array | None = None  # [B] each row's adapter in `lora` (-1: none)
  lora_key: jax.Array | None = None  # dropout on the adapters' inputs (training)
  # Training (no cache): query (b, t) attends to keys t - span[b, t] < s <= t of its own row, its segment of a
  # packed row; None: a cache step.
  span: jax.Array | None = None

  def project(self, x: jax.Array, weight, target: str, layer, dtype, n_in: int = 1) -> jax.Array:
    """`linear(x, weight)` plus the rows' LoRA updates of `target` (x: [B, T, K...] -> [B, T, O...])."""
    out = linear(x, weight, dtype, self.impl, n_in)
    if self.lora is None or self.lora_index is None:
      return out
    flat = x.reshape(*x.shape[:2], -1)
    key = None if self.lora_key is None else jax.random.fold_in(self.lora_key, layer)
    delta = self.lora.delta(target, layer, flat, self.lora_index, key)
    return out if delta is None else out + delta.reshape(out.shape).astype(out.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with no output bias. Its options are the config's: `attention_bias`, biases on the
  q/k/v projections (Qwen2); `qk_norm`, an RMSNorm over head_dim of each query and key head, before RoPE, with one
  [H] weight for all query heads and one for all key heads (`self_attn.q_norm` / `k_norm`, as Qwen3 stores them)."""

  def __init__(self, cfg: QwenConfig, *, stack, dtype, param_dtype, quantize=None, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w = lambda shape, axes, hf, init="normal", contract=(0,): declare(
        rngs, shape, axes, hf, stack=stack, dtype=param_dtype, init=init, quantize=quantize, contract=contract)
    pre = "model.layers.{layer}.self_attn."
    # Declared in Hugging Face's order (q, its bias, k, ...), which the random init follows.
    bias = lambda shape, axes, name, size: nnx.data(
        w(shape, axes, HFTensor(pre + name, (size,)), "zeros") if cfg.attention_bias else None)
    self.q_kernel = w((d, n, h), (EMBED, HEADS, HEAD_DIM), HFTensor(pre + "q_proj.weight", (n * h, d), True))
    self.q_bias = bias((n, h), (HEADS, HEAD_DIM), "q_proj.bias", n * h)
    self.k_kernel = w((d, k, h), (EMBED, KV_HEADS, HEAD_DIM), HFTensor(pre + "k_proj.weight", (k * h, d), True))
    self.k_bias = bias((k, h), (KV_HEADS, HEAD_DIM), "k_proj.bias", k * h)
    self.v_kernel = w((d, k, h), (EMBED, KV_HEADS, HEAD_DIM), HFTensor(pre + "v_proj.weight", (k * h, d), True))
    self.v_bias = bias((k, h), (KV_HEADS, HEAD_DIM), "v_proj.bias", k * h)
    self.o_kernel = w((n, h, d), (HEADS, HEAD_DIM, EMBED), HFTensor(pre + "o_proj.weight", (d, n * h), True),
                      contract=(0, 1))
    norm = lambda name: nnx.data(RMSNorm(h, cfg.rms_norm_eps, pre + name + ".weight", stack=stack,
                                         dtype=param_dtype, rngs=rngs, axis=HEAD_DIM) if cfg.qk_norm else None)
    self.q_norm, self.k_norm = norm("q_norm"), norm("k_norm")
    self.dtype = dtype

  def __call__(self, x, ctx: StepContext, kv: tuple, layer, window):
    """x: [B, T, D]; kv: the cache's arrays, all layers: (k, v) [L, C, K, S, H] of a KVCache (all C rows), or
    (k, v [L, NP, PS, K, H], k_scale, v_scale [L, NP, PS, K] or None) of a PagedKVCache.

    Contiguous: writes this step's keys and values at `ctx.positions` of `layer` in cache rows `ctx.rows`, then
    attends causally: over the whole cache row (decode, chunked prefill) or over this step's tokens alone
    (`ctx.attend_to_cache=False`, prefill into an empty row, which skips the T x S work). Paged: writes them at
    `ctx.paged.slots` (int8 pages: quantized per token and KV head) and attends over each row's pages. Returns
    the output [B, T, D] and the updated cache arrays.
    """
    positions = ctx.positions
    dt = self.dtype
    q = ctx.project(x, self.q_kernel, "q", layer, dt)  # [B, T, N, H]
    k = ctx.project(x, self.k_kernel, "k", layer, dt)  # [B, T, K, H]
    v = ctx.project(x, self.v_kernel, "v", layer, dt)
    if self.q_bias is not None:
      q, k, v = q + read(self.q_bias, dt), k + read(self.k_bias, dt), v + read(self.v_bias, dt)
    if self.q_norm is not None:  # per head, over head_dim, before RoPE
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q, ctx.cos, ctx.sin), rope(k, ctx.cos, ctx.sin)
    # Under a mesh: query heads split over tensor; KV heads too where the tensor axis divides them, else whole
    # (replicated, exact). Pinning k and v keeps XLA from splitting the cache's KV heads like the query heads.
    q = constrain(q, (BATCH, LENGTH, HEADS, HEAD_DIM))
    k, v = constrain(k, (BATCH, LENGTH, KV_HEADS, HEAD_DIM)), constrain(v, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))

    b, t, n, h = q.shape
    project = lambda out: ctx.project(out.reshape(b, t, n * h), self.o_kernel, "o", layer, dt, n_in=2)  # [B, T, D]
    if ctx.span is not None:  # training: within the step's tokens, each query over its span (its segment)
      keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
      span = jnp.minimum(ctx.span, window)[:, :, None]  # [B, T, 1]
      return project(attention(q, keys, values, positions, positions, span, dtype=dt, impl=ctx.impl)), kv
    if ctx.paged is not None:
      out, kv = self._paged(q, k, v, ctx, kv, layer, window)
      return project(out), kv

    cache_k, cache_v = kv
    rows = jnp.arange(x.shape[0]) if ctx.rows is None else ctx.rows  # [B] cache row of each sequence
    cache_k = constrain(write_rows(cache_k, layer, rows, positions[:, 0], k), KVCache.AXES)
    cache_v = constrain(write_rows(cache_v, layer, rows, positions[:, 0], v), KVCache.AXES)
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

    out = attention(q, keys, values, positions, key_pos, window, dtype=dt, impl=ctx.impl)
    return project(out), (cache_k, cache_v)

  def _paged(self, q, k, v, ctx: StepContext, kv: tuple, layer, window):
    """q [B, T, N, H], k/v [B, T, K, H] of this step into and over a PagedKVCache's arrays `kv`."""
    k_pages, v_pages, k_scale, v_scale = kv
    slots = ctx.paged.slots.reshape(-1)  # [B*T]
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # [B*T, K, ...]
    if k_scale is not None:  # int8 pages: values and a scale per token and KV head
      # Qwen2's key biases put a few channels far above the rest (up to 145 against a median of 6 in the 0.5B's
      # first layer), and one scale per token and head would round the others away. Keys are stored divided by
      # a per-channel factor and queries multiplied by it (q.k unchanged): the factor is each rotary pair's
      # largest |bias| over the median, at least 1, so it is the same at every position and needs no calibration.
      if self.k_bias is not None:  # without key biases there is nothing to smooth
        smooth = _key_smoothing(read(self.k_bias, jnp.float32))  # [K, H]
        k = k / smooth
        b_, t_, n_, h_ = q.shape
        q = (q.reshape(b_, t_, smooth.shape[0], -1, h_) * smooth[:, None].astype(q.dtype)).reshape(q.shape)
      (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
      k_pages, v_pages = write_slots(k_pages, layer, slots, flat(kq)), write_slots(v_pages, layer, slots, flat(vq))
      k_scale, v_scale = write_slots(k_scale, layer, slots, flat(ks)), write_slots(v_scale, layer, slots, flat(vs))
      k_scale, v_scale = constrain(k_scale, PagedKVCache.SCALE_AXES), constrain(v_scale, PagedKVCache.SCALE_AXES)
    else:
      k_pages, v_pages = write_slots(k_pages, layer, slots, flat(k)), write_slots(v_pages, layer, slots, flat(v))
    k_pages, v_pages = constrain(k_pages, PagedKVCache.AXES), constrain(v_pages, PagedKVCache.AXES)
    scale = lambda a: None if a is None else a[layer]
    out = paged_attention(q, k_pages[layer], v_pages[layer], ctx.positions, ctx.paged.num_new, ctx.paged.page_table,
                          window, sliding_window=ctx.sliding_window, k_scale=scale(k_scale),
                          v_scale=scale(v_scale), dtype=self.dtype, impl=ctx.impl)
    return out, (k_pages, v_pages, k_scale, v_scale)


def _key_smoothing(k_bias: jax.Array) -> jax.Array:
  """[K, H] per-channel key divisors for int8 pages from the key bias [K, H]: max(1, pair max / median), equal on
  both channels of a rotary pair (i, i + H/2), which RoPE mixes."""
  mag = jnp.abs(k_bias)
  half = mag.shape[-1] // 2
  pair = jnp.maximum(mag[..., :half], mag[..., half:])  # [K, H/2]
  factor = jnp.maximum(1.0, pair / jnp.maximum(jnp.median(pair, axis=-1, keepdims=True), 1e-6))
  return jnp.concatenate([factor, factor], axis=-1)


class FeedForward(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: QwenConfig, *, stack, dtype, param_dtype, quantize=None, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    pre = "model.layers.{layer}.mlp."
    w = lambda shape, axes, hf: declare(rngs, shape, axes, hf, stack=stack, dtype=param_dtype, quantize=quantize)
    self.gate = w((d, f), (EMBED, MLP), HFTensor(pre + "gate_proj.weight", (f, d), True))
    self.up = w((d, f), (EMBED, MLP), HFTensor(pre + "up_proj.weight", (f, d), True))
    self.down = w((f, d), (MLP, EMBED), HFTensor(pre + "down_proj.weight", (d, f), True))
    self.dtype = dtype

  def __call__(self, x: jax.Array, ctx: StepContext, layer) -> jax.Array:
    dt = self.dtype
    g = ctx.project(x, self.gate, "gate", layer, dt)  # [B, T, F]
    u = ctx.project(x, self.up, "up", layer, dt)
    return ctx.project(jax.nn.silu(g) * u, self.down, "down", layer, dt)  # [B, T, D]


class Block(nnx.Module):
  """Pre-norm decoder layer: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

  def __init__(self, cfg: QwenConfig, *, stack=(), dtype, param_dtype, quantize=None, rngs: nnx.Rngs):
    kw = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, quantize=quantize, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "model.layers.{layer}.input_layernorm.weight",
                             stack=stack, dtype=param_dtype, rngs=rngs)
    self.attn = Attention(cfg, **kw)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                            "model.layers.{layer}.post_attention_layernorm.weight", stack=stack, dtype=param_dtype,
                            rngs=rngs)
    self.mlp = FeedForward(cfg, **kw)

  def __call__(self, x, ctx: StepContext, kv: tuple, layer, window):
    a, kv = self.attn(self.attn_norm(x), ctx, kv, layer, window)
    x = x + a
    return x + self.mlp(self.mlp_norm(x), ctx, layer), kv


class Qwen2(nnx.Module):
  """The Qwen2 / Qwen2.5 causal LM.

  dtype: compute dtype of activations and matmuls (float32 on CPU, bfloat16 on TPU/GPU); norms, softmax and
    logits are float32 regardless. param_dtype: storage dtype of weights.
  scan_layers: stacked weights under `lax.scan` (True) or one array per layer, unrolled (False).
  quantize: None, "int8" (w8a16: int8 weights, activations in `dtype`) or "w8a8" (activations quantized per token
    too): every projection of every layer is then a `QuantizedWeight`; quantize_embeddings: the embedding and
    lm_head too (27% of the 0.5B model's weights). Norms, biases, softmax and logits stay float32.
  """

  def __init__(self, cfg: QwenConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers: bool = True,
               quantize: str | None = None, quantize_embeddings: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.quantize = quantize = check_quantize(quantize)
    self.quantize_embeddings = quantize_embeddings = bool(quantize_embeddings and quantize)
    d, v = cfg.hidden_size, cfg.vocab_size
    table = lambda name: declare(rngs, (v, d), (VOCAB, EMBED), HFTensor(name, (v, d)), stack=(), dtype=param_dtype,
                                 quantize=quantize if quantize_embeddings else None, contract=(1,))
    self.embed = table("model.embed_tokens.weight")
    kw = dict(dtype=dtype, param_dtype=param_dtype, quantize=quantize, rngs=rngs)
    if scan_layers:
      self.layers = Block(cfg, stack=(cfg.num_layers,), **kw)
    else:
      self.layers = nnx.List([Block(cfg, **kw) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(d, cfg.rms_norm_eps, "model.norm.weight", dtype=param_dtype, rngs=rngs)
    if not cfg.tie_word_embeddings:
      # [V, D] as checkpoints store it (like the embedding): the largest weight loads without a transpose.
      self.lm_head = table("lm_head.weight")
    self.lora = nnx.data(None)  # a `qwenjax.model.lora.LoraBank` when adapters are attached

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | PagedKVCache, *,
               rows: jax.Array | None = None, attend_to_cache: bool = True, kv_len: int | None = None,
               rope_positions: jax.Array | None = None, embeds: tuple[jax.Array, jax.Array] | None = None,
               paged: PagedInputs | None = None, attention_impl: str = "xla", lora_index: jax.Array | None = None,
               lora_key: jax.Array | None = None, span: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | PagedKVCache | None]:
    """tokens, positions: [B, T] int32 (positions: where in the cache each token goes); rows: [B] cache row of
    each sequence (None: row b is sequence b); kv_len: static bound on the cache positions attended to (every
    position in `positions` must be below it). rope_positions: the rotary positions, [B, T], or [3, B, T] for
    M-RoPE (None: `positions`). embeds: (features [M, D], index [B, T]): token (b, t) takes the embedding
    features[index[b, t]] instead of its token's where index >= 0 (vision features at image pad tokens).
    paged: with a PagedKVCache, where the tokens go and which pages each row reads (rows, attend_to_cache and
    kv_len are then unused: rows attend to their pages). attention_impl: "xla" or "pallas" (paged cache only).
    lora_index: [B] each row's adapter in `self.lora` (-1: none; None: no adapter anywhere); lora_key: dropout
    on the adapters' inputs (training). span: training, with cache None: no cache is read or written, and query
    (b, t) attends to positions[b, t] - span[b, t] < p <= positions[b, t] of its row (packed rows: `positions` the
    row offsets, `rope_positions` and `span - 1` the positions within each segment).

    Returns final hidden states [B, T, D] and the cache with this step's keys and values written (lengths are
    the caller's to advance)."""
    x = lookup(self.embed, tokens, self.dtype)  # [B, T, D]
    if embeds is not None:
      features, index = embeds
      x = jnp.where((index >= 0)[..., None], features.astype(self.dtype)[jnp.maximum(index, 0)], x)
    if rope_positions is None:
      rope_positions = positions
    if self.cfg.mrope_section is not None and rope_positions.ndim == 2:  # text: the same on all three axes
      rope_positions = jnp.broadcast_to(rope_positions, (3, *rope_positions.shape))
    cos, sin = rope_tables(*self.cfg.rope_frequencies(), rope_positions, self.cfg.mrope_section)
    if (paged is None) != (not isinstance(cache, PagedKVCache)):
      raise ValueError("a PagedKVCache step needs `paged` inputs, and only it takes them.")
    if (cache is None) != (span is not None):
      raise ValueError("a training step (span) takes no cache, and only it runs without one.")
    sliding = self.cfg.sliding_window if self.cfg.use_sliding_window else None
    ctx = StepContext(cos, sin, positions, rows, attend_to_cache, kv_len, paged, attention_impl, sliding, self.lora,
                      lora_index, lora_key, span)
    windows = self.cfg.layer_windows()  # [L]
    if cache is None:
      kv = None
    elif paged is None:
      kv = (cache.k, cache.v)
    else:
      kv = (cache.k, cache.v, cache.k_scale, cache.v_scale)
    if self.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(carry, xs):
        x, kv = carry
        layer_state, layer, window = xs
        return nnx.merge(graphdef, layer_state)(x, ctx, kv, layer, window), None

      xs = (stacked, jnp.arange(self.cfg.num_layers), jnp.asarray(windows))
      (x, kv), _ = jax.lax.scan(body, (x, kv), xs)
    else:
      for i, block in enumerate(self.layers):
        x, kv = block(x, ctx, kv, i, int(windows[i]))
    if cache is None:
      return self.final_norm(x), None
    if paged is None:
      return self.final_norm(x), dataclasses.replace(cache, k=kv[0], v=kv[1])
    return self.final_norm(x), PagedKVCache(*kv)

  def logits(self, h: jax.Array, impl: str = "xla") -> jax.Array:
    """Final hidden states [..., D] -> float32 logits [..., V] (impl: a quantized head's matmul, "xla"/"pallas")."""
    return vocab_logits(h, self.embed if self.cfg.tie_word_embeddings else self.lm_head, impl)  # [V, D] table


def abstract_model(cfg: QwenConfig, **kwargs) -> Qwen2:
  """The model with ShapeDtypeStructs for weights: nothing allocated."""
  return nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), **kwargs))


def weight_declarations(model: Qwen2) -> list[tuple[tuple, nnx.Param]]:
  """(path, Param) for every weight, in a fixed order; each Param carries `axes` and `hf` metadata (`hf` is None
  for a QuantizedWeight's scale, which loads with its values: path (..., "values") beside (..., "scale"))."""
  return [(path, var) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]

