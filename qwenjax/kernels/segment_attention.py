"""Segment attention for the vision tower as a Pallas kernel: flash attention over query and key blocks that
skips every key block whose segments cannot meet the query block's.

Query i attends to key j iff segments[i] == segments[j] (bidirectional; padding patches share segment -1 and
attend only to each other), exactly `qwenjax.kernels.attention.vision_attention_reference`, which the tests hold
this kernel to. One program per (head, query block) loads its [Q, D] queries once and walks key blocks with an
online softmax in float32 (running max, running sum, unnormalised accumulator), then divides once.

Skipping. Before `pallas_call`, in plain JAX, each block gets the min and max of its segment ids (`block_overlap`);
a query block and a key block can share a segment only if their ranges overlap. The tower lays segments out as
contiguous, increasing runs (windows, or whole frames) with padding last, so the key blocks a query block needs
are one contiguous stretch [first, last] (`kv_block_ranges`), and the kernel's loop runs over that stretch
alone: a skipped block costs no load, no matmul, no loop trip. The ranges are ordered so that padding (-1) sorts
after every real segment (`_order_key`) and stays one run at the end. For any other layout the result is still
exact (the mask decides, the ranges only prune), just with fewer blocks skipped. The skip is in the loop bounds
rather than a `pl.when` per block: `pl.when` returns nothing, so the softmax state would have to live in scratch
refs, which the Triton backend lacks; loop bounds keep it in registers and cost a skipped block not even a trip.

Portability. Blocks and the head dim are powers of two of at least 16 (Triton's tile and `tl.dot` rules): the
wrapper pads the head dim with zeros (80 -> 128: zero columns change no score and give zero outputs, sliced away)
and the patch axis to a whole number of blocks (padded keys masked by index, padded queries sliced away), and
lays heads first ([N, P, D]) so a block's last two dims are (Q, D), as Mosaic wants. `interpret=None` runs in
Pallas interpret mode on CPU and compiles elsewhere (Triton on GPU). Tested in interpret mode with jax 0.10.2
only: not yet compiled on a GPU or a TPU. On TPU, Mosaic would rather take the per-block loop bounds as scalar
prefetch (SMEM) and, for long P, walk K/V along a grid axis than hold a whole head's K/V in VMEM.

Einsum legend:
  P patches          N heads            H head dim          D head dim padded to a power of two
  Q queries of one block                K keys of one block
  I query blocks     J key blocks
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

# A finite "minus infinity": a masked score's exp underflows to 0, and a row whose first blocks are all masked
# (m still this value) has its partial sums wiped by the correction factor exp(m_old - m_new) = 0 once a real
# score arrives. With -inf, exp(-inf - -inf) would be NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_MIN_BLOCK = 16  # Triton's tl.dot needs every dim >= 16


def _order_key(segments: jax.Array) -> jax.Array:
  """Segment ids reordered for range tests: non-negative ids keep their order, negative ones (padding -1) sort
  after all of them. A bijection on int32 (the sign bit flipped), so equal keys mean equal segments."""
  return jnp.bitwise_xor(segments.astype(jnp.int32), jnp.int32(np.iinfo(np.int32).min))


def _block_sizes(p: int, block_q: int, block_k: int) -> tuple[int, int, int]:
  """(block_q, block_k, padded P) for P patches: blocks no larger than P needs, P padded to whole blocks."""
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block < _MIN_BLOCK or block & (block - 1):
      raise ConfigError(f"segment_attention {name}={block} is not a power of two >= {_MIN_BLOCK}.")
  fit = max(_MIN_BLOCK, next_power_of_two(p))
  bq, bk = min(block_q, fit), min(block_k, fit)
  step = max(bq, bk)  # both powers of two: a multiple of each
  return bq, bk, -(-p // step) * step


def block_overlap(segments: jax.Array, *, block_q: int, block_k: int) -> jax.Array:
  """Which key blocks each query block may need: [I, J] bool, True iff the blocks' segment-id ranges overlap.

  segments: [P] int32 (P any size; the blocks are the kernel's, as `segment_attention` pads: see `_block_sizes`).
  Key blocks wholly past P are False. Plain JAX, run before the kernel; `kv_block_ranges` turns it into loops.
  """
  p = segments.shape[0]
  bq, bk, padded = _block_sizes(p, block_q, block_k)
  key = _order_key(jnp.pad(segments, (0, padded - p), mode="edge"))  # [P'], padding repeats the last id
  q_key, k_key = key.reshape(-1, bq), key.reshape(-1, bk)  # [I, Q], [J, K]
  q_lo, q_hi = q_key.min(1), q_key.max(1)  # [I]
  k_lo, k_hi = k_key.min(1), k_key.max(1)  # [J]
  overlap = (q_lo[:, None] <= k_hi[None, :]) & (k_lo[None, :] <= q_hi[:, None])  # [I, J]
  return overlap & (jnp.arange(k_key.shape[0]) < -(-p // bk))[None, :]


def kv_block_ranges(overlap: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(first, last): [I] int32 each, the first and last key block that query block i may need (inclusive).

  Every query block overlaps the key blocks holding its own patches, so each row of `overlap` has a True and
  first <= last. The kernel visits last - first + 1 key blocks for query block i.
  """
  j = overlap.shape[1]
  first = jnp.argmax(overlap, axis=1).astype(jnp.int32)
  last = (j - 1 - jnp.argmax(overlap[:, ::-1], axis=1)).astype(jnp.int32)
  return first, last


def _kernel(first_ref, last_ref, seg_ref, q_ref, k_ref, v_ref, o_ref, *, block_k: int, scale: float,
            num_valid: int | None, precision):
  """One (head, query block): q_ref [Q, D]; k_ref, v_ref [P', D]; seg_ref [P']; first_ref, last_ref scalars."""
  block_q = q_ref.shape[0]
  q = q_ref[...]  # [Q, D]
  q_seg = seg_ref[pl.ds(pl.program_id(1) * block_q, block_q)]  # [Q]

  def visit(j, carry):
    acc, m, total = carry  # [Q, D], [Q], [Q] float32: accumulator, running max, running sum
    keys = pl.ds(j * block_k, block_k)
    scores = jnp.einsum("qd,kd->qk", q, k_ref[keys, :], precision=precision,
                        preferred_element_type=jnp.float32) * scale  # [Q, K]
    mask = q_seg[:, None] == seg_ref[keys][None, :]  # [Q, K]
    if num_valid is not None:  # P was padded: padded keys repeat the last segment id, so mask them by index
      mask &= (j * block_k + jnp.arange(block_k) < num_valid)[None, :]
    scores = jnp.where(mask, scores, _MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(axis=1))
    correction = jnp.exp(m - m_new)  # [Q]
    probs = jnp.exp(scores - m_new[:, None])  # [Q, K], unnormalised
    v = v_ref[keys, :]  # [K, D]
    acc = correction[:, None] * acc + jnp.einsum("qk,kd->qd", probs.astype(v.dtype), v, precision=precision,
                                                 preferred_element_type=jnp.float32)
    return acc, m_new, correction * total + probs.sum(axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), _MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, _, total = lax.fori_loop(first_ref[()], last_ref[()] + 1, visit, init)
  o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block_q: int = 64,
                      block_k: int = 64, interpret: bool | None = None) -> jax.Array:
  """Non-causal attention within segments (as `vision_attention_reference`), as one Pallas kernel.

  q, k, v: [P, N, H], one dtype; segments: [P] int32, contiguous runs for the skipping to pay (any layout is
  exact). block_q, block_k: powers of two >= 16, capped at what P needs (the tower's 112-pixel windows are
  64 patches: the default blocks hold about one each). interpret: None runs Pallas interpret mode on CPU and
  compiles on GPU/TPU. Scores, the softmax and the accumulator are float32; returns [P, N, H] in q's dtype.
  """
  if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
    raise ConfigError(f"segment_attention needs q, k, v of one shape [P, N, H]; got {q.shape}, {k.shape}, "
                      f"{v.shape}.")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ConfigError(f"segment_attention needs q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  p, n, h = q.shape
  if segments.shape != (p,):
    raise ConfigError(f"segment_attention segments have shape {segments.shape}; expected ({p},) for {p} patches.")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  bq, bk, padded = _block_sizes(p, block_q, block_k)
  d = max(_MIN_BLOCK, next_power_of_two(h))

  first, last = kv_block_ranges(block_overlap(segments, block_q=block_q, block_k=block_k))  # [I], [I]
  seg = jnp.pad(segments.astype(jnp.int32), (0, padded - p), mode="edge")  # [P']
  # [P, N, H] -> [N, P', D]: heads lead, zero rows and columns pad to whole blocks and a power-of-two head dim.
  qt, kt, vt = (jnp.pad(a.transpose(1, 0, 2), ((0, 0), (0, padded - p), (0, d - h))) for a in (q, k, v))

  kernel = functools.partial(
      _kernel, block_k=bk, scale=h ** -0.5, num_valid=p if padded != p else None,
      precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
  triton = not interpret and jax.default_backend() == "gpu"
  whole_head = pl.BlockSpec((None, padded, d), lambda head, i: (head, 0, 0))
  out = pl.pallas_call(
      kernel,
      grid=(n, padded // bq),
      in_specs=[
          pl.BlockSpec((None,), lambda head, i: (i,)),  # first key block of query block i
          pl.BlockSpec((None,), lambda head, i: (i,)),  # last key block
          pl.BlockSpec((padded,), lambda head, i: (0,)),  # segments, all of them
          pl.BlockSpec((None, bq, d), lambda head, i: (head, i, 0)),  # queries of this block
          whole_head,  # keys
          whole_head,  # values
      ],
      out_specs=pl.BlockSpec((None, bq, d), lambda head, i: (head, i, 0)),
      out_shape=jax.ShapeDtypeStruct((n, padded, d), q.dtype),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2) if triton else None,
      name="segment_attention",
  )(first, last, seg, qt, kt, vt)  # [N, P', D]
  return out[:, :p, :h].transpose(1, 0, 2)
