"""Grouped matmul for mixture-of-experts layers: rows sorted by expert, each group of rows times its own weight.

    y = grouped_matmul(x, w, group_sizes)                      # impl="xla": jax.lax.ragged_dot, the reference
    y = grouped_matmul(x, w, group_sizes, impl="pallas")       # the Mosaic kernel on TPU, else the generic one

  x [M, K] rows sorted by group: rows [start_g, start_g + group_sizes[g]) belong to group g (starts are the
  exclusive cumulative sums); rows past the last group's end belong to none and come out 0.
  w [G, K, N]: one [K, N] weight per group.  group_sizes [G] int32, summing to at most M.
  y [M, N]: y[r] = x[r] @ w[g(r)].

Pallas kernel (`grouped_matmul_pallas`), megablox's idea in the generic (Triton / interpret) form: grid (row tiles
of bm rows, column blocks of bn); a program finds the groups its tile's rows fall in (from the group ends, with
no host round trip) and, for each of them only, walks K in blocks of bk, loading that group's [bk, bn] weight tile
and adding its rows' products (rows of other groups masked to 0) to a float32 accumulator. A group no row chose is
never visited, so its weights are never read (a decode step at batch 1 reads only the chosen experts'), and a
group spanning tiles is read once per tile. Row tiles past M and the K tail are zero-padded on the host (x is
small); the weight is never copied: its tiles past K are masked on load and the output's columns past N on store.
`interpret=None` runs Pallas interpret mode on CPU and compiles elsewhere; held to the reference in interpret mode
(tests/kernels/test_grouped_matmul.py), not yet compiled by Triton here (no device was lent). On TPU, or with
`interpret=pltpu.InterpretParams(...)` anywhere, impl="pallas" runs the Pallas TPU (Mosaic) kernel instead
(`qwenjax.kernels.grouped_matmul_tpu`: the same visits as a scalar-prefetched grid), held to the reference in TPU
interpret mode (tests/kernels/test_grouped_matmul_tpu.py) and not yet compiled by Mosaic either.

Einsum legend: M rows (token-expert pairs), K contracted dim, N output dim, G groups (experts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from qwenjax._errors import ConfigError
from qwenjax.kernels.grouped_matmul_operands import check_operands
from qwenjax.kernels.grouped_matmul_tpu import grouped_matmul_tpu
from qwenjax.kernels.int8_operands import dot_precision

__all__ = ["IMPLS", "grouped_matmul", "grouped_matmul_pallas", "grouped_matmul_reference"]

IMPLS = ("xla", "pallas")
_MIN_BLOCK = 16  # Triton's tl.dot needs every dim >= 16


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, out_dtype=None) -> jax.Array:
  """jax.lax.ragged_dot with float32 accumulation (HIGHEST precision for float32 operands)."""
  check_operands(x, w, group_sizes)
  y = lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), precision=dot_precision(x.dtype),
                     preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x.dtype)


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _kernel(ends_ref, x_ref, w_ref, o_ref, *, k_size: int, n_size: int, block_k: int, num_groups: int, precision):
  """One (row tile, column block). ends_ref [G] int32: each group's end row; x_ref [bm, Kp] (zero-padded);
  w_ref [G, K, bn], tiles past K masked to 0 on load; o_ref [bm, bn]."""
  bm, kp = x_ref.shape
  bn = o_ref.shape[1]
  first_row = pl.program_id(0) * bm
  rows = first_row + jnp.arange(bm, dtype=jnp.int32)  # [bm]
  cols = pl.program_id(1) * bn + jnp.arange(bn, dtype=jnp.int32)  # [bn]
  col_ok = cols < n_size
  ends = ends_ref[...]  # [G]
  # The groups this tile's rows fall in: from the first whose end passes the tile's first row to the first whose
  # end passes its last row (rows past every end are in no group).
  first = jnp.sum((ends <= first_row).astype(jnp.int32))
  last = jnp.minimum(jnp.sum((ends <= first_row + bm - 1).astype(jnp.int32)), num_groups - 1)

  def group(g, acc):
    start, end = jnp.where(g > 0, ends_ref[jnp.maximum(g - 1, 0)], 0), ends_ref[g]
    mine = (rows >= start) & (rows < end)  # [bm]

    def step(kb, acc):
      ks = pl.ds(kb * block_k, block_k)
      k_ok = kb * block_k + jnp.arange(block_k, dtype=jnp.int32) < k_size  # [bk]
      x = jnp.where(mine[:, None], x_ref[:, ks], 0)  # [bm, bk]
      w = plgpu.load(w_ref.at[g, ks, :], mask=k_ok[:, None] & col_ok[None, :], other=0)  # [bk, bn]
      return acc + lax.dot_general(x, w.astype(x.dtype), (((1,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    # An empty group between two chosen ones is skipped whole: its weights are not even loaded.
    return lax.cond(start < end, lambda acc: lax.fori_loop(0, kp // block_k, step, acc), lambda acc: acc, acc)

  acc = lax.fori_loop(first, last + 1, group, jnp.zeros((bm, bn), jnp.float32))
  plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "block_k", "interpret"))
def grouped_matmul_pallas(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, out_dtype=None,
                          block_m: int | None = None, block_n: int = 64, block_k: int = 128,
                          interpret: bool | None = None) -> jax.Array:
  """x [M, K] by w [G, K, N] per group of rows as one generic Pallas kernel (see the module docstring).
  block_m: rows per tile (default: M's next power of two, 16 to 64); block_n, block_k: powers of two >= 16."""
  m, k, n, g = check_operands(x, w, group_sizes)
  block_m = block_m or min(64, max(_MIN_BLOCK, _next_power_of_two(m)))
  for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    if size < _MIN_BLOCK or size & (size - 1):
      raise ConfigError(f"grouped_matmul_pallas {name}={size} is not a power of two >= {_MIN_BLOCK}.")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  mp, kp, nb = -(-m // block_m) * block_m, -(-k // block_k) * block_k, -(-n // block_n)
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))  # [G]
  xp = jnp.pad(x, ((0, mp - m), (0, kp - k)))  # [Mp, Kp]
  kernel = functools.partial(_kernel, k_size=k, n_size=n, block_k=block_k, num_groups=g,
                             precision=dot_precision(x.dtype))
  triton = not interpret and jax.default_backend() == "gpu"
  out = pl.pallas_call(
      kernel,
      grid=(mp // block_m, nb),
      in_specs=[pl.BlockSpec((g,), lambda i, j: (0,)), pl.BlockSpec((block_m, kp), lambda i, j: (i, 0)),
                pl.BlockSpec((g, k, block_n), lambda i, j: (0, 0, j))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype or x.dtype),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3) if triton else None,
      name="grouped_matmul",
  )(ends, xp, w)  # [Mp, N]
  return out[:m]


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, impl: str = "xla",
                   interpret: bool | pltpu.InterpretParams | None = None, out_dtype=None) -> jax.Array:
  """y [M, N] = x [M, K] (rows sorted by group) by w [G, K, N], group by group: impl "xla" (jax.lax.ragged_dot)
  or "pallas": `grouped_matmul_tpu` on TPU or when interpret is a `pltpu.InterpretParams` (TPU interpret mode),
  else `grouped_matmul_pallas` (interpret as there)."""
  if impl not in IMPLS:
    raise ConfigError(f"grouped_matmul impl {impl!r} is not one of {', '.join(IMPLS)}.")
  if impl == "xla":
    return grouped_matmul_reference(x, w, group_sizes, out_dtype=out_dtype)
  if jax.default_backend() == "tpu" or isinstance(interpret, pltpu.InterpretParams):
    return grouped_matmul_tpu(x, w, group_sizes, out_dtype=out_dtype, interpret=interpret)
  return grouped_matmul_pallas(x, w, group_sizes, out_dtype=out_dtype, interpret=interpret)
