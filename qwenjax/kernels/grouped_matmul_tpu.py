"""Grouped matmul as a Pallas TPU (Mosaic) kernel, megablox's design: `grouped_matmul_reference`'s result (rows
sorted by group, each group times its own weight, rows past the last group 0) with float32 accumulation. Only ever
run in Pallas TPU interpret mode on CPU with jax 0.10.2 (no TPU here): it has never been lowered by Mosaic, and the
tiling below is what the design aims at, not what a compiler has accepted. Interpret mode is
`pltpu.InterpretParams()`, which fills uninitialised VMEM and the padding of edge blocks with NaN and raises on an
output block revisited after another one, so the tests see what a careless kernel would.

Grid (N / bn, V, K / bk): ("parallel", "arbitrary", "arbitrary"). V "visits", each one (group, row tile) pair, in
row order: a row tile spanning several groups is visited once per group, consecutively, and a group with no rows
is never visited, so its weight tiles are never copied (a decode step reads only the chosen experts'). Row tiles
past the last group's end get one visit that adds nothing and writes zeros. At most T + G - 1 visits for T row
tiles (each group boundary inside a tile adds one), so V = T + G - 1 statically; the list is padded with repeats
of its last entry, visits past `num_active` that add nothing.

Metadata, computed in the wrapper with jnp (no host round trip) and scalar-prefetched into SMEM:
  offsets [G + 1]: each group's first row (the last entry, the end of the last group; clamped to M);
  groups [V], tiles [V]: each visit's group and row tile; num_active [1]: the visits that multiply (a prefix).
Index maps: x's tile [bm, bk] at (tiles[v], s); w's [bk, bn] at (groups[v], s, j) (the group dim squeezed); the
output's [bm, bn] at (tiles[v], j). A visit that adds nothing points x and w at the last active visit's last K
block, so the pipeline copies nothing new for it (with no row in any group, its first step still copies one
weight tile per column block, multiplied by nothing). The accumulator, a VMEM float32 scratch [bm, bn], is zeroed on
the first K step of a tile's first visit and written to the output on the last K step of its last visit: a tile's
visits are consecutive grid steps on one output block, which Pallas keeps resident and writes back once.
Masks: x's rows outside the visited group's [start, end) are zeroed before the dot; the weight's rows past K in
the last K block (NaN in interpret mode, whatever lies there on a TPU) are zeroed when K % bk != 0 (a select on
every K step, all-true but on the last); the output's columns past N are dropped on write. x (M x K, small) is the
only operand padded, to whole tiles; w is never padded or copied in HBM.

Block sizes (`tpu_block_sizes`): bm: M rounded up to x's sublane tile (8 rows float32, 16 bfloat16), at most 128
(a group boundary wastes up to a tile of rows); bk, bn: `lane_block` with target 512 (the dim itself up to 512,
else a multiple of 128: Qwen MoE's 768 -> 384; 1536, 2048, 3584 and 4096 -> 512; 1408 = 11 x 128 -> 512 with a
384-wide edge block).
VMEM at bm = 128, bk = bn = 512, float32: 2 x 256 KiB x tiles + 2 x 1 MiB weight tiles + 2 x 256 KiB output
tiles + a 256 KiB accumulator ~ 3.3 MiB; the limit is 32 MiB, and blocks whose estimate exceeds it are refused.

Einsum legend: M rows (token-expert pairs), K contracted dim, N output dim, G groups (experts), V visits, T row
tiles; bm, bk, bn the blocks of M, K, N.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwenjax._errors import ConfigError
from qwenjax.kernels.grouped_matmul_operands import check_operands
from qwenjax.kernels.int8_matmul_tpu import lane_block, sublanes
from qwenjax.kernels.int8_operands import dot_precision

__all__ = ["grouped_matmul_tpu", "tpu_block_sizes", "visits"]

_LANES = 128
_TARGET_BLOCK = 512  # bk and bn at most, by default (a 1 MiB float32 weight tile)
_MAX_BLOCK_M = 128
_VMEM_LIMIT_BYTES = 32 << 20


def tpu_block_sizes(m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
  """(bm, bk, bn) for x [m, k] of `dtype` by [G, k, n] weights (see the module docstring)."""
  sub = sublanes(dtype)
  return min(_MAX_BLOCK_M, -(-m // sub) * sub), lane_block(k, _TARGET_BLOCK), lane_block(n, _TARGET_BLOCK)


def _vmem_bytes(bm: int, bk: int, bn: int, x_dtype, w_dtype, out_dtype) -> int:
  """VMEM of one program: double-buffered x, w and output tiles, the float32 accumulator, a converted w tile."""
  item = lambda dtype: jnp.dtype(dtype).itemsize
  converted = bk * bn * item(x_dtype) if jnp.dtype(w_dtype) != jnp.dtype(x_dtype) else 0
  return 2 * (bm * bk * item(x_dtype) + bk * bn * item(w_dtype) + bm * bn * item(out_dtype)) + bm * bn * 4 + converted


def visits(group_sizes: jax.Array, m: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The grid's metadata for rows [0, m) in tiles of block_m: (offsets [G + 1], groups [V], tiles [V],
  num_active [1]), V = T + G - 1 (see the module docstring). Traceable: no host round trip."""
  g = group_sizes.shape[0]
  num_tiles = -(-m // block_m)
  num_visits = num_tiles + g - 1
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)  # [G]; sizes past M are cut off
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])  # [G + 1]
  starts = offsets[:-1]  # [G]
  first_tile = starts // block_m  # [G]
  counts = jnp.where(ends > starts, (ends - 1) // block_m - first_tile + 1, 0)  # [G] tiles each group spans
  visit_ends = jnp.cumsum(counts)  # [G]
  num_active = visit_ends[-1]
  v = jnp.arange(num_visits, dtype=jnp.int32)  # [V]
  # The group of visit v: how many groups' visits end at or before it (a comparison, not jnp.searchsorted, which
  # fails to trace inside a shard_map over the expert axis in jax 0.10.2, where the MoE layer runs this).
  group = jnp.minimum(jnp.sum(visit_ends[None, :] <= v[:, None], axis=1, dtype=jnp.int32), g - 1)  # [V]
  group_tile = first_tile[group] + v - (visit_ends[group] - counts[group])  # [V] while v < num_active
  # Then the tiles past the last group's end, one visit each, then repeats of the last tile.
  tail_tile = jnp.minimum(-(-ends[-1] // block_m) + v - num_active, num_tiles - 1)  # [V]
  active = v < num_active
  tiles = jnp.where(active, group_tile, tail_tile)
  return offsets, group, tiles.astype(jnp.int32), num_active[None]


# The index maps of grid step (j, v, s), given the metadata refs (SMEM; numpy arrays work too, for the tests).

def _source(v, s, active_ref, last_k):
  """(visit, K block) whose x and w tiles grid step (v, s) reads: its own while the visit is active; else the last
  active visit's last K block, already in VMEM, so an inactive visit copies nothing."""
  active = v < active_ref[0]
  return jnp.where(active, v, jnp.maximum(active_ref[0] - 1, 0)), jnp.where(active, s, last_k)


def _x_block(j, v, s, offsets_ref, groups_ref, tiles_ref, active_ref, *, last_k: int):
  """x's block [bm, bk]: (row tile, K block)."""
  src, ks = _source(v, s, active_ref, last_k)
  return tiles_ref[src], ks


def _w_block(j, v, s, offsets_ref, groups_ref, tiles_ref, active_ref, *, last_k: int):
  """w's block [(1), bk, bn]: (group, K block, column block)."""
  src, ks = _source(v, s, active_ref, last_k)
  return groups_ref[src], ks, j


def _out_block(j, v, s, offsets_ref, groups_ref, tiles_ref, active_ref):
  """The output's block [bm, bn]: (row tile, column block), the same over all of a tile's visits."""
  return tiles_ref[v], j


def _kernel(offsets_ref, groups_ref, tiles_ref, active_ref, x_ref, w_ref, o_ref, acc_ref, *, k_size: int,
            precision):
  """One (column block j, visit v, K block s). offsets_ref [G + 1], groups_ref [V], tiles_ref [V], active_ref [1]
  in SMEM; x_ref [bm, bk]; w_ref [bk, bn] (the visit's group); o_ref [bm, bn]; acc_ref [bm, bn] float32."""
  bm, bk = x_ref.shape
  v, s = pl.program_id(1), pl.program_id(2)
  last_v, last_s = pl.num_programs(1) - 1, pl.num_programs(2) - 1
  tile = tiles_ref[v]
  first_visit = (v == 0) | (tiles_ref[jnp.maximum(v - 1, 0)] != tile)
  last_visit = (v == last_v) | (tiles_ref[jnp.minimum(v + 1, last_v)] != tile)

  @pl.when(first_visit & (s == 0))
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  @pl.when(v < active_ref[0])
  def _():
    group = groups_ref[v]
    rows = tile * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)  # [bm, 1]
    mine = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
    x = jnp.where(mine, x_ref[...], 0)  # [bm, bk]: other groups' rows add nothing
    w = w_ref[...].astype(x.dtype)  # [bk, bn]
    if k_size % bk:  # the last K block's rows past K hold garbage (NaN in interpret mode); x's are 0, 0 * NaN is not
      k_rows = s * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)  # [bk, 1]
      w = jnp.where(k_rows < k_size, w, 0)
    acc_ref[...] += lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32)

  @pl.when(last_visit & (s == last_s))
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_k", "block_n", "interpret"))
def grouped_matmul_tpu(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, out_dtype=None,
                       block_m: int | None = None, block_k: int | None = None, block_n: int | None = None,
                       interpret: bool | pltpu.InterpretParams | None = None) -> jax.Array:
  """y [M, N] = x [M, K] (rows sorted by group) by w [G, K, N] per group of rows, as one Pallas TPU kernel.

  group_sizes [G] integers summing to at most M (rows past their sum come out 0). block_m, block_k, block_n:
  default `tpu_block_sizes`; block_m a multiple of x's sublane tile, block_k and block_n multiples of 128 or the
  full dim. interpret: None runs Pallas TPU interpret mode (`pltpu.InterpretParams()`) everywhere but on TPU,
  where it compiles with Mosaic; True forces it, False compiles; an `InterpretParams` is passed through. Returns
  [M, N] in out_dtype (default x's dtype).
  """
  m, k, n, g = check_operands(x, w, group_sizes)
  out_dtype = out_dtype or x.dtype
  default_m, default_k, default_n = tpu_block_sizes(m, k, n, x.dtype)
  bm, bk, bn = block_m or default_m, block_k or default_k, block_n or default_n
  sub = sublanes(x.dtype)
  if bm < 1 or bm % sub:
    raise ConfigError(f"grouped_matmul_tpu block_m={bm} must be a positive multiple of {sub} (x is {x.dtype}).")
  for name, size, dim in (("block_k", bk, k), ("block_n", bn, n)):
    if size < 1 or (size % _LANES and size != dim):
      raise ConfigError(f"grouped_matmul_tpu {name}={size} must be a multiple of {_LANES} or the full dim {dim} "
                        f"(x {x.shape}, w {w.shape}).")
  vmem = _vmem_bytes(bm, bk, bn, x.dtype, w.dtype, out_dtype)
  if vmem > _VMEM_LIMIT_BYTES:
    raise ConfigError(f"grouped_matmul_tpu blocks (bm, bk, bn) = {(bm, bk, bn)} need ~{vmem >> 20} MiB of VMEM; "
                      f"more than the {_VMEM_LIMIT_BYTES >> 20} MiB limit.")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  num_tiles, nk, nn = -(-m // bm), -(-k // bk), -(-n // bn)

  offsets, groups, tiles, num_active = visits(group_sizes, m, bm)  # [G + 1], [V], [V], [1]
  xp = jnp.pad(x, ((0, num_tiles * bm - m), (0, nk * bk - k)))  # [Tbm, Kp]: zeros past M and K

  out = pl.pallas_call(
      functools.partial(_kernel, k_size=k, precision=dot_precision(x.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(nn, groups.shape[0], nk),
          in_specs=[pl.BlockSpec((bm, bk), functools.partial(_x_block, last_k=nk - 1)),
                    pl.BlockSpec((pl.Squeezed(), bk, bn), functools.partial(_w_block, last_k=nk - 1))],
          out_specs=pl.BlockSpec((bm, bn), _out_block),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((num_tiles * bm, n), out_dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"),
                                           vmem_limit_bytes=_VMEM_LIMIT_BYTES),
      interpret=pltpu.InterpretParams() if interpret is True else interpret,
      name="grouped_matmul_tpu",
  )(offsets, groups, tiles, num_active, xp, w)  # [Tbm, N]
  return out[:m]
