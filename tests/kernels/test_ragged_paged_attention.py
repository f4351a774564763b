"""The ragged paged attention kernel (Pallas, interpret mode) against `ragged_paged_attention_reference`: float32
within 1e-5 and bfloat16 within 2e-2 over prefill-only, decode-only and mixed calls; KV lengths 1, a page - 1,
a page, a page + 1 and a full page table; padding rows and garbage sequence entries past num_seqs; sliding
windows; group sizes 7, 6, 8, 5 at head dims 64 and 128; int8 pages with their scales; block sizes from the
smallest to larger than a chunk; a traced num_seqs (0 included); bad shapes refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_paged_attention import make_case as paged_case

from qwenjax import ConfigError
from qwenjax.kernels.paged_attention import quantize_kv, ragged_paged_attention_reference
from qwenjax.kernels.ragged_paged_attention import ragged_paged_attention

TOL = {np.float32: 1e-5, jnp.bfloat16: 2e-2}

_reference = jax.jit(ragged_paged_attention_reference, static_argnames=("sliding_window",))


def make_case(seqs, *, n, k, h, dtype=np.float32, **kwargs):
  """test_paged_attention's random pool and packed batch (random page tables, garbage past num_seqs), with q and
  the pages in `dtype`."""
  case = paged_case(seqs, n=n, k=k, h=h, **kwargs)
  return {name: jnp.asarray(v, dtype) if name in ("q", "k_pages", "v_pages") else v for name, v in case.items()}


def check(case, tol, **kwargs):
  window = kwargs.pop("sliding_window", None)
  got = ragged_paged_attention(**case, sliding_window=window, interpret=True, **kwargs)
  want = _reference(**case, sliding_window=window, **{k: v for k, v in kwargs.items() if k.endswith("_scale")})
  assert got.shape == want.shape and got.dtype == want.dtype
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  t_real = int(case["cu_q_lens"][case["num_seqs"]])
  assert not np.any(got[t_real:]), "padding rows must be zeros"


# (name, seqs, n, k, h, pad_rows, pad_seqs, window): every group size and both head dims appear.
CASES = [
    ("prefill_g7_h64", [(40, 40), (17, 17), (1, 1)], 14, 2, 64, 0, 0, None),
    ("decode_g6_h128", [(1, 1), (15, 1), (16, 1), (17, 1), (64, 1)], 12, 2, 128, 2, 1, None),
    ("mixed_g8_h64", [(33, 5), (1, 1), (64, 20), (17, 1), (16, 16)], 8, 1, 64, 3, 2, None),
    ("mixed_g5_h128", [(15, 15), (64, 3), (2, 1), (31, 30)], 10, 2, 128, 1, 1, None),
    ("window_g7_h64", [(64, 40), (17, 1), (50, 50), (3, 1)], 7, 1, 64, 2, 1, 7),
    ("window_g6_h64", [(64, 1), (33, 33), (16, 2)], 6, 1, 64, 0, 0, 16),
]


@pytest.mark.parametrize("name,seqs,n,k,h,pad_rows,pad_seqs,window", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_float32(name, seqs, n, k, h, pad_rows, pad_seqs, window):
  case = make_case(seqs, n=n, k=k, h=h, pad_rows=pad_rows, pad_seqs=pad_seqs)
  check(case, TOL[np.float32], sliding_window=window)


def test_matches_reference_bfloat16():
  case = make_case([(33, 5), (1, 1), (64, 20), (17, 1)], n=14, k=2, h=128, pad_rows=2, pad_seqs=1,
                   dtype=jnp.bfloat16)
  check(case, TOL[jnp.bfloat16])
  check(case, TOL[jnp.bfloat16], sliding_window=5)


def test_int8_pages():
  case = make_case([(33, 5), (1, 1), (64, 20), (16, 1)], n=10, k=2, h=64, pad_rows=2, pad_seqs=1)
  (case["k_pages"], k_scale), (case["v_pages"], v_scale) = quantize_kv(case["k_pages"]), quantize_kv(case["v_pages"])
  check(case, TOL[np.float32], k_scale=k_scale, v_scale=v_scale)
  check(case, TOL[np.float32], k_scale=k_scale, v_scale=v_scale, sliding_window=9)


@pytest.mark.parametrize("block_q", [1, 32])
def test_block_sizes(block_q):
  """block_q 1 (raised to 16 / G'), and larger than most chunks: same result."""
  case = make_case([(64, 40), (17, 1), (20, 20)], n=8, k=2, h=64, pad_rows=1)
  check(case, TOL[np.float32], block_q=block_q)


def test_traced_num_seqs():
  """One jit serves every num_seqs, 0 included (all padding: zeros)."""
  case = make_case([(33, 5), (1, 1), (17, 3)], n=4, k=1, h=64, pad_rows=1)
  fn = jax.jit(lambda num_seqs, c: ragged_paged_attention(**c, num_seqs=num_seqs, interpret=True))
  rest = {key: v for key, v in case.items() if key != "num_seqs"}
  for num_seqs in (0, 1, 2, 3):
    got = np.asarray(fn(jnp.int32(num_seqs), rest))
    want = np.asarray(_reference(**rest, num_seqs=num_seqs))
    np.testing.assert_allclose(got, want, atol=TOL[np.float32], rtol=TOL[np.float32])
  assert fn._cache_size() == 1
  assert not np.any(np.asarray(fn(jnp.int32(0), rest)))


def test_refuses_bad_shapes():
  case = make_case([(5, 5)], n=4, k=2, h=64)
  with pytest.raises(ConfigError, match="page_size"):
    ragged_paged_attention(**{**case, "k_pages": case["k_pages"][:, :12], "v_pages": case["v_pages"][:, :12]})
  with pytest.raises(ConfigError, match="head_dim"):
    ragged_paged_attention(**{**case, "q": case["q"][..., :48], "k_pages": case["k_pages"][..., :48],
                              "v_pages": case["v_pages"][..., :48]})
  with pytest.raises(ConfigError, match="block_q"):
    ragged_paged_attention(**case, block_q=3)
  with pytest.raises(ConfigError, match="KV heads"):
    ragged_paged_attention(**{**case, "q": case["q"][:, :3]})
