"""Host-side page bookkeeping: the pool hands out each page to one holder at a time, refuses (all or nothing, with
how many are free) when it runs dry, and takes pages back once; a sequence's table grows by whole pages and gives
the flat slots of its new tokens."""

import numpy as np
import pytest

from qwenjax import QwenJaxError
from qwenjax.engine.pages import OutOfPages, PagePool, SequencePages, pages_needed


def test_pool_hands_out_and_takes_back():
  pool = PagePool(5, page_size=4)
  assert pool.num_free == 5
  a = pool.alloc(2)
  b = pool.alloc(3)
  assert a == [0, 1] and b == [2, 3, 4] and pool.num_free == 0
  assert pool.alloc(0) == []
  pool.free(a)
  assert pool.num_free == 2
  c = pool.alloc(2)
  assert sorted(c) == [0, 1] and not set(c) & set(b)


def test_an_empty_pool_refuses_and_takes_nothing():
  pool = PagePool(3, page_size=4)
  held = pool.alloc(2)
  with pytest.raises(OutOfPages, match=r"the page pool has 1 free pages of 3; 2 were asked for"):
    pool.alloc(2)
  assert pool.num_free == 1 and issubclass(OutOfPages, QwenJaxError)
  pool.free(held)
  assert pool.num_free == 3 and sorted(pool.alloc(3)) == [0, 1, 2]


def test_bad_frees_name_the_page_and_free_nothing():
  pool = PagePool(4, page_size=2)
  held = pool.alloc(2)
  for bad, page in (([held[0], 3], 3), ([9], 9), ([held[0], held[0]], held[0])):
    with pytest.raises(ValueError, match=rf"page {page} is not held"):
      pool.free(bad)
    assert pool.num_free == 2
  pool.free(held)
  with pytest.raises(ValueError, match=rf"page {held[0]} is not held"):
    pool.free(held[:1])  # freed twice
  with pytest.raises(ValueError, match=r"num_pages >= 1"):
    PagePool(0, page_size=2)


def test_random_churn_keeps_every_page_with_one_holder():
  rng = np.random.default_rng(0)
  pool = PagePool(32, page_size=8)
  held: list[list[int]] = []
  for _ in range(300):
    if held and rng.random() < 0.5:
      pool.free(held.pop(rng.integers(len(held))))
    else:
      n = int(rng.integers(0, 6))
      if n > pool.num_free:
        with pytest.raises(OutOfPages):
          pool.alloc(n)
      else:
        held.append(pool.alloc(n))
    flat = [p for ids in held for p in ids]
    assert len(flat) == len(set(flat)) and len(flat) + pool.num_free == 32 and all(0 <= p < 32 for p in flat)


def test_a_sequence_grows_by_whole_pages():
  pool = PagePool(8, page_size=4)
  other = SequencePages(pool)
  seq = SequencePages(pool)
  np.testing.assert_array_equal(seq.grow(3), [0, 1, 2])  # page 0
  other.grow(1)  # takes page 1
  np.testing.assert_array_equal(seq.grow(1), [3])  # page 0 full, no new page
  np.testing.assert_array_equal(seq.grow(6), [8, 9, 10, 11, 12, 13])  # pages 2 and 3
  assert seq.pages == [0, 2, 3] and seq.length == 10 and seq.grow(0).shape == (0,)
  np.testing.assert_array_equal(seq.page_row(5), [0, 2, 3, 0, 0])
  with pytest.raises(ValueError, match=r"holds 3 pages; a page table row of 2"):
    seq.page_row(2)
  # Slots agree with the page table for every position.
  positions = np.arange(seq.length)
  slots = np.asarray(seq.pages)[positions // 4] * 4 + positions % 4
  np.testing.assert_array_equal(slots[:3], [0, 1, 2])
  assert pages_needed(0, 4) == 0 and pages_needed(4, 4) == 1 and pages_needed(5, 4) == 2


def test_growth_past_the_pool_leaves_the_table_unchanged():
  pool = PagePool(3, page_size=4)
  seq = SequencePages(pool)
  seq.grow(5)
  with pytest.raises(OutOfPages, match=r"1 free pages of 3; 2 were asked for"):
    seq.grow(8)  # needs 4 pages in all
  assert seq.pages == [0, 1] and seq.length == 5 and pool.num_free == 1
  np.testing.assert_array_equal(seq.grow(4), [5, 6, 7, 8])  # position 8 opens page 2
  assert seq.pages == [0, 1, 2] and pool.num_free == 0
  seq.release()
  assert pool.num_free == 3 and seq.pages == [] and seq.length == 0
