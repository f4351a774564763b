"""Attention: the plain-JAX references and the one dispatch point the models call.

`attention` (the decoder's causal grouped-query attention over a contiguous cache, with sliding windows),
`paged_attention` (the same over a paged cache) and `vision_attention` (the vision tower's non-causal attention
within segments) route by `impl` to an implementation: "xla", the `*_reference` functions below, or "pallas", a
Pallas kernel tested against its reference (paged attention: `qwenjax.kernels.ragged_paged_attention`, or its
Mosaic variant `ragged_paged_attention_tpu` on TPU; the tower: `qwenjax.kernels.segment_attention`; the
contiguous cache has none, and asking for it is an error).
The models never choose by backend themselves: `default_impl` does, once, for the engine.

Einsum legend (decoder):
  B batch            T query tokens of this step     S key positions
  N query heads      K KV heads                      G query heads per KV head (N = K*G)
  H head dim
Einsum legend (vision tower):
  P patches          Q queries of one block          S keys one query block reads
  N heads            H head dim
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax._errors import ConfigError
from qwenjax.kernels.paged_attention import dequantize_kv, from_pool
from qwenjax.kernels.ragged_paged_attention import ragged_paged_attention
from qwenjax.kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu
from qwenjax.kernels.segment_attention import segment_attention

IMPLS = ("xla", "pallas")
FULL_WINDOW = int(jnp.iinfo(jnp.int32).max)  # the window of a layer without one (`QwenConfig.layer_windows`)


def default_impl(backend: str | None = None) -> str:
  """"pallas" on TPU and GPU, where the kernels compile; "xla" on CPU, where Pallas only interprets (slowly)."""
  return "xla" if (backend or jax.default_backend()) == "cpu" else "pallas"


def attention_reference(q: jax.Array, keys: jax.Array, values: jax.Array, q_positions: jax.Array,
                        key_positions: jax.Array, window, *, dtype=None) -> jax.Array:
  """Causal grouped-query attention within a sliding window, in plain JAX.

  q: [B, T, N, H]; keys, values: [B, K, S, H] (heads before positions, as the KV cache holds them).
  q_positions: [B, T] position of each query; key_positions: [B, S] or [1, S] position of each key.
  window: query at p attends to keys at p - window < position <= p (an int, or a traced scalar under scan).
  dtype: probabilities are cast to it before they weight the values (the model's compute dtype; None: values').
  Scores and the softmax are float32. Returns [B, T, N, H].
  """
  b, t, n, h = q.shape
  k = keys.shape[1]
  # [B, T, K, G, H]. With query heads split over tensor and KV heads whole (tensor > K), a device's heads are a
  # block of (K, G): it reads its own K's keys, all on device, and the math is that of one device.
  q = q.reshape(b, t, k, n // k, h)
  scores = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32) * (h ** -0.5)
  delta = q_positions[:, :, None] - key_positions[:, None, :]  # [B, T, S] query minus key position
  mask = (delta >= 0) & (delta < window)
  scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype if dtype is None else dtype)
  return jnp.einsum("bkgts,bksh->btkgh", probs, values).reshape(b, t, n, h)


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, q_positions: jax.Array,
                              page_table: jax.Array, window, *, k_scale: jax.Array | None = None,
                              v_scale: jax.Array | None = None, dtype=None) -> jax.Array:
  """Causal grouped-query attention over paged K/V for a batch of rows, in plain JAX: what XLA runs.

  q: [B, T, N, H], row b's queries at positions q_positions [B, T] (a padding query may sit anywhere: its output
  is finite and meaningless). k_pages, v_pages: [NP, PS, K, H] of one layer, float or int8 (then with k_scale,
  v_scale [NP, PS, K]). page_table: [B, P], row b's pages in order; entries past its length are clipped into
  range and never attended (their positions lie past every query). Each row gathers its P pages once,
  [B, K, P * PS, H], and runs `attention_reference`: the same math as
  `qwenjax.kernels.paged_attention.ragged_paged_attention_reference`, batched by row rather than packed.
  Returns [B, T, N, H].
  """
  b, p = page_table.shape
  num_pages, page_size, k, h = k_pages.shape
  table = jnp.clip(page_table, 0, num_pages - 1)
  dt = q.dtype if dtype is None else dtype

  def gather(pages, scale):
    x = from_pool(pages[table].reshape(b, p * page_size, k, h))  # [B, S, K, H]
    if scale is not None:
      x = dequantize_kv(x, scale[table].reshape(b, p * page_size, k)).astype(dt)
    return x.transpose(0, 2, 1, 3)  # [B, K, S, H]

  keys, values = gather(k_pages, k_scale), gather(v_pages, v_scale)
  key_pos = jnp.arange(p * page_size, dtype=jnp.int32)[None, :]
  return attention_reference(q, keys, values, q_positions, key_pos, window, dtype=dtype)


# XLA:CPU's schedule for `paged_attention_xla` in decode and verify programs: rows per group and keys per chunk.
# Measured on a 2-core Zen 5 EPYC (24 layers timed alone, 32 decode rows of 30-700 positions, the 128-request job's
# spread): 48-56 ms a step ungrouped with 256-key chunks, 33-38 ms in sorted groups of 8 with 128-key chunks; 32
# rows all at 512 positions 33.3 against 36.0 ms. In the engine at 32 rows all at 64-128 positions the groups cost
# 15.5 against 11.0 ms a step (more operations), and in the ragged step (prefill blocks: 119 against 203 ms alone)
# they lengthened compilation (see `qwenjax.model.decoder`), so the ragged step keeps one group.
CPU_ROW_GROUP, CPU_CHUNK_TOKENS = 8, 128


def paged_attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, q_positions: jax.Array,
                        num_new: jax.Array, page_table: jax.Array, window, *, k_scale: jax.Array | None = None,
                        v_scale: jax.Array | None = None, dtype=None, chunk_tokens: int = 256,
                        row_group: int | None = None, layer: jax.Array | int | None = None) -> jax.Array:
  """`paged_attention_reference`'s result (arguments alike, plus num_new [B]: row b's first num_new[b] queries are
  real) without its [B, P * PS] gather: the keys are visited `chunk_tokens` at a time in a loop that stops at the
  chunk holding the last real query's position (a traced bound), folding each chunk into an online softmax in
  float32. The table may be as wide as the pool allows (P = the longest sequence's pages): what a step costs
  follows the lengths it holds, not the table's width, so one program serves every length. What XLA runs in the
  engine. Padding queries come back finite and meaningless (zeros where they see no key).

  row_group: None, or the rows are sorted by their furthest real query and visited `row_group` at a time, each
  group only as far as its own longest row (rows without a real query cost nothing): one long sequence no longer
  makes every row read as far as it does, and a group's gathered keys stay in cache. Still one loop, over the
  (group, chunk) pairs in turn, each step updating its group's rows of the online softmax in place (a loop per
  group under `lax.map` ran as fast and compiled the 32-slot decode block 3.9 s against 3.5).

  layer: None, or the pools hold every layer (k_pages [L, NP, PS, K, H], scales [L, NP, PS, K]) and the loop reads
  this layer's pages straight from them. Measured on XLA:CPU in a 24-layer scan at batch 32: slicing the layer out
  first (`k_pages[layer]`) makes XLA copy the layer's whole pool into the loop, 2.3x the attention's time.
  """
  b, t, n, h = q.shape
  num_pages, page_size, k, _ = k_pages.shape[-4:]
  p = page_table.shape[1]
  cp = max(1, min(p, chunk_tokens // page_size))  # pages per chunk
  span = cp * page_size  # S: keys per chunk
  dt = q.dtype if dtype is None else dtype
  quantized = k_scale is not None
  last = _furthest(q_positions, num_new)  # [B]
  r = b if row_group is None or b <= row_group else row_group  # R: rows per group
  groups = -(-b // r)
  pad = groups * r - b  # rows with no real query: sorted first, their group visits no chunk
  order = None
  if groups > 1:
    order = jnp.argsort(jnp.concatenate([jnp.full((pad,), -1, last.dtype), last]))  # [G * R] over padded rows
    padded = lambda x: jnp.concatenate([jnp.zeros((pad,) + x.shape[1:], x.dtype), x]) if pad else x
    q, q_positions, page_table, last = (padded(x)[order] for x in (q, q_positions, page_table, last))
  rows = groups * r
  table = jnp.clip(jnp.pad(page_table, ((0, 0), (0, -p % cp))), 0, num_pages - 1)
  qg = q.reshape(rows, t, k, n // k, h)  # [G * R, T, K, Gq, H]
  if quantized:
    qg = qg.astype(jnp.float32)
  chunks = (last.reshape(groups, r).max(axis=1) + span) // span  # [G]: each group's chunks, to its furthest query
  ends = jnp.cumsum(chunks)  # the loop's steps: group g's chunks are steps ends[g] - chunks[g] .. ends[g] - 1

  read = (lambda x, pages: x[pages]) if layer is None else (lambda x, pages: x[layer, pages])
  rows_of = lambda x, r0: x if groups == 1 else jax.lax.dynamic_slice_in_dim(x, r0, r)

  def body(i, carry):
    if groups == 1:
      c, r0 = i, 0
    else:
      g = jnp.sum(ends <= i).astype(jnp.int32)  # this step's group
      c, r0 = i - (ends[g] - chunks[g]), g * r  # its chunk within the group, its first row
    pages = jax.lax.dynamic_slice_in_dim(rows_of(table, r0), c * cp, cp, axis=1)  # [R, cp]
    keys, values = (from_pool(read(x, pages)).reshape(r, span, k, h) for x in (k_pages, v_pages))  # [R, S, K, H]
    if quantized:
      keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)
    scores = jnp.einsum("btkgh,bskh->bkgts", rows_of(qg, r0), keys, preferred_element_type=jnp.float32)
    if quantized:
      scores = scores * read(k_scale, pages).reshape(r, span, k).transpose(0, 2, 1)[:, :, None, None, :]
    scores = scores * (h ** -0.5)
    delta = rows_of(q_positions, r0)[:, :, None] - (c * span + jnp.arange(span, dtype=jnp.int32))[None, None, :]
    scores = jnp.where(((delta >= 0) & (delta < window))[:, None, None], scores, -jnp.inf)  # [R, K, Gq, T, S]
    a, mm, tt = (rows_of(x, r0) for x in carry)  # this group's [R, K, Gq, T, H], [R, K, Gq, T] x 2, float32
    m_new = jnp.maximum(mm, scores.max(axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no key seen yet: exp(-inf) = 0, not NaN
    correction = jnp.exp(mm - m_safe)
    probs = jnp.exp(scores - m_safe[..., None])  # [R, K, Gq, T, S], unnormalised
    tt = correction * tt + probs.sum(axis=-1)
    if quantized:
      probs = probs * read(v_scale, pages).reshape(r, span, k).transpose(0, 2, 1)[:, :, None, None, :]
      pv = jnp.einsum("bkgts,bskh->bkgth", probs, values)
    else:
      pv = jnp.einsum("bkgts,bskh->bkgth", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    a = correction[..., None] * a + pv
    if groups == 1:
      return a, m_new, tt
    return tuple(jax.lax.dynamic_update_slice_in_dim(x, y, r0, 0) for x, y in zip(carry, (a, m_new, tt)))

  init = (jnp.zeros((rows, k, n // k, t, h), jnp.float32), jnp.full((rows, k, n // k, t), -jnp.inf, jnp.float32),
          jnp.zeros((rows, k, n // k, t), jnp.float32))
  acc, _, total = jax.lax.fori_loop(0, ends[-1], body, init)
  out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # [G * R, K, Gq, T, H]
  out = out.transpose(0, 3, 1, 2, 4).reshape(rows, t, n, h).astype(dt)
  return out if order is None else out[jnp.argsort(order)][pad:]  # back in row order


def _furthest(q_positions: jax.Array, num_new: jax.Array) -> jax.Array:
  """[B] the position of each row's last real query (-1: a row with none)."""
  valid = jnp.arange(q_positions.shape[1])[None, :] < num_new[:, None]  # [B, T]
  return jnp.max(jnp.where(valid, q_positions, -1), axis=1)


def vision_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block_q: int,
                               kv_span: int | None = None) -> jax.Array:
  """Non-causal attention within segments, in plain JAX.

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


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ConfigError(f"attention impl {impl!r} is not one of {', '.join(IMPLS)}.")


def attention(q: jax.Array, keys: jax.Array, values: jax.Array, q_positions: jax.Array, key_positions: jax.Array,
              window, *, dtype=None, impl: str = "xla") -> jax.Array:
  """The decoder's attention by `impl` (arguments as `attention_reference`); "xla" is the reference."""
  _check_impl(impl)
  if impl == "pallas":
    raise ConfigError("attention impl 'pallas' has no kernel for the decoder's attention yet; use 'xla'.")
  return attention_reference(q, keys, values, q_positions, key_positions, window, dtype=dtype)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, q_positions: jax.Array,
                    num_new: jax.Array, page_table: jax.Array, window, *, sliding_window: int | None = None,
                    k_scale: jax.Array | None = None, v_scale: jax.Array | None = None, dtype=None,
                    impl: str = "xla", layer: jax.Array | int | None = None, group_rows: bool = True) -> jax.Array:
  """The decoder's attention over a paged cache by `impl`; arguments as `paged_attention_reference`, plus
  group_rows (on CPU "xla" visits the rows in sorted groups of `CPU_ROW_GROUP`; False: as one group), num_new [B]
  (row b's first num_new[b] queries are real, the rest padding, which "pallas" leaves out),
  sliding_window: the model's window (static), which a traced `window` (under scan: this layer's, FULL_WINDOW or
  sliding_window) selects, and layer: as `paged_attention_xla`'s (the pools then hold every layer).

  "pallas" packs the rows' real queries back to back (row b's start at cumsum(num_new)[b - 1]) for
  `ragged_paged_attention`, whose page walk skips pages past each row's length, and unpacks its output.
  """
  _check_impl(impl)
  if impl == "xla":
    schedule = (dict(chunk_tokens=CPU_CHUNK_TOKENS, row_group=CPU_ROW_GROUP)
                if group_rows and jax.default_backend() == "cpu" else {})
    return paged_attention_xla(q, k_pages, v_pages, q_positions, num_new, page_table, window, k_scale=k_scale,
                               v_scale=v_scale, dtype=dtype, layer=layer, **schedule)
  if layer is not None:
    k_pages, v_pages, k_scale, v_scale = (None if a is None else a[layer] for a in (k_pages, v_pages, k_scale, v_scale))
  k_pages, v_pages = from_pool(k_pages), from_pool(v_pages)  # a CPU bfloat16 pool, whole (interpret mode only)
  b, t, n, h = q.shape
  num_new = num_new.astype(jnp.int32)
  cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(num_new)])  # [B + 1]
  offs = jnp.arange(t, dtype=jnp.int32)
  index = jnp.where(offs[None, :] < num_new[:, None], cu[:-1, None] + offs[None, :], b * t).reshape(-1)  # [B*T]
  packed = jnp.zeros((b * t, n, h), q.dtype).at[index].set(q.reshape(b * t, n, h), mode="drop")
  kv_lens = q_positions[:, 0] + num_new  # [B]
  # TPU: the Mosaic kernel (pages DMA'd from HBM by a prefetched page table); elsewhere the generic one (Triton
  # on GPU, interpret mode on CPU).
  ragged = ragged_paged_attention_tpu if jax.default_backend() == "tpu" else ragged_paged_attention
  kernel = lambda sw: ragged(packed, k_pages, v_pages, kv_lens, page_table, cu, b, sliding_window=sw,
                             k_scale=k_scale, v_scale=v_scale)
  if isinstance(window, int):
    out = kernel(None if window >= FULL_WINDOW else window)
  elif sliding_window is None:
    out = kernel(None)
  else:  # under scan the layer's window is traced; it is one of two values
    out = jax.lax.cond(window >= FULL_WINDOW, lambda: kernel(None), lambda: kernel(sliding_window))
  return out[jnp.minimum(index, b * t - 1)].reshape(b, t, n, h)


def vision_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block_q: int,
                     kv_span: int | None = None, impl: str = "xla") -> jax.Array:
  """The vision tower's attention by `impl` (arguments as `vision_attention_reference`); "xla" is the reference.

  "pallas" runs `segment_attention` (interpret mode on CPU) with its own blocks and block skipping: `block_q` and
  `kv_span` shape only the reference's schedule, never the result.
  """
  _check_impl(impl)
  if impl == "pallas":
    return segment_attention(q, k, v, segments)
  return vision_attention_reference(q, k, v, segments, block_q=block_q, kv_span=kv_span)
