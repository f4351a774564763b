"""qwenjax.kernels.grouped_matmul: the Pallas kernel (interpret mode) against jax.lax.ragged_dot, and both against
a loop over groups in float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import ConfigError
from qwenjax.kernels.grouped_matmul import grouped_matmul, grouped_matmul_pallas

CASES = {  # group sizes (M is their sum plus trailing rows in no group)
    "uneven": ([3, 0, 7, 1, 0, 12, 2, 5], 4),
    "one_token": ([0, 0, 1, 0], 0),
    "all_on_one": ([0, 0, 70, 0], 0),
    "many_tiles": ([17, 33, 1, 0, 29, 16], 0),  # groups spanning 16-row tiles, one inside a tile
    "all_empty": ([0, 0, 0], 5),
}


def numpy_grouped_matmul(x, w, sizes):
  """float64: row r times w of the group it falls in; rows past the last group 0."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  y = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    y[start:start + size] = x[start:start + size] @ w[g]
    start += size
  return y


def make_operands(sizes, extra, k=48, n=40, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  m = sum(sizes) + extra
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((len(sizes), k, n)).astype(np.float32)
  return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_within_1e5_of_ragged_dot_and_of_float64(case):
  sizes, extra = CASES[case]
  x, w, group_sizes = make_operands(sizes, extra)
  want = numpy_grouped_matmul(x, w, sizes)
  ref = np.asarray(grouped_matmul(x, w, group_sizes, impl="xla"))
  for block_m in (16, 32):
    got = np.asarray(grouped_matmul_pallas(x, w, group_sizes, block_m=block_m, block_n=16, block_k=32))
    np.testing.assert_allclose(got, ref, atol=1e-5 * max(1, np.abs(ref).max()), rtol=0, err_msg=case)
  np.testing.assert_allclose(ref, want, atol=1e-4, rtol=1e-5)
  assert not np.asarray(got[sum(sizes):]).any()  # rows in no group are 0


@pytest.mark.parametrize("case", ["uneven", "many_tiles"])
def test_bfloat16_within_2e2(case):
  sizes, extra = CASES[case]
  x, w, group_sizes = make_operands(sizes, extra, dtype=jnp.bfloat16, seed=1)
  got = grouped_matmul(x, w, group_sizes, impl="pallas")
  assert got.dtype == jnp.bfloat16
  ref = np.asarray(grouped_matmul(x, w, group_sizes, impl="xla"), np.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=2e-2 * np.abs(ref).max(), rtol=0)


def test_experts_no_row_chose_are_never_read():
  """Unchosen experts' weights are NaN: were any tile of them loaded into a product, NaN would spread."""
  sizes = [0, 5, 0, 0, 9, 0]
  x, w, group_sizes = make_operands(sizes, 2)
  poisoned = w.at[jnp.asarray([0, 2, 3, 5])].set(jnp.nan)
  got = np.asarray(grouped_matmul_pallas(x, poisoned, group_sizes, block_m=16, block_n=16, block_k=16))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, numpy_grouped_matmul(x, w, sizes), atol=1e-4, rtol=1e-5)


def test_bad_operands_are_one_config_error():
  x, w, sizes = make_operands([2, 3], 0)
  with pytest.raises(ConfigError, match="x's K is w's second dim"):
    grouped_matmul(x[:, :10], w, sizes)
  with pytest.raises(ConfigError, match="expected integers"):
    grouped_matmul(x, w, sizes.astype(jnp.float32))
  with pytest.raises(ConfigError, match="block_k=24 is not a power of two"):
    grouped_matmul_pallas(x, w, sizes, block_k=24)
  with pytest.raises(ConfigError, match="impl 'mosaic' is not one of xla, pallas"):
    grouped_matmul(x, w, sizes, impl="mosaic")
