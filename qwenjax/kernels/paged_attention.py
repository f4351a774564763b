"""Paged KV cache and ragged paged attention, in plain JAX: the references that CPU runs and that the Pallas kernels
(`ragged_paged_attention.py`, `ragged_paged_attention_tpu.py`) are tested against.

The cache is a pool of fixed-size pages shared by all sequences; a sequence owns a list of pages (its page table)
and its token at position p lives in page `page_indices[s, p // page_size]` at offset `p % page_size`. A step's
new K/V go in at flat slots `page * page_size + offset` (`write_pages`), and one call of
`ragged_paged_attention_reference` serves a packed mix of sequences: decode rows (one query each) and prefill
chunks (many), back to back in one query array.

Layout: pages are token-major, `[num_pages, page_size, K, H]` (as tpu-inference's ragged paged attention holds
them), not heads-first `[K, num_pages, page_size, H]` (jax's decode-only paged attention). One token's K (or V)
for all its KV heads is one contiguous row, so a step's write is a single scatter of T rows into the pool seen as
`[num_pages * page_size, K, H]`, with no per-head transposition; the int8 scales `[num_pages, page_size, K]`
share the same leading axes and go in with the same slots, by the same function; and sharding KV heads over a
tensor axis splits the third axis of every page alike. A kernel reads one page of one KV head as a strided
[page_size, H] tile, which Mosaic and Triton both load as one block.

int8 pages: values int8 with one float32 scale per token and KV head (symmetric, absmax / 127, `quantize_kv`).
The K scale multiplies the logits, the V scale the probabilities, so no dequantized page is ever materialised:
  scores[t, k, g, s] = (q[t, k, g] . k_int8[s, k]) * k_scale[s, k]
  out[t, k, g]       = sum_s (probs[t, k, g, s] * v_scale[s, k]) * v_int8[s, k]

Einsum legend:
  T packed query tokens (all sequences, then padding)    S sequences (static capacity; num_seqs of them are real)
  N query heads      K KV heads      G query heads per KV head (N = K*G, any G: 7, 6, 8, 5 ...)
  H head dim         P pages of one sequence's table      L key positions of one table (P * page_size)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax._errors import ConfigError

INT8_MAX = 127  # symmetric int8: values in [-127, 127], scale = absmax / 127


# XLA:CPU has no bfloat16 scatter: it converts the whole pool to float32 and back around every write, which made a
# bfloat16 decode step several times float32's (measured: 128 ms to write 8 tokens into one 200 MB pool, against
# 0.009 ms for the same bits as uint16). On CPU a bfloat16 pool therefore holds its values' bits as uint16: writes
# bitcast the new rows (`to_pool`), and attention bitcasts the pages it gathers (`from_pool`).
BF16_BITS = jnp.dtype(jnp.uint16)


def pool_dtype(dtype, backend: str | None = None) -> jnp.dtype:
  """The dtype a pool of `dtype` pages is stored in: BF16_BITS for bfloat16 on CPU, else `dtype`."""
  dtype = jnp.dtype(dtype)
  return BF16_BITS if dtype == jnp.bfloat16 and (backend or jax.default_backend()) == "cpu" else dtype


def to_pool(x: jax.Array, dtype) -> jax.Array:
  """Rows to write into pages stored as `dtype` (BF16_BITS: x as bfloat16, bitcast)."""
  if jnp.dtype(dtype) == BF16_BITS:
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
  return x.astype(dtype)


def from_pool(x: jax.Array) -> jax.Array:
  """Pages (or rows gathered from them) as values: BF16_BITS back to bfloat16, any other dtype as it is."""
  return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == BF16_BITS else x


def scatter_index(index: jax.Array, updates: jax.Array, past_end: int, axis: int = 0
                  ) -> tuple[jax.Array, jax.Array]:
  """(index, updates) for `x.at[..., index].set(updates, mode="drop")`, with -1 sent past the end (`past_end`),
  where the write drops it; a lone update gets a second, dropped one. index: [T] int; updates: T along `axis`.

  XLA rewrites a scatter of one update into select(in bounds, dynamic_update_slice(x), x), which copies the whole
  of x twice: at batch 1 that was two copies of the KV pool per layer and token, a step growing with the pool
  (measured: 2.0x slower decode at a 512-token pool than at 128). Two updates keep it a scatter, done in place."""
  index = jnp.where(index < 0, past_end, index)
  if index.shape[0] == 1:
    index = jnp.concatenate([index, jnp.full((1,), past_end, index.dtype)])
    updates = jnp.concatenate([updates, updates], axis=axis)
  return index, updates


def write_pages(k_pages: jax.Array, v_pages: jax.Array, new_k: jax.Array, new_v: jax.Array,
                slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes a step's new K/V into the page pool at flat slots; exact (no cast, no arithmetic).

  k_pages, v_pages: [num_pages, page_size, ...] (K/V pages [num_pages, page_size, K, H], or int8 scales
  [num_pages, page_size, K]: the same function writes both). new_k, new_v: [T, ...] in the pages' dtype.
  slot_mapping: [T] int32, token t goes to slot page * page_size + offset; -1 marks a padding token, which is not
  written. Slots must be distinct (two tokens at one slot: either may win). Donate the pages under jit so the
  write is in place. Returns (k_pages, v_pages).
  """
  for name, pages, new in (("k", k_pages, new_k), ("v", v_pages, new_v)):
    if pages.ndim < 2 or new.shape != (slot_mapping.shape[0],) + pages.shape[2:]:
      raise ConfigError(f"new_{name} has shape {new.shape}; expected {(slot_mapping.shape[0],) + pages.shape[2:]} "
                        f"(slot_mapping's {slot_mapping.shape[0]} tokens by {name}_pages' {pages.shape} per token).")
    if new.dtype != pages.dtype:
      raise ConfigError(f"new_{name} is {new.dtype} but {name}_pages are {pages.dtype}; quantize or cast first "
                        "(the write is exact and casts nothing).")
  if slot_mapping.ndim != 1 or not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
    raise ConfigError(f"slot_mapping must be [T] integers; got {slot_mapping.shape} {slot_mapping.dtype}.")

  def write(pages, new):
    flat = pages.reshape((-1,) + pages.shape[2:])  # [num_pages * page_size, ...]
    slots, rows = scatter_index(slot_mapping, new, flat.shape[0])  # -1 (padding) would wrap: dropped instead
    return flat.at[slots].set(rows, mode="drop").reshape(pages.shape)

  return write(k_pages, new_k), write(v_pages, new_v)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 per token and KV head. x: [..., K, H] -> (int8 [..., K, H], float32 scale [..., K]) with
  scale = absmax over H / 127 (0 for an all-zero head, whose values are then 0)."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX  # [..., K]
  safe = jnp.where(scale == 0, 1.0, scale)
  values = jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return values, scale


def dequantize_kv(values: jax.Array, scale: jax.Array) -> jax.Array:
  """The inverse of `quantize_kv` (up to rounding): int8 [..., K, H] and scale [..., K] -> float32 [..., K, H]."""
  return values.astype(jnp.float32) * scale[..., None]


def check_inputs(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, k_scale, v_scale):
  """ConfigError naming the argument whose shape or dtype does not fit ragged paged attention (the reference's
  and the kernel's shared contract)."""
  if q.ndim != 3:
    raise ConfigError(f"q has shape {q.shape}; expected [T, N, H].")
  t, n, h = q.shape
  if k_pages.ndim != 4 or k_pages.shape[3] != h or v_pages.shape != k_pages.shape:
    raise ConfigError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be [num_pages, page_size, K, "
                      f"H={h}] (q's head dim).")
  k = k_pages.shape[2]
  if n % k:
    raise ConfigError(f"q's {n} query heads are not a multiple of the pages' {k} KV heads.")
  s = kv_lens.shape[0] if kv_lens.ndim == 1 else -1
  if kv_lens.ndim != 1 or page_indices.ndim != 2 or page_indices.shape[0] != s or cu_q_lens.shape != (s + 1,):
    raise ConfigError(f"kv_lens {kv_lens.shape}, page_indices {page_indices.shape} and cu_q_lens {cu_q_lens.shape} "
                      "must be [S], [S, pages_per_seq] and [S + 1] for one S.")
  quantized = k_pages.dtype == jnp.int8
  if v_pages.dtype != k_pages.dtype:
    raise ConfigError(f"k_pages are {k_pages.dtype} but v_pages are {v_pages.dtype}; expected one dtype.")
  for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
    if quantized and (scale is None or scale.shape != k_pages.shape[:3]):
      got = None if scale is None else scale.shape
      raise ConfigError(f"int8 pages need {name} of shape {k_pages.shape[:3]} (one per token and KV head); got {got}.")
    if not quantized and scale is not None:
      raise ConfigError(f"{name} was given but the pages are {k_pages.dtype}, not int8.")


def ragged_paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                                     page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array | int, *,
                                     sliding_window: int | None = None, k_scale: jax.Array | None = None,
                                     v_scale: jax.Array | None = None) -> jax.Array:
  """Causal grouped-query attention over paged K/V for a packed, ragged batch of sequences, in plain JAX.

  q: [T, N, H], each sequence's new query tokens back to back: sequence i owns rows cu_q_lens[i] to
    cu_q_lens[i + 1] - 1 (q_len 1 for a decode row, more for a prefill chunk); rows from cu_q_lens[num_seqs] on are
    padding and come back as zeros.
  k_pages, v_pages: [num_pages, page_size, K, H], float or int8 (then with k_scale, v_scale [num_pages, page_size,
    K] float32, one scale per token and KV head).
  kv_lens: [S] int32, each sequence's KV length including its new tokens (written first, by `write_pages`); at
    least its query count (a real row with no key to attend would come back NaN).
  page_indices: [S, P] int32, each sequence's page table; entries past its length are never read for their
    content (clipped into range, then masked).
  cu_q_lens: [S + 1] int32 cumulative query starts (cu_q_lens[0] = 0); entries past num_seqs are ignored.
  num_seqs: how many of the S sequences are real; may be traced, so one program serves any count up to S.
  Query j of sequence i sits at position kv_lens[i] - q_len_i + j and attends keys at positions <= it, and
  > it - sliding_window when that is set. Scores and the softmax are float32, scaled by H ** -0.5; float pages
  are weighted by probabilities cast to their dtype (as `attention_reference` does), int8 ones in float32.
  Returns [T, N, H] in q's dtype. All shapes are static (T, S, P, pages): jit compiles once for every num_seqs.

  Each row finds its sequence by a search on cu_q_lens and gathers that sequence's pages: [T, L, K, H] per call,
  simple rather than frugal (a prefill chunk gathers its pages once per query row); the kernels will not.
  """
  check_inputs(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, k_scale, v_scale)
  t, n, h = q.shape
  num_pages, page_size, k, _ = k_pages.shape
  s, p = page_indices.shape
  num_seqs = jnp.asarray(num_seqs, jnp.int32)

  # Which sequence each row belongs to. Entries past num_seqs are set to the end of the real rows, so the search
  # sees a sorted array whatever the caller left there; a sequence with no queries (equal starts) owns no row.
  cu = jnp.where(jnp.arange(s + 1) <= num_seqs, cu_q_lens, cu_q_lens[num_seqs]).astype(jnp.int32)  # [S + 1]
  rows = jnp.arange(t, dtype=jnp.int32)
  valid = rows < cu[num_seqs]  # [T] real query rows
  seq = jnp.clip(jnp.searchsorted(cu, rows, side="right").astype(jnp.int32) - 1, 0, s - 1)  # [T]
  q_len = cu[seq + 1] - cu[seq]
  q_pos = kv_lens[seq] - q_len + (rows - cu[seq])  # [T] position of each query

  pages = jnp.clip(page_indices[seq], 0, num_pages - 1)  # [T, P]
  gather = lambda x: x[pages].reshape((t, p * page_size) + x.shape[2:])  # [T, L, ...]
  keys, values = gather(k_pages), gather(v_pages)  # [T, L, K, H]

  qg = q.reshape(t, k, n // k, h)  # [T, K, G, H]
  if k_scale is not None:  # int8 keys: the dot in float32, then the K scale on the logits
    qg, keys = qg.astype(jnp.float32), keys.astype(jnp.float32)
  scores = jnp.einsum("tkgh,tlkh->tkgl", qg, keys, preferred_element_type=jnp.float32)
  if k_scale is not None:
    scores = scores * jnp.swapaxes(gather(k_scale), 1, 2)[:, :, None, :]  # [T, K, 1, L]
  scores = scores * (h ** -0.5)

  key_pos = jnp.arange(p * page_size, dtype=jnp.int32)  # [L]
  delta = q_pos[:, None] - key_pos[None, :]  # [T, L] query minus key position
  mask = (delta >= 0) & valid[:, None]
  if sliding_window is not None:
    mask &= delta < sliding_window
  scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
  # A padding row has every key masked: its softmax is NaN, replaced by zeros (all-zero output).
  probs = jnp.where(valid[:, None, None, None], jax.nn.softmax(scores, axis=-1), 0.0)  # [T, K, G, L]

  if v_scale is not None:
    probs = probs * jnp.swapaxes(gather(v_scale), 1, 2)[:, :, None, :]
    out = jnp.einsum("tkgl,tlkh->tkgh", probs, values.astype(jnp.float32))
  else:
    out = jnp.einsum("tkgl,tlkh->tkgh", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
  return out.reshape(t, n, h).astype(q.dtype)

