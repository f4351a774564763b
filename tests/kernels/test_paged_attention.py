"""Paged KV cache in plain JAX: `ragged_paged_attention_reference` against a dense float64 oracle written here in
numpy (each sequence's K/V gathered from its pages by hand, then causal, windowed grouped-query softmax
attention) within 1e-5 in float32 over ragged cases (KV lengths 1, a page +- 1, a full page table; prefill-only,
decode-only and mixed calls; padding rows and sequences; sliding windows; every Qwen2.5 group size at head dims
64 and 128); int8 pages equal the oracle on their dequantized values and the float pages within the
quantization's error; `write_pages` writes exactly and leaves padding slots alone, and a lone token's write (and
page copy) is a scatter in place, with no copy of the pool in the compiled program; one jit serves every num_seqs.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import ConfigError
from qwenjax.engine.pages import PagePool, SequencePages
from qwenjax.kernels.paged_attention import (
  dequantize_kv,
  quantize_kv,
  ragged_paged_attention_reference,
  write_pages,
)

from conftest import compile_as_users

PAGE = 16  # page size of the tests
TOL = 1e-5  # float32 against the float64 oracle, absolute and relative


def oracle(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, window=None, k_scale=None,
           v_scale=None):
  """Dense attention in float64, one sequence at a time, from positions gathered page by page."""
  q, kp, vp = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  if k_scale is not None:
    kp, vp = kp * np.asarray(k_scale, np.float64)[..., None], vp * np.asarray(v_scale, np.float64)[..., None]
  t, n, h = q.shape
  page_size, k = kp.shape[1], kp.shape[2]
  out = np.zeros((t, n, h))
  for i in range(num_seqs):
    kv_len, start, end = int(kv_lens[i]), int(cu_q_lens[i]), int(cu_q_lens[i + 1])
    keys = np.stack([kp[page_indices[i][j // page_size], j % page_size] for j in range(kv_len)])  # [L, K, H]
    values = np.stack([vp[page_indices[i][j // page_size], j % page_size] for j in range(kv_len)])
    keys, values = np.repeat(keys, n // k, axis=1), np.repeat(values, n // k, axis=1)  # [L, N, H], head n -> n // G
    q_pos = kv_len - (end - start) + np.arange(end - start)
    delta = q_pos[:, None] - np.arange(kv_len)[None, :]  # [Q, L]
    mask = (delta >= 0) & (delta < (window if window is not None else kv_len + 1))
    scores = np.einsum("qnh,lnh->nql", q[start:end], keys) / np.sqrt(h)
    scores = np.where(mask[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out[start:end] = np.einsum("nql,lnh->qnh", probs, values)
  return out


def make_case(seqs, *, n=4, k=2, h=64, pages_per_seq=4, pad_rows=0, pad_seqs=0, spare_pages=3, seed=0,
              dtype=np.float32):
  """A random pool and a packed batch. seqs: [(kv_len, q_len)]. Each sequence gets random pages of the pool (its
  table row padded with other random, in-range ids); unused pages hold random data too, so a wrong page shows.
  pad_seqs extra entries of kv_lens / page_indices / cu_q_lens hold garbage that must be ignored."""
  rng = np.random.default_rng(seed)
  needed = [-(-kv // PAGE) for kv, _ in seqs]
  assert max(needed) <= pages_per_seq and all(ql <= kv for kv, ql in seqs)
  num_pages = sum(needed) + spare_pages
  perm = rng.permutation(num_pages)
  s = len(seqs) + pad_seqs
  page_indices = rng.integers(0, num_pages, size=(s, pages_per_seq)).astype(np.int32)
  used = 0
  for i, count in enumerate(needed):
    page_indices[i, :count] = perm[used:used + count]
    used += count
  q_lens = [ql for _, ql in seqs]
  cu = np.concatenate([[0], np.cumsum(q_lens)])
  cu_q_lens = np.concatenate([cu, rng.integers(0, 5, size=pad_seqs)]).astype(np.int32)  # garbage past num_seqs
  kv_lens = np.concatenate([[kv for kv, _ in seqs], rng.integers(1, 50, size=pad_seqs)]).astype(np.int32)
  t = int(cu[-1]) + pad_rows
  shape = (num_pages, PAGE, k, h)
  return dict(q=rng.standard_normal((t, n, h)).astype(dtype), k_pages=rng.standard_normal(shape).astype(dtype),
              v_pages=rng.standard_normal(shape).astype(dtype), kv_lens=kv_lens, page_indices=page_indices,
              cu_q_lens=cu_q_lens, num_seqs=len(seqs))


# Jitted whole: op-by-op dispatch compiles every primitive per shape and takes several times longer on CPU.
_reference = jax.jit(ragged_paged_attention_reference, static_argnames=("sliding_window",))


def run(case, **kw):
  args = {name: jnp.asarray(v) for name, v in case.items()}
  return np.asarray(_reference(**args, **kw), np.float64)


def check(case, window=None, tol=TOL):
  got = run(case, sliding_window=window)
  want = oracle(**case, window=window)
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  rows = int(case["cu_q_lens"][case["num_seqs"]])
  assert (got[rows:] == 0).all()  # padding rows
  return float(np.abs(got - want).max())


# (kv_len, q_len) per sequence, with PAGE = 16 and 4 pages per table (64 positions).
CASES = {
    "decode_lengths": [(1, 1), (15, 1), (16, 1), (17, 1), (64, 1)],  # 1, a page - 1, a page, + 1, a full table
    "prefill_only": [(1, 1), (15, 15), (16, 16), (17, 17), (64, 64)],
    "prefill_chunks": [(40, 7), (33, 16), (64, 31)],  # chunks after cached context
    "mixed": [(64, 1), (20, 20), (17, 1), (50, 9), (1, 1), (32, 2)],
}


@pytest.mark.parametrize("name", CASES)
def test_ragged_batches(name):
  check(make_case(CASES[name], seed=len(name)))


def test_padding_rows_and_sequences():
  """Rows past the real queries give zeros; kv_lens, page tables and cu_q_lens past num_seqs hold garbage."""
  check(make_case(CASES["mixed"], pad_rows=11, pad_seqs=3, seed=1))
  check(make_case([(16, 1)], pad_rows=7, pad_seqs=5, seed=2))


def test_no_sequences_gives_zeros():
  case = make_case([(5, 2)], pad_rows=3, seed=3)
  case["num_seqs"] = 0
  assert (run(case) == 0).all()


@pytest.mark.parametrize("window", [1, 8, 16, 17, 100])
def test_sliding_window(window):
  check(make_case(CASES["mixed"] + [(64, 64)], pad_rows=2, seed=window), window=window)


# Qwen2.5's query heads per KV head: 7 (0.5B, 7B), 6 (1.5B), 8 (3B, 72B), 5 (14B, 32B).
@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("g", [7, 6, 8, 5])
def test_every_qwen_group_size(g, h):
  check(make_case(CASES["mixed"], n=2 * g, k=2, h=h, pad_rows=3, seed=g + h))
  check(make_case([(30, 30), (17, 1)], n=g, k=1, h=h, seed=g * h))


def test_bfloat16_within_2e_2():
  case = make_case(CASES["mixed"], n=6, k=2, seed=4, dtype=np.float32)
  bf16 = {name: (jnp.asarray(v, jnp.bfloat16) if name in ("q", "k_pages", "v_pages") else jnp.asarray(v))
          for name, v in case.items()}
  got = np.asarray(ragged_paged_attention_reference(**bf16), np.float64)
  want = oracle(**{**case, **{name: np.asarray(bf16[name], np.float32) for name in ("q", "k_pages", "v_pages")}})
  assert bf16["q"].dtype == ragged_paged_attention_reference(**bf16).dtype
  np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)


def _quantized(case):
  kq, ks = quantize_kv(jnp.asarray(case["k_pages"]))
  vq, vs = quantize_kv(jnp.asarray(case["v_pages"]))
  return {**case, "k_pages": kq, "v_pages": vq, "k_scale": ks, "v_scale": vs}


@pytest.mark.parametrize("window", [None, 9])
def test_int8_pages(window):
  """Against the oracle on dequantized pages: the same math, so float32 rounding only; against the float pages:
  within the quantization's error (each value off by at most half a step, absmax / 254)."""
  case = make_case(CASES["mixed"] + [(48, 20)], n=14, k=2, pad_rows=4, seed=5)
  quantized = _quantized(case)
  got = run(quantized, sliding_window=window)
  want = oracle(**{name: np.asarray(v) for name, v in quantized.items()}, window=window)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
  assert quantized["k_pages"].dtype == jnp.int8 and quantized["k_scale"].shape == case["k_pages"].shape[:3]
  unquantized = oracle(**case, window=window)
  err = np.abs(got - unquantized).max()
  assert err < 0.05, err
  assert (got[int(case["cu_q_lens"][case["num_seqs"]]):] == 0).all()


def test_quantize_kv_round_trip():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((3, 16, 2, 64)).astype(np.float32) * np.array([1.0, 100.0])[:, None]
  x[1, 4, 0] = 0.0  # an all-zero head
  values, scale = quantize_kv(jnp.asarray(x))
  assert values.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (3, 16, 2)
  np.testing.assert_array_equal(np.abs(np.asarray(values)).max(-1)[np.asarray(scale) > 0], 127)
  assert scale[1, 4, 0] == 0 and (values[1, 4, 0] == 0).all()
  back = np.asarray(dequantize_kv(values, scale))
  assert (np.abs(back - x) <= np.asarray(scale)[..., None] / 2 * (1 + 1e-6)).all()


def test_write_pages_is_exact_and_skips_padding():
  rng = np.random.default_rng(7)
  num_pages, k, h = 5, 2, 8
  k_pages = rng.standard_normal((num_pages, PAGE, k, h)).astype(np.float32)
  v_pages = rng.standard_normal((num_pages, PAGE, k, h)).astype(np.float32)
  slots = np.array([3 * PAGE + 15, -1, 0, 4 * PAGE + 15, -1, 2 * PAGE + 1], np.int32)  # ends of pages, the last slot
  new_k = rng.standard_normal((len(slots), k, h)).astype(np.float32)
  new_v = rng.standard_normal((len(slots), k, h)).astype(np.float32)
  got_k, got_v = write_pages(jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(new_k), jnp.asarray(new_v),
                             jnp.asarray(slots))
  want_k, want_v = k_pages.reshape(-1, k, h).copy(), v_pages.reshape(-1, k, h).copy()
  real = slots >= 0
  want_k[slots[real]], want_v[slots[real]] = new_k[real], new_v[real]
  np.testing.assert_array_equal(np.asarray(got_k), want_k.reshape(k_pages.shape))  # bitwise, and all else untouched
  np.testing.assert_array_equal(np.asarray(got_v), want_v.reshape(v_pages.shape))
  # int8 values and their [num_pages, page_size, K] scales go in by the same function and the same slots.
  (kq, ks), (vq, vs) = quantize_kv(jnp.asarray(new_k)), quantize_kv(jnp.asarray(new_v))
  scales = jnp.zeros((num_pages, PAGE, k), jnp.float32)
  got_ks, got_vs = jax.jit(write_pages, donate_argnums=(0, 1))(scales, scales + 1, ks, vs, jnp.asarray(slots))
  flat_ks, flat_vs = np.zeros((num_pages * PAGE, k), np.float32), np.ones((num_pages * PAGE, k), np.float32)
  flat_ks[slots[real]], flat_vs[slots[real]] = np.asarray(ks)[real], np.asarray(vs)[real]
  np.testing.assert_array_equal(np.asarray(got_ks).reshape(-1, k), flat_ks)
  np.testing.assert_array_equal(np.asarray(got_vs).reshape(-1, k), flat_vs)
  pages8 = jnp.zeros((num_pages, PAGE, k, h), jnp.int8)
  got_kq, _ = write_pages(pages8, pages8, kq, vq, jnp.asarray(slots))
  np.testing.assert_array_equal(np.asarray(got_kq).reshape(-1, k, h)[slots[real]], np.asarray(kq)[real])


def test_pages_written_by_a_page_table_give_dense_attention():
  """End to end with the host-side tables: sequences prefilled in chunks and then decoded, their K/V written
  into a shared pool at the slots `SequencePages` gives; attention then equals the oracle on the dense K/V."""
  rng = np.random.default_rng(8)
  n, k, h, num_pages = 6, 2, 64, 12
  pool = PagePool(num_pages, PAGE)
  dense_k = [rng.standard_normal((length, k, h)).astype(np.float32) for length in (33, 16, 5)]
  dense_v = [rng.standard_normal((length, k, h)).astype(np.float32) for length in (33, 16, 5)]
  tables = [SequencePages(pool) for _ in dense_k]
  k_pages = v_pages = jnp.zeros((num_pages, PAGE, k, h), jnp.float32)
  for cut in ((20, 16, 3), (32, 16, 4), (33, 16, 5)):  # a prefill chunk, then decode steps
    slots, new_k, new_v = [], [], []
    for table, dk, dv, end in zip(tables, dense_k, dense_v, cut):
      slots.append(table.grow(end - table.length))
      new_k.append(dk[end - len(slots[-1]):end])
      new_v.append(dv[end - len(slots[-1]):end])
    slots.append(np.full(3, -1, np.int32))  # padding tokens
    new_k.append(np.full((3, k, h), np.nan, np.float32))
    new_v.append(np.full((3, k, h), np.nan, np.float32))
    k_pages, v_pages = write_pages(k_pages, v_pages, jnp.asarray(np.concatenate(new_k)),
                                   jnp.asarray(np.concatenate(new_v)), jnp.asarray(np.concatenate(slots)))
  assert not np.isnan(np.asarray(k_pages)).any()
  q_lens = (4, 1, 2)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  q = rng.standard_normal((int(cu[-1]) + 1, n, h)).astype(np.float32)
  got = ragged_paged_attention_reference(
      jnp.asarray(q), k_pages, v_pages, jnp.asarray([t.length for t in tables], jnp.int32),
      jnp.asarray(np.stack([t.page_row(4) for t in tables])), jnp.asarray(cu), 3)
  # The oracle reads dense K/V through an identity page table of a pool built from them.
  for i, (dk, dv) in enumerate(zip(dense_k, dense_v)):
    rows = slice(cu[i], cu[i + 1])
    want = oracle(q[rows], dk[:, None], dv[:, None], [len(dk)], [np.arange(len(dk))], [0, q_lens[i]], 1)
    np.testing.assert_allclose(np.asarray(got)[rows], want, atol=TOL, rtol=TOL)
  for table in tables:
    table.release()
  assert pool.num_free == num_pages


def test_one_compilation_serves_every_num_seqs():
  """num_seqs traced: calls with 1, 3 and 6 real sequences (the rest padding) trace the reference once."""
  traces = []

  def traced(*args, **kw):
    traces.append(1)
    return ragged_paged_attention_reference(*args, **kw)

  jitted = jax.jit(traced, static_argnames=("sliding_window",))
  base = make_case(CASES["mixed"], pad_rows=5, seed=9)
  for num_seqs in (1, 3, 6):
    case = {**base, "num_seqs": num_seqs}
    got = jitted(*(jnp.asarray(case[name]) for name in ("q", "k_pages", "v_pages", "kv_lens", "page_indices",
                                                         "cu_q_lens")), jnp.int32(num_seqs), sliding_window=12)
    np.testing.assert_allclose(np.asarray(got, np.float64), oracle(**case, window=12), atol=TOL, rtol=TOL)
  assert len(traces) == 1


def test_bad_arguments_name_the_culprit():
  case = {name: jnp.asarray(v) for name, v in make_case([(5, 2)], n=6, k=2).items()}
  with pytest.raises(ConfigError, match=r"6 query heads are not a multiple of the pages' 4 KV heads"):
    ragged_paged_attention_reference(**{**case, "k_pages": jnp.zeros((4, PAGE, 4, 64)),
                                        "v_pages": jnp.zeros((4, PAGE, 4, 64))})
  with pytest.raises(ConfigError, match=r"int8 pages need k_scale of shape"):
    ragged_paged_attention_reference(**{**case, "k_pages": case["k_pages"].astype(jnp.int8),
                                        "v_pages": case["v_pages"].astype(jnp.int8)})
  with pytest.raises(ConfigError, match=r"cu_q_lens \(3,\) must be"):
    ragged_paged_attention_reference(**{**case, "cu_q_lens": jnp.zeros(3, jnp.int32)})
  pages = jnp.zeros((2, PAGE, 2, 8))
  with pytest.raises(ConfigError, match=r"new_v is bfloat16 but v_pages are float32"):
    write_pages(pages, pages, jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 8), jnp.bfloat16), jnp.zeros(1, jnp.int32))
  with pytest.raises(ConfigError, match=r"new_k has shape \(2, 2, 8\); expected \(1, 2, 8\)"):
    write_pages(pages, pages, jnp.zeros((2, 2, 8)), jnp.zeros((1, 2, 8)), jnp.zeros(1, jnp.int32))


def _users_hlo(jitted, *args) -> str:
  """The optimized HLO XLA makes of `jitted(*args)` in users' configuration (the suite compiles with flags of its
  own: conftest.py)."""
  return compile_as_users(jitted.lower(*args)).as_text()


def _pool_sized(compiled_text: str, pool_elements: int) -> list[tuple[str, str]]:
  """(name, opcode) of the optimized HLO's instructions whose result has as many elements as the pool."""
  found = []
  for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* ([\w-]+)\(", compiled_text, re.M):
    name, dims, op = m.groups()
    if dims and math.prod(int(d) for d in dims.split(",")) == pool_elements:
      found.append((name, op))
  return found


def _pool_sized_ops(compiled_text: str, pool_elements: int) -> set[str]:
  """Opcodes of `_pool_sized` instructions, scatters and the views that move no data (parameter, bitcast, tuple,
  get-tuple-element) left out."""
  ops = {op for name, op in _pool_sized(compiled_text, pool_elements) if "scatter" not in name + op}
  return ops - {"parameter", "bitcast", "tuple", "get-tuple-element"}


@pytest.mark.parametrize("slot", [2 * PAGE + 3, -1])
def test_one_token_write_is_a_scatter_in_place(slot):
  """A lone update (a batch-1 decode step) is written exactly, or dropped, without copying the pool: XLA turns a
  scatter of one update into a select over the whole pool unless given a second, dropped one."""
  from qwenjax.engine.programs import copy_pages  # pylint: disable=g-import-not-at-top
  from qwenjax.model.kv_cache import PagedKVCache, write_slots  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  layers, num_pages, k, h = 3, 64, 2, 8
  pages = rng.standard_normal((layers, num_pages, PAGE, k, h)).astype(np.float32)
  new = rng.standard_normal((1, k, h)).astype(np.float32)
  slots = jnp.asarray([slot], jnp.int32)
  write = jax.jit(write_slots, static_argnums=1, donate_argnums=0)
  assert _pool_sized_ops(_users_hlo(write, jnp.asarray(pages), 1, slots, jnp.asarray(new)),
                         pages.size) == set()
  got = np.asarray(write(jnp.asarray(pages), 1, slots, jnp.asarray(new)))
  want = pages.reshape(layers, -1, k, h).copy()
  if slot >= 0:
    want[1, slot] = new[0]
  np.testing.assert_array_equal(got, want.reshape(pages.shape))

  kv = jax.jit(write_pages, donate_argnums=(0, 1))
  args = (jnp.asarray(pages[0]), jnp.asarray(pages[1]), jnp.asarray(new), jnp.asarray(-new), slots)
  assert _pool_sized_ops(_users_hlo(kv, *args), pages[0].size) == set()
  got_k, got_v = kv(*args)
  want_k, want_v = pages[0].reshape(-1, k, h).copy(), pages[1].reshape(-1, k, h).copy()
  if slot >= 0:
    want_k[slot], want_v[slot] = new[0], -new[0]
  np.testing.assert_array_equal(np.asarray(got_k).reshape(-1, k, h), want_k)
  np.testing.assert_array_equal(np.asarray(got_v).reshape(-1, k, h), want_v)

  # The prefix cache's copy-on-write of one page (one admitted sequence at max_batch_size 1).
  cache = PagedKVCache(jnp.asarray(pages), jnp.asarray(pages + 1))
  src, dst = jnp.asarray([5], jnp.int32), jnp.asarray([9 if slot >= 0 else -1], jnp.int32)
  assert _pool_sized_ops(_users_hlo(copy_pages, cache, src, dst), pages.size) == set()
  got = copy_pages(cache, src, dst)
  want = pages.copy()
  if slot >= 0:
    want[:, 9] = pages[:, 5]
  np.testing.assert_array_equal(np.asarray(got.k), want)
  np.testing.assert_array_equal(np.asarray(got.v), want + 1)


def test_a_bfloat16_pool_on_cpu_is_written_in_place_as_bits():
  """XLA:CPU has no bfloat16 scatter: a bfloat16 pool is converted to float32 and back around every write, unless
  it holds its bits as uint16, which PagedKVCache.zeros does on CPU. The write is then a scatter in place, exact."""
  from launch.bench.workload import tiny_config  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels.paged_attention import BF16_BITS, from_pool  # pylint: disable=g-import-not-at-top
  from qwenjax.model.kv_cache import PagedKVCache, write_slots  # pylint: disable=g-import-not-at-top

  cfg = tiny_config()
  cache = PagedKVCache.zeros(cfg, 64, PAGE, dtype=jnp.bfloat16)
  assert cache.k.dtype == BF16_BITS
  rng = np.random.default_rng(9)
  new = jnp.asarray(rng.standard_normal((3, cfg.num_kv_heads, cfg.head_dim)), jnp.bfloat16)
  slots = jnp.asarray([5, -1, 40 * PAGE + 3], jnp.int32)
  write = jax.jit(write_slots, static_argnums=1, donate_argnums=0)
  assert _pool_sized_ops(_users_hlo(write, cache.k, 1, slots, new), cache.k.size) == set()
  got = np.asarray(from_pool(write(cache.k, 1, slots, new)).astype(jnp.float32)).reshape(cfg.num_layers, -1,
                                                                                        cfg.num_kv_heads, cfg.head_dim)
  want = np.zeros_like(got)
  want[1, [5, 40 * PAGE + 3]] = np.asarray(new.astype(jnp.float32))[[0, 2]]
  np.testing.assert_array_equal(got, want)


def test_a_bfloat16_contiguous_cache_on_cpu_is_written_in_place_as_bits():
  """The same for the contiguous KVCache (`write_rows`, a dynamic_update_slice per row): as bfloat16, XLA:CPU
  converted the whole cache around each row's write; as its bits it writes in place."""
  from launch.bench.workload import tiny_config  # pylint: disable=g-import-not-at-top
  from qwenjax import KVCache  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels.paged_attention import BF16_BITS, from_pool  # pylint: disable=g-import-not-at-top
  from qwenjax.model.kv_cache import write_rows  # pylint: disable=g-import-not-at-top

  cfg = tiny_config()
  cache = KVCache.zeros(cfg, 3, 64, jnp.bfloat16)
  assert cache.k.dtype == BF16_BITS
  new = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, cfg.num_kv_heads, cfg.head_dim)), jnp.bfloat16)
  rows, start = jnp.asarray([2, 0], jnp.int32), jnp.asarray([7, 30], jnp.int32)
  write = jax.jit(write_rows, static_argnums=1, donate_argnums=0)
  text = _users_hlo(write, cache.k, 1, rows, start, new)
  sized = [name for name, _ in _pool_sized(text, cache.k.size)]
  assert sized and not [n for n in sized if any(w in n for w in ("convert", "copy"))], sized
  got = np.asarray(from_pool(write(cache.k, 1, rows, start, new)).astype(jnp.float32))
  want = np.zeros(got.shape, np.float32)
  values = np.asarray(new.astype(jnp.float32)).transpose(0, 2, 1, 3)  # [B, K, T, H]
  want[1, 2, :, 7:11], want[1, 0, :, 30:34] = values[0], values[1]
  np.testing.assert_array_equal(got, want)
