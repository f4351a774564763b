"""The operand check both grouped matmul kernels share (`qwenjax.kernels.grouped_matmul`, the reference, the
generic kernel and the dispatch; `qwenjax.kernels.grouped_matmul_tpu`, the Mosaic one): x [M, K], w [G, K, N],
integer group_sizes [G], and errors that name the shapes that do not fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax._errors import ConfigError


def check_operands(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> tuple[int, int, int, int]:
  """(M, K, N, G) of x [M, K], w [G, K, N] and group_sizes [G]; ConfigError naming the shapes otherwise."""
  if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
    raise ConfigError(f"grouped_matmul takes x [M, K], w [G, K, N] and group_sizes [G]; got {x.shape}, {w.shape} "
                      f"and {group_sizes.shape}.")
  (m, k), (g, kw, n) = x.shape, w.shape
  if kw != k or group_sizes.shape[0] != g:
    raise ConfigError(f"grouped_matmul: x {x.shape}, w {w.shape} and group_sizes {group_sizes.shape} disagree "
                      "(x's K is w's second dim; one size per group).")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ConfigError(f"grouped_matmul group_sizes are {group_sizes.dtype}; expected integers.")
  return m, k, n, g
