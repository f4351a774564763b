"""The engine's XLA paged attention (`paged_attention_xla`: keys visited a chunk at a time, an online softmax, a loop
bounded by the real queries' positions) against the one-gather reference, `paged_attention_reference`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kernels.attention import FULL_WINDOW, paged_attention_reference, paged_attention_xla
from qwenjax.kernels.paged_attention import BF16_BITS, pool_dtype, quantize_kv

PAGE, PAGES, K, G, H = 16, 24, 2, 3, 32


def _case(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  b, t, p = 4, 6, 12
  lengths = np.array([5, 70, 181, 1])  # keys each row holds after this step (row 3: one decode token)
  num_new = np.array([5, 6, 3, 1], np.int32)
  positions = (lengths - num_new)[:, None] + np.arange(t)[None, :]
  table = np.stack([rng.permutation(PAGES)[:p] for _ in range(b)]).astype(np.int32)
  q = jnp.asarray(rng.normal(size=(b, t, K * G, H)), dtype)
  k_pages = jnp.asarray(rng.normal(size=(PAGES, PAGE, K, H)), dtype)
  v_pages = jnp.asarray(rng.normal(size=(PAGES, PAGE, K, H)), dtype)
  return q, k_pages, v_pages, jnp.asarray(positions, jnp.int32), jnp.asarray(num_new), jnp.asarray(table)


def _real(x, num_new):
  return [np.asarray(x[i, :n], np.float64) for i, n in enumerate(np.asarray(num_new))]


@pytest.mark.parametrize("window", [FULL_WINDOW, 40])
@pytest.mark.parametrize("chunk_tokens,row_group", [(16, None), (64, None), (1024, None), (16, 1), (64, 3), (64, 8)])
def test_equals_the_one_gather_reference(window, chunk_tokens, row_group):
  """Also with the rows sorted and visited in groups (3: four rows as two groups, one padded; 8: one group)."""
  q, kp, vp, pos, num_new, table = _case(0)
  want = paged_attention_reference(q, kp, vp, pos, table, window)
  got = jax.jit(paged_attention_xla, static_argnames=("chunk_tokens", "row_group"))(
      q, kp, vp, pos, num_new, table, window, chunk_tokens=chunk_tokens, row_group=row_group)
  assert got.shape == want.shape and got.dtype == want.dtype
  for g, w in zip(_real(got, num_new), _real(want, num_new)):
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("row_group", [None, 3])
def test_int8_pages_and_a_traced_window(row_group):
  q, kp, vp, pos, num_new, table = _case(1)
  (kq, ks), (vq, vs) = quantize_kv(kp), quantize_kv(vp)
  window = jnp.int32(50)
  want = paged_attention_reference(q, kq, vq, pos, table, window, k_scale=ks, v_scale=vs)
  got = jax.jit(paged_attention_xla, static_argnames="row_group")(q, kq, vq, pos, num_new, table, window, k_scale=ks,
                                                                  v_scale=vs, row_group=row_group)
  for g, w in zip(_real(got, num_new), _real(want, num_new)):
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("row_group", [None, 3])
@pytest.mark.parametrize("quantized", [False, True])
def test_a_layer_read_from_the_whole_pool(quantized, row_group):
  """layer=: the pools hold every layer, and the result is the reference's over that layer's slice (in groups of
  rows too: each group reads its pages from the whole pool)."""
  q, kp, vp, pos, num_new, table = _case(3)
  rng = np.random.default_rng(4)
  other = lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype)
  k_all, v_all = jnp.stack([other(kp), kp, other(kp)]), jnp.stack([other(vp), vp, other(vp)])  # [L=3, NP, ...]
  scales = {}
  if quantized:
    (kq, ks), (vq, vs) = quantize_kv(k_all), quantize_kv(v_all)
    k_all, v_all, scales = kq, vq, dict(k_scale=ks, v_scale=vs)
  want = paged_attention_reference(q, k_all[1], v_all[1], pos, table, FULL_WINDOW,
                                   **{k: v[1] for k, v in scales.items()})
  got = jax.jit(paged_attention_xla, static_argnames="row_group")(q, k_all, v_all, pos, num_new, table, FULL_WINDOW,
                                                                  layer=jnp.int32(1), row_group=row_group, **scales)
  for g, w in zip(_real(got, num_new), _real(want, num_new)):
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)


def test_bfloat16_within_its_precision():
  q, kp, vp, pos, num_new, table = _case(2, jnp.bfloat16)
  want = paged_attention_reference(q, kp, vp, pos, table, FULL_WINDOW)
  got = paged_attention_xla(q, kp, vp, pos, num_new, table, FULL_WINDOW, chunk_tokens=32)
  assert got.dtype == jnp.bfloat16
  for g, w in zip(_real(got, num_new), _real(want, num_new)):
    np.testing.assert_allclose(g, w, atol=3e-2, rtol=3e-2)


def test_visits_only_the_chunks_the_real_queries_reach():
  """Keys past every real query's position are never read: filling them with NaN changes nothing, and a step with
  no real query returns zeros."""
  q, kp, vp, pos, num_new, table = _case(3)
  first = paged_attention_xla(q, kp, vp, pos, num_new, table, FULL_WINDOW, chunk_tokens=16)
  reach = int(np.max(np.where(np.arange(6)[None] < np.asarray(num_new)[:, None], np.asarray(pos), -1))) + 1
  used = {int(pg) for row in np.asarray(table) for pg in row[:-(-reach // PAGE)]}
  unused = np.array([pg for pg in range(PAGES) if pg not in used])
  kp2, vp2 = kp.at[unused].set(jnp.nan), vp.at[unused].set(jnp.nan)
  second = paged_attention_xla(q, kp2, vp2, pos, num_new, table, FULL_WINDOW, chunk_tokens=16)
  for a, b in zip(_real(first, num_new), _real(second, num_new)):
    np.testing.assert_array_equal(a, b)
  none = paged_attention_xla(q, kp, vp, pos, jnp.zeros_like(num_new), table, FULL_WINDOW)
  assert not np.asarray(none).any()


def test_each_group_of_rows_reads_only_as_far_as_its_own_longest_row():
  """Rows of disjoint pages, every page past a row's own furthest query filled with NaN: visited one row a group
  (sorted by length, the longest first in the input) each row's result is the reference's over the clean pages,
  while one group of all rows reads the short rows' NaN pages (NaN values weighted by zero are NaN)."""
  rng = np.random.default_rng(6)
  b, t, p = 4, 6, 6
  lengths, num_new = np.array([90, 5, 40, 1]), np.array([3, 5, 6, 1], np.int32)
  pos = jnp.asarray((lengths - num_new)[:, None] + np.arange(t)[None, :], jnp.int32)
  table = jnp.asarray(np.arange(b * p).reshape(b, p), jnp.int32)  # row i: pages 6i .. 6i + 5
  q = jnp.asarray(rng.normal(size=(b, t, K * G, H)), jnp.float32)
  kp, vp = (jnp.asarray(rng.normal(size=(PAGES, PAGE, K, H)), jnp.float32) for _ in range(2))
  want = paged_attention_reference(q, kp, vp, pos, table, FULL_WINDOW)
  past = np.array([row * p + pg for row in range(b) for pg in range(p) if pg * PAGE >= lengths[row]])
  kp_nan, vp_nan = kp.at[past].set(jnp.nan), vp.at[past].set(jnp.nan)
  got = paged_attention_xla(q, kp_nan, vp_nan, pos, jnp.asarray(num_new), table, FULL_WINDOW, chunk_tokens=16,
                            row_group=1)
  for g, w in zip(_real(got, num_new), _real(want, num_new)):
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)
  together = paged_attention_xla(q, kp_nan, vp_nan, pos, jnp.asarray(num_new), table, FULL_WINDOW, chunk_tokens=16)
  assert np.isnan(_real(together, num_new)[1]).all()  # row 1 (5 keys) read as far as row 0 (90)


def test_a_bfloat16_pool_stored_as_bits_reads_as_the_same_values():
  """On CPU a bfloat16 pool holds its bits as uint16 (XLA:CPU would convert a bfloat16 pool whole around every
  write): attention over those bits equals attention over the same values stored as float32, within bfloat16."""
  q, kp, vp, pos, num_new, table = _case(5, jnp.bfloat16)
  bits = [jax.lax.bitcast_convert_type(x, BF16_BITS) for x in (kp, vp)]
  got = jax.jit(paged_attention_xla)(q, *bits, pos, num_new, table, FULL_WINDOW)
  want = paged_attention_reference(q.astype(jnp.float32), kp.astype(jnp.float32), vp.astype(jnp.float32), pos, table,
                                   FULL_WINDOW)
  assert got.dtype == jnp.bfloat16
  for g, w in zip(_real(got, num_new), _real(want, num_new)):
    np.testing.assert_allclose(g, w, atol=3e-2, rtol=3e-2)
  assert pool_dtype(jnp.bfloat16, "cpu") == BF16_BITS and pool_dtype(jnp.bfloat16, "tpu") == jnp.bfloat16
  assert pool_dtype(jnp.float32, "cpu") == jnp.float32
