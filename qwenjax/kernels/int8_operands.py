"""The operand checks and dot conventions both int8 matmul kernels share (`qwenjax.kernels.int8_matmul`, the
generic one and the dispatch; `qwenjax.kernels.int8_matmul_tpu`, the Mosaic one): weights [K, N], or [N, K] with
`transpose_rhs` (the vocabulary table's layout), and errors that name the operand that does not fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qwenjax._errors import ConfigError

MODES = ("w8a16", "w8a8")  # weight-only int8, or int8 activations too


def rhs_dims(values: jax.Array, transpose_rhs: bool) -> tuple[int, int]:
  """(K, N) of the int8 weight, [K, N] or (transpose_rhs) [N, K]."""
  if values.ndim != 2:
    raise ConfigError(f"int8 matmul values have shape {values.shape}; expected 2D [K, N] ([N, K] with "
                      "transpose_rhs=True): reshape the weight first.")
  return values.shape[::-1] if transpose_rhs else values.shape


def kernel_operands(kernel: str, x: jax.Array, values: jax.Array, scale, x_scale, transpose_rhs: bool
                    ) -> tuple[int, int, int, bool]:
  """(M, K, N, x is int8) of a Pallas kernel's 2D operands; ConfigError naming `kernel` when x's shape or the
  scales given do not fit: float x (w8a16) takes scale [N] and no x_scale; int8 x takes both (w8a8) or neither."""
  m = x.shape[0]
  k, n = rhs_dims(values, transpose_rhs)
  integer = x.dtype == jnp.int8
  if x.ndim != 2 or x.shape[1] != k:
    raise ConfigError(f"{kernel} x has shape {x.shape}; expected [M, K={k}].")
  if integer and (scale is None) != (x_scale is None):
    raise ConfigError(f"{kernel} with int8 x takes both scale and x_scale (w8a8) or neither (int32).")
  if not integer and (scale is None or x_scale is not None):
    raise ConfigError(f"{kernel} with float x (w8a16) takes scale [N] and no x_scale.")
  return m, k, n, integer


def check_operands(x: jax.Array, values: jax.Array, scale: jax.Array | None, *, mode: str | None,
                   transpose_rhs: bool) -> tuple[int, int]:
  """ConfigError naming the operand that does not fit; returns (K, N). x: [..., K]; values int8 [K, N] or [N, K];
  scale float [N] (None: the bare int32 dot, x int8)."""
  if mode is not None and mode not in MODES:
    raise ConfigError(f"int8 matmul mode={mode!r} is not one of {MODES}.")
  if values.dtype != jnp.int8:
    raise ConfigError(f"int8 matmul values are {values.dtype}; expected int8 (quantize_per_channel).")
  k, n = rhs_dims(values, transpose_rhs)
  if x.ndim < 1 or x.shape[-1] != k:
    layout = "[N, K]" if transpose_rhs else "[K, N]"
    raise ConfigError(f"int8 matmul x has shape {x.shape}; expected [..., K={k}] for values {values.shape} "
                      f"({layout}).")
  if scale is None:
    if x.dtype != jnp.int8:
      raise ConfigError(f"int8_dot_int32 x is {x.dtype}; expected int8 (quantize_activations).")
  else:
    if scale.shape != (n,):
      raise ConfigError(f"int8 matmul scale has shape {scale.shape}; expected [N={n}], one per output channel of "
                        f"values {values.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ConfigError(f"int8 matmul x is {x.dtype}; expected a float dtype (the model's activations).")
  return k, n


def dot_dims(transpose_rhs: bool):
  """dot_general dimension numbers of lhs [M, K] by rhs [K, N] (or [N, K])."""
  return (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))


def dot_precision(dtype):
  """HIGHEST for float32 operands (true float32 products, not TF32 or bfloat16 passes); the default otherwise."""
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None
