"""Ragged paged attention as a Pallas kernel: flash attention for a packed mix of decode rows and prefill chunks
over the paged KV cache, with exactly the semantics of `qwenjax.kernels.paged_attention`'s
`ragged_paged_attention_reference`, which the tests hold this kernel to.

Blocks. Before `pallas_call`, in plain JAX, each real sequence's query rows are cut into blocks of `block_q` rows
that belong to that sequence alone (its last block partly filled); there are at most I = ceil(T / block_q) + S
of them, a static count, and the ones past the real blocks are empty. Per block the wrapper computes its
sequence, its first row in the packed q, its row count and the position of its first query (`block_plan`),
and gathers its queries heads-grouped: [I, K, Q * G', H], the G query heads of one KV head side by side (G
padded with zero heads to a power of two G', so 7, 6, 5 -> 8), so one program serves all G heads of its KV
head with one [Q * G', H] x [H, page] dot per page (GQA without repeating K/V).

Kernel. One program per (query block, KV head) walks the pages its rows can see: from the page holding the
first key inside the sliding window of its first query (0 without a window) to the page holding its last
query's position, a `fori_loop` with dynamic bounds, so pages past a sequence's length, outside its window, or
belonging to an empty block cost no load and no trip. Each page is found through the page table (a flat int32
input; entries clipped into range first), loaded as a [page, H] tile of one KV head, and folded into an online
softmax in float32 (running max, running sum, unnormalised accumulator), masked causally and by the window.
int8 pages: the dot runs in float32 on the int8 values, the K scale multiplies the logits and the V scale the
(unnormalised) probabilities, as the reference does; float pages are weighted by probabilities cast to their
dtype. The output blocks are scattered back to the packed rows; padding rows come back as zeros.

Portability. page_size and head_dim must be powers of two >= 16 (Triton's tile and `tl.dot` rules; Qwen2.5's
head dims are 64 and 128), and Q * G' >= 16 (block_q is raised to reach it). `interpret=None` runs Pallas
interpret mode on CPU and compiles elsewhere (Triton CompilerParams on GPU). Tested in interpret mode with jax
0.10.2 only: not yet compiled on a GPU or a TPU. The whole page pool of one KV head is one block spec (a strided
[num_pages, page, H] view); on TPU, Mosaic would want the page table as scalar prefetch and pages DMA'd by hand.

Einsum legend:
  T packed query tokens    S sequences (static capacity)    N query heads    K KV heads
  G query heads per KV head (any: 7, 6, 8, 5)    G' G padded to a power of two    H head dim
  Q query rows of one block    R = Q * G' kernel rows    I query blocks    P pages of one table
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwenjax._errors import ConfigError
from qwenjax.kernels.buckets import next_power_of_two
from qwenjax.kernels.paged_attention import check_inputs

# A finite "minus infinity" (see segment_attention): exp of a masked score underflows to 0 and a row whose first
# page is all masked has its partial sums wiped by exp(m_old - m_new) = 0 once a real score arrives.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_MIN_BLOCK = 16  # Triton's tl.dot needs every dim >= 16


def _is_power_of_2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def block_plan(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, num_blocks: int, block_q: int):
  """(cu, blk_cu, seq, start, rows, pos0): the cleaned query starts [S + 1], each sequence's first block [S + 1],
  and per query block [I] its sequence, first packed row, row count (0 past the real blocks) and the position of
  its first query."""
  s = kv_lens.shape[0]
  # As the reference: entries past num_seqs set to the end of the real rows (sorted whatever the caller left).
  cu = jnp.where(jnp.arange(s + 1) <= num_seqs, cu_q_lens, cu_q_lens[num_seqs]).astype(jnp.int32)  # [S + 1]
  q_lens = cu[1:] - cu[:-1]  # [S], 0 past num_seqs
  blocks_per_seq = -(-q_lens // block_q)
  blk_cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(blocks_per_seq).astype(jnp.int32)])  # [S + 1]

  b = jnp.arange(num_blocks, dtype=jnp.int32)
  seq = jnp.clip(jnp.searchsorted(blk_cu, b, side="right").astype(jnp.int32) - 1, 0, s - 1)  # [I]
  local = b - blk_cu[seq]  # block index within its sequence
  real = b < blk_cu[s]
  start = cu[seq] + local * block_q
  rows = jnp.where(real, jnp.clip(q_lens[seq] - local * block_q, 0, block_q), 0)
  pos0 = kv_lens[seq].astype(jnp.int32) - q_lens[seq] + local * block_q
  return cu, blk_cu, seq, start, rows, pos0


def _kernel(*refs, page_size: int, pages_per_seq: int, g_pad: int, window: int | None, scale: float,
            quantized: bool, precision):
  """One (query block, KV head): q_ref [R, H]; k_ref, v_ref [num_pages, page, H]; scalars per block."""
  if quantized:
    seq_ref, rows_ref, pos_ref, table_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref = refs
  else:
    seq_ref, rows_ref, pos_ref, table_ref, q_ref, k_ref, v_ref, o_ref = refs
  r = q_ref.shape[0]
  seq, n_rows, pos0 = seq_ref[()], rows_ref[()], pos_ref[()]
  q = q_ref[...]  # [R, H]
  if quantized:
    q = q.astype(jnp.float32)
  q_pos = pos0 + jnp.arange(r, dtype=jnp.int32) // g_pad  # [R] position of each row's query

  last_pos = pos0 + n_rows - 1
  first_key = jnp.int32(0) if window is None else jnp.maximum(pos0 - window + 1, 0)
  lo = first_key // page_size
  hi = jnp.where(n_rows > 0, last_pos // page_size + 1, lo)

  def visit(j, carry):
    acc, m, total = carry  # [R, H], [R], [R] float32
    page = table_ref[seq * pages_per_seq + j]
    keys = k_ref[page]  # [page, H]
    if quantized:
      keys = keys.astype(jnp.float32)
    scores = jnp.einsum("rh,ph->rp", q, keys, precision=precision, preferred_element_type=jnp.float32)
    if quantized:
      scores = scores * ks_ref[page][None, :]
    scores = scores * scale
    delta = q_pos[:, None] - (j * page_size + jnp.arange(page_size, dtype=jnp.int32))[None, :]  # [R, page]
    mask = delta >= 0
    if window is not None:
      mask &= delta < window
    scores = jnp.where(mask, scores, _MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(axis=1))
    correction = jnp.exp(m - m_new)
    probs = jnp.exp(scores - m_new[:, None])  # [R, page], unnormalised
    total = correction * total + probs.sum(axis=1)
    values = v_ref[page]  # [page, H]
    if quantized:
      pv = jnp.einsum("rp,ph->rh", probs * vs_ref[page][None, :], values.astype(jnp.float32), precision=precision,
                      preferred_element_type=jnp.float32)
    else:
      pv = jnp.einsum("rp,ph->rh", probs.astype(values.dtype), values, precision=precision,
                      preferred_element_type=jnp.float32)
    return correction[:, None] * acc + pv, m_new, total

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((r,), _MASK_VALUE, jnp.float32), jnp.zeros((r,), jnp.float32))
  acc, _, total = lax.fori_loop(lo, hi, visit, init)
  total = jnp.where(total > 0, total, 1.0)  # an empty block visits no page: zeros, not NaN
  o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_q", "interpret"))
def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                           page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array | int, *,
                           sliding_window: int | None = None, k_scale: jax.Array | None = None,
                           v_scale: jax.Array | None = None, block_q: int = 16,
                           interpret: bool | None = None) -> jax.Array:
  """`ragged_paged_attention_reference` (same arguments, same result) as one Pallas kernel.

  q: [T, N, H]; k_pages, v_pages: [num_pages, page_size, K, H] float or int8 (with k_scale, v_scale [num_pages,
  page_size, K] float32); kv_lens [S], page_indices [S, P], cu_q_lens [S + 1] int32; num_seqs may be traced.
  page_size and H must be powers of two >= 16. block_q: query rows per block, a power of two, raised so that
  block_q * G' >= 16 (G' the group size padded to a power of two); smaller blocks waste less on decode rows,
  larger ones load each page for more queries. interpret: None runs Pallas interpret mode on CPU and compiles on
  GPU/TPU. Scores, the softmax and the accumulator are float32; returns [T, N, H] in q's dtype, zeros on padding
  rows.
  """
  check_inputs(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, k_scale, v_scale)
  t, n, h = q.shape
  num_pages, page_size, k, _ = k_pages.shape
  s, p = page_indices.shape
  g = n // k
  for name, size in (("head_dim", h), ("page_size", page_size)):
    if size < _MIN_BLOCK or not _is_power_of_2(size):
      raise ConfigError(f"ragged_paged_attention {name}={size} is not a power of two >= {_MIN_BLOCK}.")
  if not _is_power_of_2(block_q):
    raise ConfigError(f"ragged_paged_attention block_q={block_q} is not a power of two.")
  if sliding_window is not None and sliding_window < 1:
    raise ConfigError(f"ragged_paged_attention sliding_window={sliding_window} must be >= 1 (or None).")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  quantized = k_pages.dtype == jnp.int8
  g_pad = next_power_of_two(g)
  bq = max(block_q, _MIN_BLOCK // g_pad)
  r = bq * g_pad
  num_blocks = -(-t // bq) + s  # each sequence adds at most one partly filled block
  num_seqs = jnp.asarray(num_seqs, jnp.int32)

  cu, blk_cu, seq, start, rows, pos0 = block_plan(cu_q_lens, kv_lens, num_seqs, num_blocks, bq)

  # Queries per block, heads grouped by KV head: [I, Q] rows -> [I, K, Q * G', H], zeros for rows past the block.
  offs = jnp.arange(bq, dtype=jnp.int32)
  row_ids = jnp.clip(start[:, None] + offs[None, :], 0, t - 1)  # [I, Q]
  in_block = offs[None, :] < rows[:, None]
  qb = jnp.where(in_block[:, :, None, None], q[row_ids], 0).reshape(num_blocks, bq, k, g, h)
  qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, g_pad - g), (0, 0)))
  qb = qb.transpose(0, 2, 1, 3, 4).reshape(num_blocks, k, r, h)

  table = jnp.clip(page_indices.astype(jnp.int32), 0, num_pages - 1).reshape(-1)  # [S * P]
  table_len = max(_MIN_BLOCK, next_power_of_two(s * p))
  table = jnp.pad(table, (0, table_len - s * p))

  kernel = functools.partial(
      _kernel, page_size=page_size, pages_per_seq=p, g_pad=g_pad, window=sliding_window, scale=h ** -0.5,
      quantized=quantized, precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 or quantized else None)
  per_block = pl.BlockSpec((None,), lambda i, head: (i,))
  pool = pl.BlockSpec((num_pages, page_size, None, h), lambda i, head: (0, 0, head, 0))  # one KV head's pages
  in_specs = [per_block, per_block, per_block, pl.BlockSpec((table_len,), lambda i, head: (0,)),
              pl.BlockSpec((None, None, r, h), lambda i, head: (i, head, 0, 0)), pool, pool]
  args = [seq, rows, pos0, table, qb, k_pages, v_pages]
  if quantized:
    scales = pl.BlockSpec((num_pages, page_size, None), lambda i, head: (0, 0, head))
    in_specs += [scales, scales]
    args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
  triton = not interpret and jax.default_backend() == "gpu"
  out = pl.pallas_call(
      kernel,
      grid=(num_blocks, k),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, r, h), lambda i, head: (i, head, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((num_blocks, k, r, h), q.dtype),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=4 if h <= 64 else 8, num_stages=2) if triton else None,
      name="ragged_paged_attention",
  )(*args)  # [I, K, R, H]

  out = out.reshape(num_blocks, k, bq, g_pad, h)[:, :, :, :g].transpose(0, 2, 1, 3, 4).reshape(num_blocks * bq, n, h)
  return unpack_blocks(out, cu, blk_cu, num_seqs, t, bq).astype(q.dtype)


def unpack_blocks(out: jax.Array, cu: jax.Array, blk_cu: jax.Array, num_seqs: jax.Array, t: int,
                  block_q: int) -> jax.Array:
  """The kernels' block-major output [I * Q, N, H] (block i's rows i * Q ..) back in packed row order [T, N, H]:
  row t of sequence j is row (t - cu[j]) % Q of block blk_cu[j] + (t - cu[j]) // Q (`block_plan`'s cu and
  blk_cu); padding rows come back as zeros."""
  s = cu.shape[0] - 1
  packed = jnp.arange(t, dtype=jnp.int32)
  valid = packed < cu[num_seqs]
  row_seq = jnp.clip(jnp.searchsorted(cu, packed, side="right").astype(jnp.int32) - 1, 0, s - 1)
  local = packed - cu[row_seq]
  flat = jnp.clip((blk_cu[row_seq] + local // block_q) * block_q + local % block_q, 0, out.shape[0] - 1)
  return jnp.where(valid[:, None, None], out[flat], 0)
