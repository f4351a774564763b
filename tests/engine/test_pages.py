"""Host-side page bookkeeping: the pool hands out each page to one holder at a time, refuses (all or nothing, with
how many are free) when it runs dry, and takes pages back once; a sequence's table grows by whole pages and gives
the flat slots of its new tokens. Prefix sharing: reference counts, registered pages cached after their last
holder and evicted least recently released first, chained block hashes."""

import numpy as np
import pytest

from qwenjax import QwenJaxError
from qwenjax.engine.pages import (
  OutOfPages,
  PagePool,
  SequencePages,
  common_prefix,
  pages_needed,
  prefix_hashes,
  prefix_root,
)


def _num_cached(pool: PagePool) -> int:
  """Registered pages that no one holds (evictable), from the pool's public state."""
  return sum(pool.state(page) == "cached" for page in range(pool.num_pages))


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


# ---- prefix sharing: reference counts, cached pages, LRU eviction, block hashes ----------------------------------


def test_a_shared_page_is_freed_by_its_last_holder_and_a_registered_one_stays_cached():
  pool = PagePool(4, page_size=2)
  a, b = pool.alloc(2)
  root = prefix_root()
  assert pool.register(a, root, [7, 8], b"d" * 16) and not pool.register(a, root, [7, 8], b"e" * 16)  # once
  assert not pool.register(b, root, [7, 8], b"d" * 16)  # a digest another page holds: not taken again
  with pytest.raises(ValueError, match=r"page 3 is not held"):
    pool.register(3, root, [1], None)
  pool.acquire(a)  # a second holder
  assert pool.refcount(a) == 2 and pool.num_free == 2
  pool.free([a])
  assert pool.state(a) == "held" and pool.refcount(a) == 1
  pool.free([a, b])
  # a holds a registered prefix: cached (yet allocatable); b holds none: free.
  assert pool.state(a) == "cached" and pool.state(b) == "free" and pool.num_free == 4 and _num_cached(pool) == 1
  assert pool.lookup(b"d" * 16) == a and pool.refcount(a) == 0
  with pytest.raises(ValueError, match=rf"page {a} is not held"):
    pool.free([a])  # cached is not held: no double free
  with pytest.raises(ValueError, match=rf"page {b} holds no registered prefix"):
    pool.acquire(b)
  pool.acquire(a)  # a cached page is held again, out of the eviction order
  assert pool.state(a) == "held" and _num_cached(pool) == 0 and pool.num_free == 3


def test_alloc_takes_free_pages_first_then_evicts_the_least_recently_released():
  pool = PagePool(5, page_size=2)
  pages = pool.alloc(5)
  root = prefix_root()
  for i, p in enumerate(pages):
    pool.register(p, root, [i], None if i % 2 else bytes([i]) * 16)
  pool.free([pages[3], pages[1]])  # released in this order: 3 least recently
  pool.free([pages[4]])
  assert pool.num_free == 3 and _num_cached(pool) == 3 and pool.alloc(0) == []
  pool.acquire(pages[3])  # used again, then released last: now the most recent
  pool.free([pages[3]])
  assert pool.alloc(1) == [pages[1]]  # no free page: the least recently released cached one
  assert pool.longest_child(root, [1]) == (None, 0)  # its registration is gone with it
  assert pool.alloc(1) == [pages[4]] and pool.lookup(bytes([4]) * 16) is None
  pool.free([pages[0]])  # registered: cached, not free
  assert [pool.state(p) for p in pages] == ["cached", "held", "held", "cached", "held"]
  with pytest.raises(OutOfPages, match=r"the page pool has 2 free pages of 5; 3 were asked for"):
    pool.alloc(3)
  assert pool.alloc(2) == [pages[3], pages[0]] and pool.num_free == 0


def test_longest_child_finds_the_page_sharing_most_of_the_next_tokens():
  pool = PagePool(4, page_size=4)
  a, b, c, d = pool.alloc(4)
  root, other = prefix_root(), prefix_root(b"image")
  pool.register(a, root, [1, 2, 3, 4], b"a" * 16)
  pool.register(b, root, [1, 2, 9], None)  # a partial page
  pool.register(c, other, [1, 2, 3, 4], b"c" * 16)
  assert pool.longest_child(root, [1, 2, 3, 5]) == (a, 3)
  assert pool.longest_child(root, [1, 2, 9, 9]) == (b, 3)
  assert pool.longest_child(root, [2]) == (None, 0) and pool.longest_child(b"x" * 16, [1]) == (None, 0)
  assert pool.longest_child(other, [1, 2]) == (c, 2)
  assert common_prefix(np.array([1, 2, 3]), np.array([1, 2])) == 2 and d not in (a, b, c)


def test_random_churn_with_sharing_keeps_every_page_free_held_or_cached():
  """Holders take fresh pages, share registered ones, register and let go at random; the pool's counts and states
  always equal those of a plain model of it (a list of holders per page, the pages registered)."""
  rng = np.random.default_rng(1)
  n = 24
  pool = PagePool(n, page_size=4)
  holders: list[list[int]] = []
  registered: dict[int, bytes] = {}  # page -> digest, as the model sees it
  root = prefix_root()
  for step in range(600):
    r = rng.random()
    if holders and r < 0.4:
      pool.free(holders.pop(int(rng.integers(len(holders)))))
    elif registered and r < 0.6:
      page = int(rng.choice(list(registered)))
      pool.acquire(page)
      holders.append([page])
    else:
      k = int(rng.integers(0, 4))
      counts = {p: sum(h.count(p) for h in holders) for p in range(n)}
      if k > sum(1 for p in range(n) if not counts[p]):
        with pytest.raises(OutOfPages):
          pool.alloc(k)
        continue
      ids = pool.alloc(k)
      assert all(not counts[p] for p in ids)  # never a held page
      unheld = [p for p in range(n) if not counts[p]]
      free_ones = [p for p in unheld if p not in registered]
      # Free pages go first; a registered page is evicted only once none is free.
      assert sum(p in registered for p in ids) == max(0, k - len(free_ones))
      for p in ids:
        registered.pop(p, None)
        if rng.random() < 0.5:
          digest = step.to_bytes(4, "little") + bytes([p]) * 12
          assert pool.register(p, root, [p], digest)
          registered[p] = digest
      holders.append(ids)
    counts = {p: sum(h.count(p) for h in holders) for p in range(n)}
    for p in range(n):
      want = "held" if counts[p] else "cached" if p in registered else "free"
      assert pool.state(p) == want and pool.refcount(p) == counts[p]
    assert pool.num_free == sum(1 for p in range(n) if not counts[p])
    assert all(pool.lookup(d) == p for p, d in registered.items())


def test_block_hashes_chain_each_full_page_on_its_parent():
  """The digest of page i is blake2b(digest of page i - 1 + its tokens as int64), from the root's."""
  import hashlib

  ps = 4
  tokens = list(range(10, 21))  # two full pages and three tokens
  hashes = prefix_hashes(tokens, ps)
  assert len(hashes) == 2 and all(len(h) == 16 for h in hashes)
  parent = hashlib.blake2b(b"qwenjax-prefix:", digest_size=16).digest()
  assert prefix_root() == parent
  for i, h in enumerate(hashes):
    parent = hashlib.blake2b(parent + np.asarray(tokens[i * ps:(i + 1) * ps], np.int64).tobytes(),
                             digest_size=16).digest()
    assert h == parent
  changed = tokens[:5] + [99] + tokens[6:]  # a token of page 1
  assert prefix_hashes(changed, ps)[0] == hashes[0] and prefix_hashes(changed, ps)[1] != hashes[1]
  assert prefix_hashes(tokens[:8] + [0, 0, 0], ps) == hashes  # the partial page is not hashed
  assert prefix_hashes(tokens[:3], ps) == []
  other = prefix_hashes(tokens, ps, prefix_root(b"images"))
  assert all(a != b for a, b in zip(other, hashes))  # another root: no page in common


def test_a_sequence_adopts_shared_pages_and_releases_its_tail_first():
  pool = PagePool(6, page_size=4)
  root = prefix_root()
  owner = SequencePages(pool)
  owner.grow(8)
  shared = list(owner.pages)
  for i, p in enumerate(shared):
    pool.register(p, root, [i] * 4, bytes([i + 1]) * 16)
  reader = SequencePages(pool)
  for p in shared:
    pool.acquire(p)
  copy = pool.alloc(1)[0]
  reader.adopt(shared + [copy], 8 + 3)  # two shared pages and 3 tokens of a private copy
  slots = reader.grow(2)  # positions 11 (the copy's last slot) and 12 (a new page)
  assert reader.length == 13 and slots.tolist() == [copy * 4 + 3, reader.pages[3] * 4]
  with pytest.raises(ValueError, match=r"an empty table adopts the 2 pages of 5 positions; got 1"):
    SequencePages(pool).adopt([1], 5)
  owner.release()
  assert [pool.refcount(p) for p in shared] == [1, 1]
  reader.release()
  assert pool.num_free == 6 and _num_cached(pool) == 2
  # The four unregistered pages are free; then the cached ones go, the prompt's deeper page first.
  assert pool.alloc(6)[4:] == [shared[1], shared[0]]
