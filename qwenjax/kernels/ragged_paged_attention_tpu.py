"""Ragged paged attention as a Pallas TPU (Mosaic) kernel: the semantics of `qwenjax.kernels.paged_attention`'s
`ragged_paged_attention_reference`, with the page pool left in HBM and only the pages a query block can see
copied into VMEM by hand. Only ever run in Pallas TPU interpret mode on CPU with jax 0.10.2 (no TPU here): it
has not been lowered by Mosaic, and the tiling notes below are what the design aims at, not what a compiler has
accepted. Interpret mode is `pltpu.InterpretParams()` (plain `interpret=True` runs it too on 0.10.2), which
simulates the DMAs and semaphores, fills uninitialised VMEM with NaN and can detect races.

Plan (plain JAX, before `pallas_call`). As in the generic kernel (`ragged_paged_attention`), each real sequence's
query rows are cut into blocks of `block_q` rows of that sequence alone (`block_plan`): I = ceil(T / Q) + S
blocks, a static count, those past the real ones empty. Per block the wrapper also computes the page range its
rows can see: from the page holding the first key inside the sliding window of its first query (page 0 without a
window) to the page holding its last query (causal), so [lo, hi) never reaches past the sequence's length or
before its window, and is empty for an empty block. The queries are regrouped by KV head with the group folded
into the rows: [I, K, R, H], row r = query r // G, head r % G of that KV head, R = Q * G rounded up to the
sublane tile (8 rows, 16 for bfloat16), so any group size (7, 6, 5, 8) fills the MXU's rows without padding G.

Grid (I, K), both parallel: one program per (query block, KV head), its query tile [R, H] and output tile [R, H]
auto-pipelined through VMEM by BlockSpecs (full trailing dims, so any R and H are legal blocks).

Scalar prefetch (SMEM): per block its sequence, first query position, row count, lo and hi [I], and the page
table flattened to [S * P] (entries clipped into the pool). K and V pages (and the int8 scales) stay in HBM
(`memory_space=pl.ANY`).

DMA schedule. A program walks its pages in steps of `pages_per_block` pages: for each page of a step, one
`make_async_copy` of that KV head's [page_size, H] tile (the pool's slice `pages.at[page, :, head, :]`) into a
VMEM buffer [2, pages_per_block, page_size, H], slot step % 2, on that slot's DMA semaphore (one for K, one for
V, two more for the scales). Step 0 is started before the loop; step b starts step b + 1 into the other slot,
then waits for its own copies and computes: copies of step b + 1 overlap the compute of step b. Pages of a step
at or past hi are neither copied nor waited for; their stale buffer rows (NaN in interpret mode) are zeroed by
the key mask before they reach a dot. The first step of each program is not overlapped (no prefetch across grid
steps, which would tie the grid to one core's order).

Compute per step, in float32: scores [R, C] = q [R, H] . keys [C, H] (C = pages_per_block * page_size keys),
scaled by H ** -0.5, masked causally, by the window and to the step's fetched key range; an online softmax
(running max m, running sum l, unnormalised accumulator [R, H], all float32 VMEM scratch; m and l lane-
replicated [R, 128]) folds the step in. Float pages are weighted by probabilities cast to their dtype, as the
reference does. int8 pages: each page's scale row [page_size, K] is copied too and this head's column picked
with a lane mask; the K scale multiplies the keys' float32 tile before the dot and the V scale the values' one
before the weighted sum. Per key column s that is the reference's (q . k_s) * k_scale_s and
sum_s (p_s * v_scale_s) v_s up to float32 rounding, without moving the scales (tokens down the sublanes) onto
the lanes that the logits' key axis occupies. Empty blocks and padding rows come back as zeros.

Tiling (what Mosaic should need; unverified). H sits on lanes (64 or 128: a full dim); page_size on sublanes, a
multiple of 8 (16 for bfloat16 and 32 for int8 pages to fill their packed tiles; the TPU default is 128); the
scratch buffers flatten [pages_per_block, page_size, H] to [C, H] at tile boundaries for that reason. The
per-head page slice is a strided DMA (the pool is token-major [pages, page, K, H]); the int8 scale slab
[page_size, K] pads K to 128 lanes. SMEM holds the whole flat page table: S * P int32 must fit (tens of
thousands of pages at most).

Einsum legend:
  T packed query tokens    S sequences (static capacity)    N query heads    K KV heads
  G query heads per KV head (N = K * G)    H head dim    P pages of one table    I query blocks
  Q query rows of one block    R = Q * G rounded up to the sublane tile    C keys of one step
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwenjax._errors import ConfigError
from qwenjax.kernels.paged_attention import check_inputs
from qwenjax.kernels.ragged_paged_attention import block_plan, unpack_blocks

# A finite "minus infinity" (see segment_attention): exp of a masked score underflows to 0, and a row whose first
# step is all masked has its partial sums wiped by exp(m_old - m_new) = 0 once a real score arrives.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LANES = 128
_SUBLANES = 8


def _kernel(seq_ref, pos0_ref, rows_ref, lo_ref, hi_ref, table_ref,  # scalar prefetch (SMEM)
            q_ref, k_hbm, v_hbm, *refs, page_size: int, pages_per_seq: int, pages_per_block: int, group: int,
            window: int | None, scale: float, quantized: bool, precision):
  """One (query block, KV head). q_ref, o_ref [R, H] VMEM; k_hbm, v_hbm [num_pages, page_size, K, H] HBM
  (ks_hbm, vs_hbm [num_pages, page_size, K] when quantized); buffers [2, pages_per_block, page_size, ...]."""
  if quantized:
    ks_hbm, vs_hbm, o_ref, k_buf, v_buf, ks_buf, vs_buf, sems, acc_ref, m_ref, l_ref = refs
  else:
    o_ref, k_buf, v_buf, sems, acc_ref, m_ref, l_ref = refs
  i, head = pl.program_id(0), pl.program_id(1)
  seq, pos0, n_rows, lo, hi = seq_ref[i], pos0_ref[i], rows_ref[i], lo_ref[i], hi_ref[i]
  r, h = q_ref.shape
  c = pages_per_block * page_size
  num_steps = (hi - lo + pages_per_block - 1) // pages_per_block

  def page_copies(step, slot):
    """[(fetched?, [descriptors])] for each page of a step: K and V tiles of this head, and the scale rows."""
    out = []
    for p in range(pages_per_block):
      j = lo + step * pages_per_block + p
      page = table_ref[seq * pages_per_seq + jnp.minimum(j, pages_per_seq - 1)]
      copies = [pltpu.make_async_copy(k_hbm.at[page, :, head, :], k_buf.at[slot, p], sems.at[slot, 0]),
                pltpu.make_async_copy(v_hbm.at[page, :, head, :], v_buf.at[slot, p], sems.at[slot, 1])]
      if quantized:
        copies += [pltpu.make_async_copy(ks_hbm.at[page], ks_buf.at[slot, p], sems.at[slot, 2]),
                   pltpu.make_async_copy(vs_hbm.at[page], vs_buf.at[slot, p], sems.at[slot, 3])]
      out.append((j < hi, copies))
    return out

  def each_copy(step, slot, action):  # start or wait for the copies of a step's fetched pages
    for fetched, copies in page_copies(step, slot):
      @pl.when(fetched)
      def _(copies=copies):
        for copy in copies:
          action(copy)

  start = functools.partial(each_copy, action=lambda copy: copy.start())
  wait = functools.partial(each_copy, action=lambda copy: copy.wait())

  @pl.when(num_steps > 0)
  def _():
    start(0, 0)

  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  q = q_ref[...]  # [R, H]
  if quantized:
    q = q.astype(jnp.float32)
  q_pos = pos0 + lax.broadcasted_iota(jnp.int32, (r, 1), 0) // group  # [R, 1] position of each row's query
  first_key = jnp.int32(0) if window is None else jnp.maximum(pos0 - window + 1, 0)
  last_key = pos0 + n_rows - 1

  def scale_column(buf, slot):
    """This head's scales of the step's keys as a column [C, 1] (lane mask and sum: no dynamic lane slice)."""
    slab = buf[slot].reshape(c, buf.shape[-1])  # [C, K]
    lane = lax.broadcasted_iota(jnp.int32, slab.shape, 1)
    return jnp.sum(jnp.where(lane == head, slab, 0.0), axis=1, keepdims=True)

  def step_body(step, carry):
    slot = step % 2

    @pl.when(step + 1 < num_steps)
    def _():
      start(step + 1, 1 - slot)

    wait(step, slot)
    first_pos = (lo + step * pages_per_block) * page_size  # position of the step's first key
    key_col = first_pos + lax.broadcasted_iota(jnp.int32, (c, 1), 0)  # [C, 1] key positions down the sublanes
    key_row = first_pos + lax.broadcasted_iota(jnp.int32, (1, c), 1)  # [1, C] the same along the lanes
    fetched = (key_col >= first_key) & (key_col <= last_key)  # [C, 1] inside the pages copied, and needed
    keys, values = k_buf[slot].reshape(c, h), v_buf[slot].reshape(c, h)  # [C, H]
    if quantized:
      keys = keys.astype(jnp.float32) * scale_column(ks_buf, slot)
      values = values.astype(jnp.float32) * scale_column(vs_buf, slot)
    # Stale buffer rows (pages not copied) may hold anything, NaN included: zero them before any dot.
    keys = jnp.where(fetched, keys, jnp.zeros_like(keys))
    values = jnp.where(fetched, values, jnp.zeros_like(values))

    scores = lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32) * scale  # [R, C]
    delta = q_pos - key_row  # [R, C] query minus key position
    mask = delta >= 0
    if window is not None:
      mask &= delta < window
    scores = jnp.where(mask, scores, _MASK_VALUE)

    m_prev = m_ref[...]  # [R, 128] lane-replicated
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    correction = jnp.exp(m_prev - m_next)
    probs = jnp.exp(scores - m_next[:, :1])  # [R, C] unnormalised
    l_ref[...] = correction * l_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
    m_ref[...] = m_next
    if not quantized:
      probs = probs.astype(values.dtype)
    pv = lax.dot_general(probs, values, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)  # [R, H]
    acc_ref[...] = correction[:, :1] * acc_ref[...] + pv
    return carry

  lax.fori_loop(0, num_steps, step_body, 0)
  total = l_ref[...][:, :1]
  total = jnp.where(total > 0, total, 1.0)  # an empty block visits no page: zeros, not NaN
  o_ref[...] = (acc_ref[...] / total).astype(o_ref.dtype)


def _visible_pages(pos0: jax.Array, n_rows: jax.Array, page_size: int, window: int | None):
  """(lo, hi) [I]: the table slots a query block copies, from the page of the first key inside its first query's
  window (0 without one) to the page of its last query; lo = hi for an empty block."""
  first_key = jnp.zeros_like(pos0) if window is None else jnp.maximum(pos0 - window + 1, 0)
  lo = first_key // page_size
  hi = jnp.where(n_rows > 0, (pos0 + n_rows - 1) // page_size + 1, lo)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("sliding_window", "block_q", "pages_per_block", "interpret"))
def ragged_paged_attention_tpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                               page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array | int, *,
                               sliding_window: int | None = None, k_scale: jax.Array | None = None,
                               v_scale: jax.Array | None = None, block_q: int = 16, pages_per_block: int = 1,
                               interpret: bool | pltpu.InterpretParams | None = None) -> jax.Array:
  """`ragged_paged_attention_reference` (same arguments, same result) as one Pallas TPU kernel.

  q: [T, N, H]; k_pages, v_pages: [num_pages, page_size, K, H] float or int8 (with k_scale, v_scale [num_pages,
  page_size, K] float32); kv_lens [S], page_indices [S, P], cu_q_lens [S + 1] int32; num_seqs may be traced.
  page_size must be a multiple of 8. block_q: query rows per block (each block serves all G query heads of one
  KV head, R = block_q * G rounded up to the sublane tile); pages_per_block: pages per DMA step (the keys of one
  score tile: pages_per_block * page_size). interpret: None runs Pallas TPU interpret mode
  (`pltpu.InterpretParams()`, which simulates the DMAs and semaphores) everywhere but on TPU, where it compiles
  with Mosaic; True forces it, False compiles; an `InterpretParams` is passed through (to detect races, say).
  Returns [T, N, H] in q's dtype, zeros on padding rows.
  """
  check_inputs(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, k_scale, v_scale)
  t, n, h = q.shape
  num_pages, page_size, k, _ = k_pages.shape
  s, p = page_indices.shape
  g = n // k
  if page_size % _SUBLANES:
    raise ConfigError(f"ragged_paged_attention_tpu page_size={page_size} is not a multiple of {_SUBLANES}.")
  if block_q < 1 or pages_per_block < 1:
    raise ConfigError(f"ragged_paged_attention_tpu block_q={block_q} and pages_per_block={pages_per_block} "
                      "must be >= 1.")
  if sliding_window is not None and sliding_window < 1:
    raise ConfigError(f"ragged_paged_attention_tpu sliding_window={sliding_window} must be >= 1 (or None).")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  quantized = k_pages.dtype == jnp.int8
  sublanes = _SUBLANES * max(1, 4 // jnp.dtype(q.dtype).itemsize)  # 8 rows of 32 bits, 16 of bfloat16
  rows = -(-(block_q * g) // sublanes) * sublanes  # R
  num_blocks = -(-t // block_q) + s  # each sequence adds at most one partly filled block
  num_seqs = jnp.asarray(num_seqs, jnp.int32)

  cu, blk_cu, seq, start, n_rows, pos0 = block_plan(cu_q_lens, kv_lens, num_seqs, num_blocks, block_q)
  lo, hi = _visible_pages(pos0, n_rows, page_size, sliding_window)

  # Queries per block, the group folded into rows: [I, Q] -> [I, K, Q * G, H] -> padded to [I, K, R, H].
  offs = jnp.arange(block_q, dtype=jnp.int32)
  row_ids = jnp.clip(start[:, None] + offs[None, :], 0, t - 1)  # [I, Q]
  in_block = offs[None, :] < n_rows[:, None]
  qb = jnp.where(in_block[:, :, None, None], q[row_ids], 0).reshape(num_blocks, block_q, k, g, h)
  qb = qb.transpose(0, 2, 1, 3, 4).reshape(num_blocks, k, block_q * g, h)
  qb = jnp.pad(qb, ((0, 0), (0, 0), (0, rows - block_q * g), (0, 0)))

  table = jnp.clip(page_indices.astype(jnp.int32), 0, num_pages - 1).reshape(-1)  # [S * P]
  prefetch = (seq, pos0, n_rows, lo, hi, table)

  hbm = pl.BlockSpec(memory_space=pl.ANY)
  tile = pl.BlockSpec((None, None, rows, h), lambda i, head, *_: (i, head, 0, 0))
  in_specs = [tile, hbm, hbm]
  args = [qb, k_pages, v_pages]
  buffers = [pltpu.VMEM((2, pages_per_block, page_size, h), k_pages.dtype)] * 2
  if quantized:
    in_specs += [hbm, hbm]
    args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    buffers += [pltpu.VMEM((2, pages_per_block, page_size, k), jnp.float32)] * 2
  scratch = buffers + [
      pltpu.SemaphoreType.DMA((2, len(buffers))),  # [slot, buffer]
      pltpu.VMEM((rows, h), jnp.float32),  # acc
      pltpu.VMEM((rows, _LANES), jnp.float32),  # m
      pltpu.VMEM((rows, _LANES), jnp.float32),  # l
  ]
  kernel = functools.partial(
      _kernel, page_size=page_size, pages_per_seq=p, pages_per_block=pages_per_block, group=g,
      window=sliding_window, scale=h ** -0.5, quantized=quantized,
      precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 or quantized else None)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(prefetch), grid=(num_blocks, k),
                                             in_specs=in_specs, out_specs=tile, scratch_shapes=scratch),
      out_shape=jax.ShapeDtypeStruct((num_blocks, k, rows, h), q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret is True else interpret,
      name="ragged_paged_attention_tpu",
  )(*prefetch, *args)  # [I, K, R, H]

  out = out[:, :, :block_q * g].reshape(num_blocks, k, block_q, g, h).transpose(0, 2, 1, 3, 4)
  out = out.reshape(num_blocks * block_q, n, h)
  return unpack_blocks(out, cu, blk_cu, num_seqs, t, block_q).astype(q.dtype)
