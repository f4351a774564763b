"""int8 weight matmuls: per-channel symmetric int8 weights times float activations (w8a16), or times activations
quantized per token on the fly (w8a8); a plain-JAX reference, the fastest XLA formulation per backend, a generic
Pallas kernel (interpret mode on CPU, Triton on GPU), and the dispatch between them.

Quantization (both symmetric, values in [-127, 127], a zero channel or row gets scale 0 and values 0, never NaN):
  weights      values[k, n] = round(w[k, n] / scale[n]),  scale[n] = max_k |w[k, n]| / 127  (`quantize_per_channel`)
  activations  xq[m, k] = round(x[m, k] / xs[m]),          xs[m] = max_k |x[m, k]| / 127    (`quantize_activations`)
The formulas (`int8_matmul_reference`), accumulating in float32 (w8a16) or exactly in int32 (w8a8):
  w8a16  y[m, n] = (sum_k x[m, k] * values[k, n]) * scale[n]
  w8a8   y[m, n] = (sum_k xq[m, k] * values[k, n]) * xs[m] * scale[n]
int32 cannot overflow for K < 2^31 / 127^2 = 133,000 (Qwen2.5's largest K is 29568). values may also be stored
[N, K] (`transpose_rhs=True`): the tied embedding table [V, D] read as the output head, with one scale per row.

XLA formulations (`XLA_FORMULATIONS`; `int8_matmul(impl="xla")` runs one per backend and mode, `xla_formulation`).
On GPU and TPU: the reference's own formula (XLA:GPU fuses the s8 -> convert into its Triton GEMM; on TPU
jax-llm-examples runs Llama-70B this way at 85% of HBM bandwidth). On XLA:CPU, chosen by the timings of
`python -m launch.bench.int8_matmul` (Qwen2.5-0.5B's shapes at M = 1, 8, 32, 128; the table and the candidates
that lost are in that file's docstring), the same formulation won at every M:
  w8a8 "int32_dot_2_rows": XLA:CPU hands int8 dots with M >= 2 to its YNNPACK fusion, which multiplies int8 by
    int8 into int32 natively: 1.1-2.8x the float32 matmul on most shapes, but 0.3-0.5x on the MLP's down
    projection [4864, 896] (long K, narrow N) in every run. An M = 1 dot becomes a matrix-vector product that
    first converts the whole int8 matrix to int32 (4x the weight's bytes written, then read: ~15x slower than
    float32), so M = 1 is padded to 2 rows.
  w8a16 "column_blocks": XLA:CPU fuses no convert into a dot, so a float x int8 dot writes the converted float32
    weight out and reads it back; worse, in a program of many such dots (a decode step) the converts depend only
    on the weights and are scheduled first, all weights held in float32 at once: 2-15x slower than float32
    weights (all but the small KV projection). Converting ~1 MiB blocks of output channels inside a loop
    keeps each block in cache and the schedule honest: 0.5-1.7x the float32 matmul's speed (about even at
    decode sizes), at a quarter of its weight memory.

Pallas kernel (`int8_matmul_pallas`; the Mosaic TPU kernel is `int8_matmul_tpu`). Grid (M blocks, N blocks); each
program walks K in blocks with a float32 (float x) or int32 (int8 x) accumulator carried in registers, loading
one [bk, bn] int8 weight tile per step and converting it in registers (float x: to x's dtype; the dequantized
matrix is never written out); the scales multiply the accumulator once, after the last step. The wrapper pads
x (small: M x K) with zero rows to the row block and zero columns to a whole number of K blocks; the weight is
never copied: its tiles past K or N are masked to zero on load and the output's columns past N masked on store.
Triton's rules: every block dim a power of two >= 16 (M = 1 runs in a 16-row block), both dot operands one dtype
(the int8 tile is cast first), no scratch memory (the accumulator is a loop carry). `interpret=None` runs Pallas
interpret mode on CPU and compiles elsewhere (Triton `CompilerParams` on GPU). Tested in interpret mode with jax
0.10.2 only: it has not yet been compiled by Triton.

Einsum legend:
  M rows (tokens)    K contracted (input) dim    N output channels
  bm, bk, bn the kernel's blocks of M, K and N    B blocks of output channels ("column_blocks")
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from qwenjax._errors import ConfigError
from qwenjax.kernels import cpu_paths
from qwenjax.kernels.int8_matmul_tpu import int8_matmul_tpu
from qwenjax.kernels.int8_operands import MODES, check_operands, dot_dims, dot_precision, kernel_operands, rhs_dims

__all__ = ["MODES", "int8_dot_int32", "int8_matmul", "int8_matmul_reference", "quantize_activations",
           "quantize_per_channel"]

IMPLS = ("xla", "pallas")
INT8_MAX = 127  # symmetric int8: values in [-127, 127], scale = amax / 127
# Divisions are written as multiplications by a reciprocal: scale = amax * float32(1 / 127), values = round(w * (1 /
# scale)). That is what XLA makes of a division by a constant or a broadcast anyway (one rounding off the true
# quotient); written out, every backend and numpy round alike.
_INV_INT8_MAX = float(np.float32(1 / INT8_MAX))
_BLOCK_BYTES = 1 << 20  # a dequantized float32 weight block of "column_blocks" (XLA:CPU's L2 is 1 MiB a core)
_LANES = 128
_MIN_BLOCK = 16  # Triton's tl.dot needs every dim >= 16


# --- Quantization ---

def quantize_per_channel(w: jax.Array, axis: int | tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 per output channel: float w -> (int8 values of w's shape, float32 scale with `axis` removed).

  axis: the contracted (input) dims, e.g. 0 for a [K, N] kernel, (0, 1) for o_proj [N, H, D], 1 for the
  embedding table [V, D] read as the head. scale = max |w| over `axis` / 127 and values = round(w / scale), both
  divisions as multiplications by the reciprocal (see _INV_INT8_MAX); a zero channel gets scale 0 and values 0
  (never NaN). |w - values * scale| <= scale / 2 per element, up to float32 rounding.
  """
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if not axes or any(not isinstance(a, int) or not -w.ndim <= a < w.ndim for a in axes):
    raise ConfigError(f"quantize_per_channel axis={axis!r} must name dims of the weight, shape {w.shape}.")
  axes = tuple(sorted({a % w.ndim for a in axes}))
  w = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) * _INV_INT8_MAX
  inverse = 1.0 / jnp.where(scale == 0, 1.0, scale)
  values = jnp.clip(jnp.round(w * inverse), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return values, jnp.squeeze(scale, axes)


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 per row (token): x [..., K] float -> (int8 [..., K], float32 scale [...]), scale = max |x| over
  K / 127 (divisions as in `quantize_per_channel`); a zero row gets scale 0 and values 0 (never NaN)."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) * _INV_INT8_MAX  # [...]
  inverse = 1.0 / jnp.where(scale == 0, 1.0, scale)
  values = jnp.clip(jnp.round(x * inverse[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return values, scale


# --- Checks ---

def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ConfigError(f"int8 matmul impl={impl!r} is not one of {IMPLS}.")


def _convert_dot(x: jax.Array, values: jax.Array, transpose_rhs: bool) -> jax.Array:
  """x [M, K] float . values converted to x's dtype -> float32 [M, N] (float32 accumulation)."""
  return lax.dot_general(x, values.astype(x.dtype), dot_dims(transpose_rhs), precision=dot_precision(x.dtype),
                         preferred_element_type=jnp.float32)


# --- Reference ---

def int8_matmul_reference(x: jax.Array, values: jax.Array, scale: jax.Array, *, mode: str,
                          transpose_rhs: bool = False, out_dtype=None) -> jax.Array:
  """The formulas, in plain JAX. x [M, K] (or [..., K]) float; values int8 [K, N] ([N, K] with transpose_rhs, the
  lm_head / embedding layout); scale float32 [N].

  w8a16: (x @ values.astype(x.dtype)) * scale, the dot accumulated in float32.
  w8a8: quantize_activations(x), int8 x int8 accumulated exactly in int32, then * x_scale[:, None] * scale[None, :].
  Returns [M, N] (or [..., N]) in out_dtype (default x's dtype).
  """
  check_operands(x, values, scale, mode=mode, transpose_rhs=transpose_rhs)
  out_dtype = x.dtype if out_dtype is None else out_dtype
  lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
  if mode == "w8a16":
    y = _convert_dot(x2, values, transpose_rhs) * scale.astype(jnp.float32)[None, :]  # [M, N]
  else:
    xq, xs = quantize_activations(x2)
    acc = lax.dot_general(xq, values, dot_dims(transpose_rhs), preferred_element_type=jnp.int32)  # [M, N] exact
    y = acc.astype(jnp.float32) * xs[:, None] * scale.astype(jnp.float32)[None, :]
  return y.astype(out_dtype).reshape(*lead, -1)


# --- XLA formulations ---

def _int32_dot(xq: jax.Array, values: jax.Array, transpose_rhs: bool, min_rows: int = 1) -> jax.Array:
  """xq int8 [M, K] . values -> int32 [M, N], exactly; M padded with zero rows to min_rows first (XLA:CPU turns an
  M = 1 dot into a matrix-vector product that converts the whole weight to int32; at M = 2 its int8 GEMM runs)."""
  m = xq.shape[0]
  if m < min_rows:
    xq = jnp.pad(xq, ((0, min_rows - m), (0, 0)))
  return lax.dot_general(xq, values, dot_dims(transpose_rhs), preferred_element_type=jnp.int32)[:m]


def _w8a16_convert(x, values, scale, transpose_rhs):
  """The reference's formula: convert the weight to x's dtype, dot, scale."""
  return _convert_dot(x, values, transpose_rhs) * scale[None, :]


def column_block(k: int, n: int) -> int:
  """Output channels per block of "column_blocks": a float32 [K, bn] block of about _BLOCK_BYTES, a multiple of
  128 and at least 128 (896 -> 256, 4864 -> 128), at most N."""
  return min(n, max(_LANES, _BLOCK_BYTES // (4 * k) // _LANES * _LANES))


def _w8a16_column_blocks(x, values, scale, transpose_rhs):
  """Output channels in blocks of `column_block` in a loop, each block of the weight converted to float32 (~1 MiB,
  in cache) and dotted over the whole of K; the last N % bn channels in one more dot. The loop keeps XLA from
  converting every weight of a program up front (it schedules a plain convert as early as it can, so a decode step
  holds all its weights in float32 at once).

  The loop's output buffer starts from a value of x (zero times x[0, 0]; every block overwrites it): a constant one
  (lax.map's zeros) XLA creates as early as it can too, so every layer's [B, M, bn] buffers were live at once. A
  512-token prefill of the 0.5B model held 617 MiB of temporaries that way (26 MiB more per layer), against 42 MiB
  for w8a8."""
  x = x.astype(jnp.float32)
  k, n = rhs_dims(values, transpose_rhs)
  bn = column_block(k, n)
  full, axis = n // bn, 0 if transpose_rhs else 1

  def block(i, out):  # out [B, M, bn], block i written
    y = _convert_dot(x, lax.dynamic_slice_in_dim(values, i * bn, bn, axis), transpose_rhs)
    return lax.dynamic_update_index_in_dim(out, y, i, 0)

  start = jnp.broadcast_to(jnp.zeros((), jnp.float32) * x[0, 0], (full, x.shape[0], bn))
  out = lax.fori_loop(0, full, block, start)  # [B, M, bn]
  out = out.transpose(1, 0, 2).reshape(x.shape[0], full * bn)
  if n % bn:
    rest = lax.slice_in_dim(values, full * bn, n, axis=axis)
    out = jnp.concatenate([out, _convert_dot(x, rest, transpose_rhs)], axis=1)
  return out * scale[None, :]


def _w8a8_int32_dot(x, values, scale, transpose_rhs, min_rows=1):
  """quantize_activations, the exact int8 dot (M padded to min_rows), both scales."""
  xq, xs = quantize_activations(x)
  acc = _int32_dot(xq, values, transpose_rhs, min_rows=min_rows)
  return acc.astype(jnp.float32) * xs[:, None] * scale[None, :]


# (x [M, K] float, values, scale float32 [N], transpose_rhs) -> float32 [M, N]; each within the reference's
# tolerance (tested). launch/bench/int8_matmul.py times these and the candidates that lost.
XLA_FORMULATIONS: dict[str, dict[str, Callable]] = {
    "w8a16": {"convert": _w8a16_convert, "column_blocks": _w8a16_column_blocks},
    "w8a8": {"int32_dot": _w8a8_int32_dot, "int32_dot_2_rows": functools.partial(_w8a8_int32_dot, min_rows=2)},
}


def xla_formulation(mode: str, backend: str | None = None, *, m: int = 2, k: int = 0, n: int = 0) -> str:
  """The XLA formulation `int8_matmul(impl="xla")` runs for `mode` on `backend` (default: JAX's) at M rows by a
  [K, N] weight: on CPU the active `qwenjax.kernels.cpu_paths` record's choice (without one, the choice this
  module's docstring measured), elsewhere the reference's formula."""
  return cpu_paths.formulation(mode, m, k, n, backend)


# --- Generic Pallas kernel ---

def _next_power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _pallas_kernel(*refs, k_size: int, n_size: int, block_k: int, transpose_rhs: bool, x_scaled: bool,
                   w_scaled: bool, precision):
  """One (row block, column block). x_ref [bm, Kp] (zero-padded); w_ref [K, bn] ([bn, K] transposed), tiles past
  K or N masked to 0; xs_ref [bm] when x_scaled (w8a8), ws_ref [bn] when w_scaled; o_ref [bm, bn]."""
  x_ref, w_ref, *refs = refs
  xs_ref = refs.pop(0) if x_scaled else None
  ws_ref = refs.pop(0) if w_scaled else None
  (o_ref,) = refs
  bm, kp = x_ref.shape
  bn = o_ref.shape[1]
  integer = x_ref.dtype == jnp.int8
  cols = pl.program_id(1) * bn + jnp.arange(bn, dtype=jnp.int32)  # [bn]
  col_ok = cols < n_size

  def step(kb, acc):
    ks = pl.ds(kb * block_k, block_k)
    row_ok = kb * block_k + jnp.arange(block_k, dtype=jnp.int32) < k_size  # [bk]
    x = x_ref[:, ks]  # [bm, bk]
    if transpose_rhs:
      w = plgpu.load(w_ref.at[:, ks], mask=col_ok[:, None] & row_ok[None, :], other=0)  # [bn, bk] int8
    else:
      w = plgpu.load(w_ref.at[ks, :], mask=row_ok[:, None] & col_ok[None, :], other=0)  # [bk, bn] int8
    if not integer:
      w = w.astype(x.dtype)  # dequantized in registers, one tile at a time
    return acc + lax.dot_general(x, w, dot_dims(transpose_rhs), precision=precision,
                                 preferred_element_type=acc.dtype)

  acc = lax.fori_loop(0, kp // block_k, step, jnp.zeros((bm, bn), jnp.int32 if integer else jnp.float32))
  out = acc
  if x_scaled:
    out = out.astype(jnp.float32) * xs_ref[...][:, None]
  if w_scaled:
    out = out.astype(jnp.float32) * ws_ref[...][None, :]
  plgpu.store(o_ref, out.astype(o_ref.dtype), mask=col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "block_m", "block_n", "block_k",
                                             "interpret"))
def int8_matmul_pallas(x: jax.Array, values: jax.Array, scale: jax.Array | None = None,
                       x_scale: jax.Array | None = None, *, transpose_rhs: bool = False, out_dtype=None,
                       block_m: int | None = None, block_n: int = 64, block_k: int = 128,
                       interpret: bool | None = None) -> jax.Array:
  """x [M, K] by int8 values [K, N] ([N, K] with transpose_rhs) as one generic Pallas kernel.

  x float (w8a16; scale [N] required, x_scale None) or int8 (w8a8: scale [N] and x_scale [M]; both None: the bare
  int32 dot, returned exactly). block_m: rows per block (default: M's next power of two, 16 to 64); block_n,
  block_k: powers of two >= 16. interpret: None runs Pallas interpret mode on CPU and compiles elsewhere. Returns
  [M, N] in out_dtype (default: x's dtype for float x, float32 for scaled int8 x, int32 for the bare dot).
  """
  m, k, n, integer = kernel_operands("int8_matmul_pallas", x, values, scale, x_scale, transpose_rhs)
  block_m = block_m or min(64, max(_MIN_BLOCK, _next_power_of_two(m)))
  for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    if size < _MIN_BLOCK or size & (size - 1):
      raise ConfigError(f"int8_matmul_pallas {name}={size} is not a power of two >= {_MIN_BLOCK}.")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  scaled = scale is not None
  if out_dtype is None:
    out_dtype = (jnp.float32 if scaled else jnp.int32) if integer else x.dtype
  mp, kp, nb = -(-m // block_m) * block_m, -(-k // block_k) * block_k, -(-n // block_n)

  xp = jnp.pad(x, ((0, mp - m), (0, kp - k)))  # [Mp, Kp]: zero rows and columns contribute nothing
  w_spec = (pl.BlockSpec((block_n, k), lambda i, j: (j, 0)) if transpose_rhs
            else pl.BlockSpec((k, block_n), lambda i, j: (0, j)))
  in_specs, args = [pl.BlockSpec((block_m, kp), lambda i, j: (i, 0)), w_spec], [xp, values]
  if integer and scaled:
    in_specs.append(pl.BlockSpec((block_m,), lambda i, j: (i,)))
    args.append(jnp.pad(x_scale.astype(jnp.float32), (0, mp - m)))
  if scaled:
    in_specs.append(pl.BlockSpec((block_n,), lambda i, j: (j,)))
    args.append(jnp.pad(scale.astype(jnp.float32), (0, nb * block_n - n)))
  kernel = functools.partial(_pallas_kernel, k_size=k, n_size=n, block_k=block_k, transpose_rhs=transpose_rhs,
                             x_scaled=x_scale is not None, w_scaled=scaled,
                             precision=None if integer else dot_precision(x.dtype))
  triton = not interpret and jax.default_backend() == "gpu"
  out = pl.pallas_call(
      kernel,
      grid=(mp // block_m, nb),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3) if triton else None,
      name="int8_matmul",
  )(*args)  # [Mp, N]
  return out[:m]


# --- Public entry points ---

def _pallas_kernel_for(interpret):
  """The Pallas kernel impl="pallas" runs: the Mosaic one on TPU, or anywhere when asked for with an
  `InterpretParams` (TPU interpret mode); the generic one elsewhere."""
  if jax.default_backend() == "tpu" or isinstance(interpret, pltpu.InterpretParams):
    return int8_matmul_tpu
  return int8_matmul_pallas


def int8_dot_int32(xq: jax.Array, values: jax.Array, *, transpose_rhs: bool = False, impl: str = "xla",
                   interpret: bool | pltpu.InterpretParams | None = None) -> jax.Array:
  """int8 [M, K] x int8 [K, N] ([N, K] with transpose_rhs) -> int32 [M, N], exactly: the w8a8 core. impl "xla":
  one int8 dot_general (M = 1 padded to 2 rows on CPU); "pallas": as `int8_matmul`'s (interpret likewise)."""
  _check_impl(impl)
  check_operands(xq, values, None, mode=None, transpose_rhs=transpose_rhs)
  if xq.ndim != 2:
    raise ConfigError(f"int8_dot_int32 xq has shape {xq.shape}; expected [M, K].")
  if impl == "xla":
    return _int32_dot(xq, values, transpose_rhs, min_rows=2 if jax.default_backend() == "cpu" else 1)
  return _pallas_kernel_for(interpret)(xq, values, transpose_rhs=transpose_rhs, interpret=interpret)


def int8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, *, mode: str, impl: str = "xla",
                transpose_rhs: bool = False, out_dtype=None,
                interpret: bool | pltpu.InterpretParams | None = None) -> jax.Array:
  """`int8_matmul_reference` (same arguments, same result up to float32 rounding), fast.

  x [M, K] (or [..., K]) float; values int8 [K, N] ([N, K] with transpose_rhs); scale float32 [N].
  impl "xla": the fastest XLA formulation for this backend, mode and shape (`xla_formulation`); "pallas": the Mosaic
  kernel (`int8_matmul_tpu`) on TPU, the generic Pallas kernel elsewhere (interpret mode on CPU, Triton on GPU);
  w8a8 quantizes x per row in plain JAX first, as tpu-inference does. interpret (impl="pallas" only): None, the
  kernels' default (interpret mode where they cannot compile), a bool, or a `pltpu.InterpretParams` to run the
  TPU kernel in TPU interpret mode anywhere. Returns [M, N] (or [..., N]) in out_dtype (default x's dtype).
  """
  _check_impl(impl)
  check_operands(x, values, scale, mode=mode, transpose_rhs=transpose_rhs)
  out_dtype = x.dtype if out_dtype is None else out_dtype
  lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
  scale = scale.astype(jnp.float32)
  if impl == "xla":
    k, n = rhs_dims(values, transpose_rhs)
    y = XLA_FORMULATIONS[mode][xla_formulation(mode, m=x2.shape[0], k=k, n=n)](x2, values, scale, transpose_rhs)
  else:
    lhs, lhs_scale = quantize_activations(x2) if mode == "w8a8" else (x2, None)
    y = _pallas_kernel_for(interpret)(lhs, values, scale, lhs_scale, transpose_rhs=transpose_rhs,
                                      out_dtype=jnp.float32, interpret=interpret)
  return y.astype(out_dtype).reshape(*lead, -1)
