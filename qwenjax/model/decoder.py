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

from qwenjax._errors import ConfigError
from qwenjax.config import QwenConfig
from qwenjax.kernels.attention import attention, paged_attention
from qwenjax.kernels.paged_attention import from_pool, quantize_kv
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
from qwenjax.model.moe import MoE
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepMetadata:
  """What one step's layers need besides its tokens and the cache: where each token sits, what it attends to, and
  which adapter and vision features it takes. A pytree; the static fields are part of its structure (a jitted
  function taking one compiles once per value of them).

  positions: [B, T] int32, the cache position of each token (where its key and value go); in a training step,
    each token's offset in its row.
  rope_positions: [B, T] int32 rotary positions, or [3, B, T] for M-RoPE; None: `positions`.
  embeds: (features [M, D], index [B, T] int32): token (b, t) takes features[index[b, t]] instead of its token's
    embedding where index >= 0 (vision features at image pad tokens); None: token embeddings only.
  paged: a PagedKVCache step's slots, page tables and real token counts (`PagedInputs`): each row writes its
    tokens at its slots and attends to its pages (rows, attend_to_cache and kv_len unused); None: a KVCache step
    or a training step.
  rows: [B] int32, a KVCache step's cache row of each sequence; None: row b holds sequence b.
  attend_to_cache: static bool; False: a KVCache step attends within its own tokens only (prefill into empty
    rows, which skips the T x S work).
  kv_len: static int; a KVCache step attends to cache positions [0, kv_len) only (every position lies below it);
    None: the whole cache.
  impl: static str; the attention and quantized-matmul implementation, `qwenjax.kernels.attention.IMPLS` ("xla",
    or "pallas" with a paged cache).
  lora_index: [B] int32, each row's adapter in the model's `LoraBank` (-1: none); None: no adapter anywhere.
  lora_key: a PRNG key for dropout on the adapters' inputs (training); None: no dropout.
  span: [B, T] int32, a training step (no cache read or written): query (b, t) attends to positions[b, t] -
    span[b, t] < p <= positions[b, t] of its row; None: a cache step.
  ragged: static (S, Q): a ragged PagedKVCache step, its tokens one per row (T = 1) on a flat axis of B tokens:
    the first S one decode token each, the rest blocks of Q consecutive tokens of one sequence (prefill chunks,
    each starting a block); `paged.page_table` and `paged.num_new` then have a row per attention row (S + (B -
    S) / Q), and each token attends with the tokens of its row. None: each of the B rows attends as one.
  """

  positions: jax.Array
  rope_positions: jax.Array | None = None
  embeds: tuple[jax.Array, jax.Array] | None = None
  paged: PagedInputs | None = None
  rows: jax.Array | None = None
  attend_to_cache: bool = dataclasses.field(default=True, metadata=dict(static=True))
  kv_len: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  impl: str = dataclasses.field(default="xla", metadata=dict(static=True))
  ragged: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))
  lora_index: jax.Array | None = None
  lora_key: jax.Array | None = None
  span: jax.Array | None = None

  @classmethod
  def paged_step(cls, positions: jax.Array, paged: PagedInputs, rope_offset: jax.Array, *,
                 rope_positions: jax.Array | None = None, embeds: tuple[jax.Array, jax.Array] | None = None,
                 impl: str = "xla", lora_index: jax.Array | None = None,
                 ragged: tuple[int, int] | None = None) -> StepMetadata:
    """A PagedKVCache step: tokens at positions [B, T] into and over the pages `paged` names, at rotary positions
    `positions + rope_offset` (rope_offset [B]: 0, or a Qwen2.5-VL prompt's `rope_deltas`) unless rope_positions
    gives them; ragged: see the class."""
    if rope_positions is None:
      rope_positions = positions + rope_offset[:, None]  # [B, T]
    return cls(positions, rope_positions, embeds, paged, impl=impl, lora_index=lora_index, ragged=ragged)

  @classmethod
  def packed_training(cls, segment_positions: jax.Array, *, lora_index: jax.Array | None = None,
                      lora_key: jax.Array | None = None, impl: str = "xla") -> StepMetadata:
    """A training step (no cache) over rows of packed segments: segment_positions [B, T] is each token's position
    within its segment, which each query attends within, causally (positions: the offsets 0..T-1 in the row)."""
    b, t = segment_positions.shape
    offsets = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    return cls(offsets, rope_positions=segment_positions, impl=impl, lora_index=lora_index, lora_key=lora_key,
               span=segment_positions + 1)


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What every layer of one step shares: the step's metadata and what the model derives from it and its own
  weights (RoPE tables, sliding window, adapters)."""

  meta: StepMetadata
  cos: jax.Array  # [B, T, H/2] float32
  sin: jax.Array  # [B, T, H/2] float32
  sliding_window: int | None = None  # the model's window, when some layer slides (static)
  lora: LoraBank | None = None  # the model's adapters, when it has a bank

  def project(self, x: jax.Array, weight, target: str, layer, dtype, n_in: int = 1) -> jax.Array:
    """`linear(x, weight)` plus the rows' LoRA updates of `target` (x: [B, T, K...] -> [B, T, O...])."""
    meta = self.meta
    with jax.named_scope(target):  # the profile's name for this projection (launch.bench.decode_profile)
      out = linear(x, weight, dtype, meta.impl, n_in)
    if self.lora is None or meta.lora_index is None:
      return out
    flat = x.reshape(*x.shape[:2], -1)
    key = None if meta.lora_key is None else jax.random.fold_in(meta.lora_key, layer)
    delta = self.lora.delta(target, layer, flat, meta.lora_index, key)
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

    Contiguous: writes this step's keys and values at `meta.positions` of `layer` in cache rows `meta.rows`, then
    attends causally: over the whole cache row (decode, chunked prefill) or over this step's tokens alone
    (`meta.attend_to_cache=False`, prefill into an empty row, which skips the T x S work). Paged: writes them at
    `meta.paged.slots` (int8 pages: quantized per token and KV head) and attends over each row's pages. Returns
    the output [B, T, D] and the updated cache arrays.
    """
    meta = ctx.meta
    positions = meta.positions
    dt = self.dtype
    q = ctx.project(x, self.q_kernel, "q", layer, dt)  # [B, T, N, H]
    k = ctx.project(x, self.k_kernel, "k", layer, dt)  # [B, T, K, H]
    v = ctx.project(x, self.v_kernel, "v", layer, dt)
    if self.q_bias is not None:
      q, k, v = q + read(self.q_bias, dt), k + read(self.k_bias, dt), v + read(self.v_bias, dt)
    if self.q_norm is not None:  # per head, over head_dim, before RoPE
      q, k = self.q_norm(q), self.k_norm(k)
    with jax.named_scope("rope"):
      q, k = rope(q, ctx.cos, ctx.sin), rope(k, ctx.cos, ctx.sin)
    # Under a mesh: query heads split over tensor; KV heads too where the tensor axis divides them, else whole
    # (replicated, exact). Pinning k and v keeps XLA from splitting the cache's KV heads like the query heads.
    q = constrain(q, (BATCH, LENGTH, HEADS, HEAD_DIM))
    k, v = constrain(k, (BATCH, LENGTH, KV_HEADS, HEAD_DIM)), constrain(v, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))

    b, t, n, h = q.shape
    project = lambda out: ctx.project(out.reshape(b, t, n * h), self.o_kernel, "o", layer, dt, n_in=2)  # [B, T, D]
    if meta.span is not None:  # training: within the step's tokens, each query over its span (its segment)
      keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
      span = jnp.minimum(meta.span, window)[:, :, None]  # [B, T, 1]
      return project(attention(q, keys, values, positions, positions, span, dtype=dt, impl=meta.impl)), kv
    if meta.paged is not None:
      with jax.named_scope("attention"):
        out, kv = self._paged(q, k, v, ctx, kv, layer, window)
      return project(out), kv

    cache_k, cache_v = kv
    rows = jnp.arange(x.shape[0]) if meta.rows is None else meta.rows  # [B] cache row of each sequence
    cache_k = constrain(write_rows(cache_k, layer, rows, positions[:, 0], k), KVCache.AXES)
    cache_v = constrain(write_rows(cache_v, layer, rows, positions[:, 0], v), KVCache.AXES)
    if meta.attend_to_cache:
      keys, values = cache_k[layer], cache_v[layer]  # [C, K, S, H]
      if meta.kv_len is not None:  # static: decode reads only the part of the cache that is in use
        keys, values = keys[:, :, :meta.kv_len], values[:, :, :meta.kv_len]
      if meta.rows is not None:
        keys, values = keys[meta.rows], values[meta.rows]  # [B, K, S, H]
      keys, values = from_pool(keys).astype(dt), from_pool(values).astype(dt)
      key_pos = jnp.arange(keys.shape[2])[None, :]  # [1, S]
    else:
      keys, values, key_pos = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions  # [B, K, T, H]

    out = attention(q, keys, values, positions, key_pos, window, dtype=dt, impl=meta.impl)
    return project(out), (cache_k, cache_v)

  def _paged(self, q, k, v, ctx: StepContext, kv: tuple, layer, window):
    """q [B, T, N, H], k/v [B, T, K, H] of this step into and over a PagedKVCache's arrays `kv`."""
    k_pages, v_pages, k_scale, v_scale = kv
    meta = ctx.meta
    slots = meta.paged.slots.reshape(-1)  # [B*T]
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
    # The rows of decode and verify programs go in sorted groups on CPU; a ragged step's do not: grouped, the job's
    # 10 programs (6 of them ragged steps, two attention calls a layer each) compiled 6.5-7 s longer and peaked
    # 0.07-0.1 GiB higher, which the faster prefill attention (119 against 203 ms a 512-token step alone; the job
    # served 5-7 s sooner) did not repay: with a loop per group and again with one loop over (group, chunk) pairs
    # (`attention.CPU_ROW_GROUP`).
    attend = lambda q, positions, num_new, table: paged_attention(
        q, k_pages, v_pages, positions, num_new, table, window, sliding_window=ctx.sliding_window, k_scale=k_scale,
        v_scale=v_scale, dtype=self.dtype, impl=meta.impl, layer=layer, group_rows=meta.ragged is None)
    positions, num_new, table = meta.positions, meta.paged.num_new, meta.paged.page_table
    if meta.ragged is None:
      return attend(q, positions, num_new, table), (k_pages, v_pages, k_scale, v_scale)
    # Ragged: q [B, 1, N, H], a token per row; the decode rows attend as rows of one query, each block as a row.
    s, block = meta.ragged
    b, _, n, h = q.shape
    out = [attend(q[:s], positions[:s], num_new[:s], table[:s])] if s else []  # [S, 1, N, H]
    if b > s:
      rows = (b - s) // block
      chunks = attend(q[s:].reshape(rows, block, n, h), positions[s:].reshape(rows, block), num_new[s:], table[s:])
      out.append(chunks.reshape(b - s, 1, n, h))
    return jnp.concatenate(out), (k_pages, v_pages, k_scale, v_scale)


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
    with jax.named_scope("silu"):
      a = jax.nn.silu(g) * u
    return ctx.project(a, self.down, "down", layer, dt)  # [B, T, D]


class Block(nnx.Module):
  """Pre-norm decoder layer: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x)). sparse: the MLP is Qwen3-MoE's mixture
  of experts (`qwenjax.model.moe.MoE`) instead of one SwiGLU."""

  def __init__(self, cfg: QwenConfig, *, stack=(), sparse: bool = False, dtype, param_dtype, quantize=None,
               rngs: nnx.Rngs):
    kw = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, quantize=quantize, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "model.layers.{layer}.input_layernorm.weight",
                             stack=stack, dtype=param_dtype, rngs=rngs)
    self.attn = Attention(cfg, **kw)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                            "model.layers.{layer}.post_attention_layernorm.weight", stack=stack, dtype=param_dtype,
                            rngs=rngs)
    self.mlp = MoE(cfg, **kw) if sparse else FeedForward(cfg, **kw)

  def __call__(self, x, ctx: StepContext, kv: tuple, layer, window):
    """-> (x [B, T, D], kv, the MoE's router logits [B, T, E], or None for a dense MLP)."""
    a, kv = self.attn(self.attn_norm(x), ctx, kv, layer, window)
    x = x + a
    if isinstance(self.mlp, MoE):
      y, router_logits = self.mlp(self.mlp_norm(x), ctx, layer)
      return x + y, kv, router_logits
    return x + self.mlp(self.mlp_norm(x), ctx, layer), kv, None


class Qwen2(nnx.Module):
  """The Qwen2 / Qwen2.5 causal LM.

  dtype: compute dtype of activations and matmuls (float32 on CPU, bfloat16 on TPU/GPU); norms, softmax and
    logits are float32 regardless. param_dtype: storage dtype of weights.
  scan_layers: stacked weights under `lax.scan` (True) or one array per layer, unrolled (False; also when the
    config mixes dense and sparse MLPs).
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
    sparse = cfg.sparse_layers()
    if scan_layers and len(set(sparse)) > 1:
      # Dense and sparse MLPs mixed (mlp_only_layers, decoder_sparse_step > 1): no one stack holds both, so the
      # layers are unrolled. Every released Qwen3-MoE has sparse layers only.
      self.scan_layers = scan_layers = False
    if scan_layers:
      self.layers = Block(cfg, stack=(cfg.num_layers,), sparse=sparse[0], **kw)
    else:
      self.layers = nnx.List([Block(cfg, sparse=s, **kw) for s in sparse])
    self.final_norm = RMSNorm(d, cfg.rms_norm_eps, "model.norm.weight", dtype=param_dtype, rngs=rngs)
    if not cfg.tie_word_embeddings:
      # [V, D] as checkpoints store it (like the embedding): the largest weight loads without a transpose.
      self.lm_head = table("lm_head.weight")
    self.lora = nnx.data(None)  # a `qwenjax.model.lora.LoraBank` when adapters are attached

  def __call__(self, tokens: jax.Array, cache: KVCache | PagedKVCache | None, meta: StepMetadata, *,
               router_logits: bool = False) -> tuple:
    """tokens: [B, T] int32; cache: a KVCache, a PagedKVCache (then `meta.paged` says where the tokens go and
    which pages each row reads), or None for a training step (`meta.span`: no cache read or written); meta: the
    step's positions, attention inputs, adapters and vision features (`StepMetadata`).

    Returns final hidden states [B, T, D] and the cache with this step's keys and values written (lengths are
    the caller's to advance). router_logits (static): a third value, the sparse layers' router logits [L', B, T,
    E] in the compute dtype (L' the layers with a MoE, in order), as transformers' `output_router_logits` gives
    them, for a training loss (`qwenjax.model.moe.load_balancing_loss`); ConfigError on a model without one."""
    if router_logits and not any(self.cfg.sparse_layers()):
      raise ConfigError("router_logits: the model has no mixture-of-experts layer (num_experts "
                        f"{self.cfg.num_experts}, mlp_only_layers {list(self.cfg.mlp_only_layers)}).")
    if (meta.paged is None) != (not isinstance(cache, PagedKVCache)):
      raise ValueError("a PagedKVCache step needs `paged` inputs, and only it takes them.")
    if (cache is None) != (meta.span is not None):
      raise ValueError("a training step (span) takes no cache, and only it runs without one.")
    with jax.named_scope("embed"):
      x = lookup(self.embed, tokens, self.dtype)  # [B, T, D]
    if meta.embeds is not None:
      features, index = meta.embeds  # [M, D], [B, T]
      x = jnp.where((index >= 0)[..., None], features.astype(self.dtype)[jnp.maximum(index, 0)], x)
    rope_positions = meta.positions if meta.rope_positions is None else meta.rope_positions
    if self.cfg.mrope_section is not None and rope_positions.ndim == 2:  # text: the same on all three axes
      rope_positions = jnp.broadcast_to(rope_positions, (3, *rope_positions.shape))
    cos, sin = rope_tables(*self.cfg.rope_frequencies(), rope_positions, self.cfg.mrope_section)
    sliding = self.cfg.sliding_window if self.cfg.use_sliding_window else None
    ctx = StepContext(meta, cos, sin, sliding, self.lora)
    windows = self.cfg.layer_windows()  # [L]
    if cache is None:
      kv = None
    elif meta.paged is None:
      kv = (cache.k, cache.v)
    else:
      kv = (cache.k, cache.v, cache.k_scale, cache.v_scale)
    if self.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(carry, xs):
        x, kv = carry
        layer_state, layer, window = xs
        x, kv, scores = nnx.merge(graphdef, layer_state)(x, ctx, kv, layer, window)
        return (x, kv), scores if router_logits else None

      xs = (stacked, jnp.arange(self.cfg.num_layers), jnp.asarray(windows))
      (x, kv), scores = jax.lax.scan(body, (x, kv), xs)  # scores [L, B, T, E] or None
    else:
      scores = []
      for i, block in enumerate(self.layers):
        x, kv, layer_scores = block(x, ctx, kv, i, int(windows[i]))
        scores += [] if layer_scores is None else [layer_scores]
      scores = jnp.stack(scores) if router_logits else None  # [L', B, T, E]
    if cache is not None:
      cache = (dataclasses.replace(cache, k=kv[0], v=kv[1]) if meta.paged is None else PagedKVCache(*kv))
    h = self.final_norm(x)
    return (h, cache, scores) if router_logits else (h, cache)

  def logits(self, h: jax.Array, impl: str = "xla") -> jax.Array:
    """Final hidden states [..., D] -> float32 logits [..., V] (impl: a quantized head's matmul, "xla"/"pallas")."""
    with jax.named_scope("lm_head"):
      return vocab_logits(h, self.embed if self.cfg.tie_word_embeddings else self.lm_head, impl)  # [V, D] table


def abstract_model(cfg: QwenConfig, **kwargs) -> Qwen2:
  """The model with ShapeDtypeStructs for weights: nothing allocated."""
  return nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), **kwargs))


def weight_declarations(model: Qwen2) -> list[tuple[tuple, nnx.Param]]:
  """(path, Param) for every weight, in a fixed order; each Param carries `axes` and `hf` metadata (`hf` is None
  for a QuantizedWeight's scale, which loads with its values: path (..., "values") beside (..., "scale"))."""
  return [(path, var) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]

