"""int8 weight matmul as a Pallas TPU (Mosaic) kernel: `int8_matmul_reference`'s w8a16 and w8a8 formulas, and the
bare int8 x int8 -> int32 dot. Only ever run in Pallas TPU interpret mode on CPU with jax 0.10.2 (no TPU here):
it has never been lowered by Mosaic, and the tiling below is what the design aims at, not what a compiler has
accepted. Interpret mode is `pltpu.InterpretParams()`, which fills uninitialised VMEM with NaN and returns
uninitialised values for reads past an array's end, so the tests see what a careless kernel would.

Grid (M / bm, N / bn, K / bk), K last: ("parallel", "parallel", "arbitrary"). Each program's x tile [bm, bk] and
weight tile [bk, bn] (transposed: [bn, bk]) are auto-pipelined HBM -> VMEM by BlockSpecs (double-buffered), the
int8 tile is converted in VMEM/vregs (float x: to x's dtype; int8 x: the MXU multiplies int8 by int8 into int32),
and the product added to a VMEM scratch accumulator [bm, bn] (float32 or int32), zeroed on the first K step. On
the last K step the scales multiply the accumulator (x's per row [bm, 1], the weight's per column [1, bn]) and
the output tile is written. Scales are [Mp, 1] and [1, N] arrays so their blocks are legal 2D tiles.

Block sizes (`tpu_block_sizes`), for Qwen2.5's shapes: a decode step is bound by the weight's HBM bandwidth, and
each grid step costs ~0.35 us of overhead, so weight tiles are large (up to bk x bn = 1024 x 1024 int8 = 1 MiB,
double-buffered 2 MiB; with f32 x the converted tile is 4 MiB more) and never copied or padded in HBM:
  bk, bn: the dim itself when <= 1024 (a full dim is always a legal block: 896, the KV heads' 128 ... 1024);
    else the largest multiple of 128 <= 1024 dividing it, if >= 512 (1536 -> 768, 3584 -> 896, 8960 -> 896,
    18944 -> 512, 29568 = 231 * 128 -> 896, 152064 -> 768, 2048, 5120, 8192, 27648 -> 1024); else 1024 with a
    partly out-of-bounds last block (4864 = 38 * 128 and 11008 = 86 * 128 divide only by 256, and 151936 =
    1187 * 128, 1187 prime, only by 128: 5, 11 and 149 blocks, the last 768, 768 and 384 wide; 128-wide blocks
    would cost 1187 grid steps for one head).
  An edge block's columns past N read whatever lies there and its writes past N are dropped; rows past K in the
  weight are finite whatever they hold (int8 has no NaN), and x is zero-padded to whole K blocks, so they add
  exactly 0. x (M x K, small at decode) is the only operand the wrapper pads.
  bm: M rounded up to the sublane tile of x's dtype (8 rows float32, 16 bfloat16, 32 int8), at most 256.
VMEM at the largest blocks, float32 x: 2 x 1 MiB x tiles + 2 x 1 MiB weight tiles + a 4 MiB converted tile + 1
MiB accumulator + 2 x 1 MiB output tiles ~ 11 MiB; the limit is raised to 32 MiB (v5e's scoped default is 16
MiB; v5e and v6e have 128 MiB of VMEM, v7x 64 MiB a core). int8 x int8 needs a chip with an int8 MXU path (v5e,
v6e); elsewhere Mosaic may reject or emulate it (untested).

Einsum legend: M rows (tokens), K contracted dim, N output channels; bm, bk, bn their blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwenjax._errors import ConfigError
from qwenjax.kernels.int8_operands import dot_dims, dot_precision, kernel_operands

_LANES = 128
_TARGET_BLOCK = 1024  # bk and bn at most (a 1 MiB int8 weight tile)
_MAX_BLOCK_M = 256
_VMEM_LIMIT_BYTES = 32 << 20


def sublanes(dtype) -> int:
  """Rows of one (sublane, lane) tile of `dtype`: 8 of 32 bits, 16 of bfloat16, 32 of int8."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def lane_block(dim: int, target: int = _TARGET_BLOCK) -> int:
  """A K or N block for `dim`: the dim itself when <= target; else the largest multiple of 128 <= target that
  divides it, if >= target / 2; else target (the last block partly out of bounds)."""
  if dim <= target:
    return dim
  divisors = [b for b in range(_LANES, target + 1, _LANES) if dim % b == 0]
  return divisors[-1] if divisors and divisors[-1] >= target // 2 else target


def tpu_block_sizes(m: int, k: int, n: int, lhs_dtype) -> tuple[int, int, int]:
  """(bm, bk, bn) for x [m, k] of `lhs_dtype` by a [k, n] int8 weight (see the module docstring)."""
  sub = sublanes(lhs_dtype)
  return min(_MAX_BLOCK_M, -(-m // sub) * sub), lane_block(k), lane_block(n)


def _kernel(lhs_ref, rhs_ref, *refs, transpose_rhs: bool, lhs_scaled: bool, rhs_scaled: bool, precision):
  """One (i, j, k) step. lhs_ref [bm, bk]; rhs_ref [bk, bn] ([bn, bk]) int8; ls_ref [bm, 1] when lhs_scaled,
  rs_ref [1, bn] when rhs_scaled; o_ref [bm, bn]; acc_ref [bm, bn] float32 or int32 scratch."""
  refs = list(refs)
  ls_ref = refs.pop(0) if lhs_scaled else None
  rs_ref = refs.pop(0) if rhs_scaled else None
  o_ref, acc_ref = refs
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  lhs, rhs = lhs_ref[...], rhs_ref[...]
  if lhs.dtype != jnp.int8:
    rhs = rhs.astype(lhs.dtype)  # dequantized one tile at a time, in VMEM
  acc_ref[...] += lax.dot_general(lhs, rhs, dot_dims(transpose_rhs), precision=precision,
                                  preferred_element_type=acc_ref.dtype)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    out = acc_ref[...]
    if lhs_scaled:
      out = out.astype(jnp.float32) * ls_ref[...]  # [bm, 1]
    if rhs_scaled:
      out = out.astype(jnp.float32) * rs_ref[...]  # [1, bn]
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "block_sizes", "interpret"))
def int8_matmul_tpu(x: jax.Array, values: jax.Array, scale: jax.Array | None = None,
                    x_scale: jax.Array | None = None, *, transpose_rhs: bool = False, out_dtype=None,
                    block_sizes: tuple[int, int, int] | None = None,
                    interpret: bool | pltpu.InterpretParams | None = None) -> jax.Array:
  """x [M, K] by int8 values [K, N] ([N, K] with transpose_rhs) as one Pallas TPU kernel.

  x float (w8a16: scale [N], no x_scale) or int8 (w8a8: scale [N] and x_scale [M]; neither: the bare int32 dot,
  exact). block_sizes: (bm, bk, bn), default `tpu_block_sizes`; bm a multiple of x's sublane tile, bk and bn
  multiples of 128 or the full dim. interpret: None runs Pallas TPU interpret mode (`pltpu.InterpretParams()`)
  everywhere but on TPU, where it compiles with Mosaic; True forces it, False compiles; an `InterpretParams` is
  passed through. Returns [M, N] in out_dtype (default x's dtype for float x, float32 for w8a8, int32 bare).
  """
  m, k, n, integer = kernel_operands("int8_matmul_tpu", x, values, scale, x_scale, transpose_rhs)
  bm, bk, bn = block_sizes or tpu_block_sizes(m, k, n, x.dtype)
  sub = sublanes(x.dtype)
  if bm < 1 or bm % sub:
    raise ConfigError(f"int8_matmul_tpu block bm={bm} must be a positive multiple of {sub} (x is {x.dtype}).")
  for name, size, dim in (("bk", bk, f"K={k}"), ("bn", bn, f"N={n}")):
    if size < 1 or (size % _LANES and str(size) != dim[2:]):
      raise ConfigError(f"int8_matmul_tpu block {name}={size} must be a multiple of {_LANES} or the full {dim}.")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  scaled = scale is not None
  if out_dtype is None:
    out_dtype = (jnp.float32 if scaled else jnp.int32) if integer else x.dtype
  mp, nk, nn = -(-m // bm) * bm, -(-k // bk), -(-n // bn)

  xp = jnp.pad(x, ((0, mp - m), (0, nk * bk - k)))  # [Mp, Kp]: the weight's rows past K meet zeros
  w_spec = (pl.BlockSpec((bn, bk), lambda i, j, s: (j, s)) if transpose_rhs
            else pl.BlockSpec((bk, bn), lambda i, j, s: (s, j)))
  in_specs, args = [pl.BlockSpec((bm, bk), lambda i, j, s: (i, s)), w_spec], [xp, values]
  if integer and scaled:
    in_specs.append(pl.BlockSpec((bm, 1), lambda i, j, s: (i, 0)))
    args.append(jnp.pad(x_scale.astype(jnp.float32), (0, mp - m))[:, None])  # [Mp, 1]
  if scaled:
    in_specs.append(pl.BlockSpec((1, bn), lambda i, j, s: (0, j)))
    args.append(scale.astype(jnp.float32)[None, :])  # [1, N]
  kernel = functools.partial(_kernel, transpose_rhs=transpose_rhs, lhs_scaled=integer and scaled,
                             rhs_scaled=scaled, precision=None if integer else dot_precision(x.dtype))
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, nn, nk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, s: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32 if integer else jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=_VMEM_LIMIT_BYTES),
      interpret=pltpu.InterpretParams() if interpret is True else interpret,
      name="int8_matmul_tpu",
  )(*args)  # [Mp, N]
  return out[:m]
