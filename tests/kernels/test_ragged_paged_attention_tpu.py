"""The TPU ragged paged attention kernel (Pallas TPU interpret mode: DMAs, semaphores and uninitialised VMEM,
NaN-filled, simulated on CPU) against `ragged_paged_attention_reference`: float32 within 1e-5 and bfloat16
within 2e-2 over decode-only, prefill-only and mixed calls; KV lengths 1, a page - 1, a page + 1 and a full page
table; page sizes 16, 32 and 128; group sizes 7, 6, 5 and 8 with one or two KV heads at head dims 64 and 128;
sliding windows; int8 pages with their scales; one to three pages per DMA step (three not dividing the table);
pages past a sequence's length or before its window poisoned with NaN (never copied, or never weighed); garbage
entries past num_seqs; num_seqs 0; no DMA races; the page range each query block copies, by hand; bad arguments
refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_paged_attention
from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # the race detector's state
from jax.experimental.pallas import tpu as pltpu
from test_paged_attention import make_case as paged_case

from qwenjax import ConfigError
from qwenjax.kernels.paged_attention import quantize_kv, ragged_paged_attention_reference
from qwenjax.kernels.ragged_paged_attention_tpu import _visible_pages, ragged_paged_attention_tpu

TOL = {np.float32: 1e-5, jnp.bfloat16: 2e-2}

_reference = jax.jit(ragged_paged_attention_reference, static_argnames=("sliding_window",))


@pytest.fixture
def case_maker(monkeypatch):
  """test_paged_attention's random pool and packed batch at any page size (its PAGE, set for this test), with q
  and the pages in `dtype`."""

  def make(seqs, *, n, k, h, page=16, dtype=np.float32, **kwargs):
    monkeypatch.setattr(test_paged_attention, "PAGE", page)
    case = paged_case(seqs, n=n, k=k, h=h, **kwargs)
    return {name: jnp.asarray(v, dtype) if name in ("q", "k_pages", "v_pages") else v for name, v in case.items()}

  return make


def poison_unseen_pages(case, window=None):
  """A copy of the case with one NaN page appended to the pool and every table entry that no query of its
  sequence may see (past its length; wholly before the window of its first query) pointed at it."""
  case = dict(case)
  page = case["k_pages"].shape[1]
  table = np.array(case["page_indices"])
  nan_page = case["k_pages"].shape[0]
  for i in range(case["num_seqs"]):
    kv_len, q_len = int(case["kv_lens"][i]), int(case["cu_q_lens"][i + 1] - case["cu_q_lens"][i])
    first_key = 0 if window is None else max(kv_len - q_len - window + 1, 0)
    for j in range(table.shape[1]):
      if j * page >= kv_len or (j + 1) * page <= first_key:
        table[i, j] = nan_page
  for name in ("k_pages", "v_pages"):
    case[name] = jnp.concatenate([case[name], jnp.full_like(case[name][:1], jnp.nan)])
  case["page_indices"] = table
  return case


def check(case, tol, *, poisoned=None, **kwargs):
  """Kernel (on `poisoned`, when given, else on `case`) against the reference on `case`; returns the max error."""
  window = kwargs.pop("sliding_window", None)
  scales = {key: v for key, v in kwargs.items() if key.endswith("_scale")}
  kwargs.setdefault("interpret", True)
  got = ragged_paged_attention_tpu(**(poisoned or case), sliding_window=window, **kwargs)
  want = _reference(**case, sliding_window=window, **scales)
  assert got.shape == want.shape and got.dtype == want.dtype
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  t_real = int(case["cu_q_lens"][case["num_seqs"]])
  assert not np.any(got[t_real:]), "padding rows must be zeros"
  return float(np.abs(got - want).max())


# (name, seqs, n, k, h, page, pages_per_seq, window, pages_per_block, pad_rows, pad_seqs)
CASES = [
    ("decode_g6_h128", [(1, 1), (15, 1), (16, 1), (17, 1), (64, 1)], 12, 2, 128, 16, 4, None, 1, 2, 1),
    ("prefill_g7_h64", [(40, 40), (17, 17), (1, 1)], 14, 2, 64, 16, 4, None, 2, 0, 0),
    ("mixed_g8_h64_full_table", [(64, 20), (1, 1), (33, 5), (17, 1)], 8, 1, 64, 16, 4, None, 3, 3, 2),
    ("mixed_g5_h128_page32", [(31, 3), (33, 33), (1, 1), (128, 2)], 5, 1, 128, 32, 4, None, 2, 1, 1),
    ("mixed_g7_h64_page128", [(127, 1), (129, 9), (1, 1)], 7, 1, 64, 128, 2, None, 1, 1, 0),
    ("window_g7_h64", [(64, 40), (17, 1), (50, 50), (3, 1)], 7, 1, 64, 16, 4, 7, 2, 2, 1),
    ("window_g6_h128_page32", [(96, 1), (70, 33), (33, 2)], 12, 2, 128, 32, 3, 20, 1, 0, 0),
]


@pytest.mark.parametrize("name,seqs,n,k,h,page,pages_per_seq,window,pages_per_block,pad_rows,pad_seqs", CASES,
                         ids=[c[0] for c in CASES])
def test_matches_reference_float32(case_maker, name, seqs, n, k, h, page, pages_per_seq, window, pages_per_block,
                                   pad_rows, pad_seqs):
  case = case_maker(seqs, n=n, k=k, h=h, page=page, pages_per_seq=pages_per_seq, pad_rows=pad_rows,
                    pad_seqs=pad_seqs, seed=len(name))
  check(case, TOL[np.float32], poisoned=poison_unseen_pages(case, window), sliding_window=window,
        pages_per_block=pages_per_block)


def test_matches_reference_bfloat16(case_maker):
  case = case_maker([(33, 5), (1, 1), (64, 20), (17, 1)], n=14, k=2, h=128, pad_rows=2, pad_seqs=1,
                    dtype=jnp.bfloat16)
  check(case, TOL[jnp.bfloat16], pages_per_block=2)
  check(case, TOL[jnp.bfloat16], sliding_window=5)


def test_int8_pages(case_maker):
  case = case_maker([(33, 5), (1, 1), (64, 20), (16, 1)], n=10, k=2, h=64, pad_rows=2, pad_seqs=1)
  (case["k_pages"], k_scale), (case["v_pages"], v_scale) = quantize_kv(case["k_pages"]), quantize_kv(case["v_pages"])
  check(case, TOL[np.float32], k_scale=k_scale, v_scale=v_scale, pages_per_block=2)
  check(case, TOL[np.float32], k_scale=k_scale, v_scale=v_scale, sliding_window=9, block_q=4)


def test_double_buffering_has_no_races(case_maker):
  """The interpreter's race detector, two cores taking the parallel grid: no DMA into a buffer slot while that
  slot is read, none read before its copy is waited for."""
  case = case_maker([(64, 20), (1, 1), (33, 5), (17, 1)], n=8, k=1, h=64, pad_rows=3, pad_seqs=2)
  check(case, TOL[np.float32], pages_per_block=3,
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2))
  assert not interpret_pallas_call.races.races_found


def test_copies_only_the_pages_a_block_sees():
  """Per query block (first position, rows), the table slots [lo, hi) copied, counted by hand at page 16: a decode
  row at a page's last and first slot, a 40-row prefill in blocks of 16, an empty block; then with a window of 7."""
  pos0 = jnp.array([15, 16, 63, 0, 16, 32, 5], jnp.int32)
  rows = jnp.array([1, 1, 1, 16, 16, 8, 0], jnp.int32)
  lo, hi = _visible_pages(pos0, rows, 16, None)
  assert lo.tolist() == [0, 0, 0, 0, 0, 0, 0] and hi.tolist() == [1, 2, 4, 1, 2, 3, 0]
  lo, hi = _visible_pages(pos0, rows, 16, 7)  # first keys 9, 10, 57, 0, 10, 26
  assert lo.tolist() == [0, 0, 3, 0, 0, 1, 0] and hi.tolist() == [1, 2, 4, 1, 2, 3, 0]


def test_no_sequences_gives_zeros(case_maker):
  case = case_maker([(5, 2)], n=4, k=1, h=64, pad_rows=3)
  got = ragged_paged_attention_tpu(**{**case, "num_seqs": 0}, interpret=True)
  assert got.shape == case["q"].shape and not np.any(np.asarray(got))


def test_refuses_bad_arguments(case_maker):
  case = case_maker([(5, 5)], n=4, k=2, h=64)
  with pytest.raises(ConfigError, match="page_size"):
    ragged_paged_attention_tpu(**{**case, "k_pages": case["k_pages"][:, :12], "v_pages": case["v_pages"][:, :12]})
  with pytest.raises(ConfigError, match="block_q"):
    ragged_paged_attention_tpu(**case, block_q=0)
  with pytest.raises(ConfigError, match="KV heads"):
    ragged_paged_attention_tpu(**{**case, "q": case["q"][:, :3]})
