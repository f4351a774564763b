"""Host-side bookkeeping of the paged KV cache: which pages are free, and which pages each sequence holds.

`PagePool` hands out page ids of a pool of `num_pages` pages and takes them back; `SequencePages` is one
sequence's page table, growing by whole pages as its length grows, and gives the flat slots
(page * page_size + offset, as `qwenjax.kernels.paged_attention.write_pages` takes them) of its new tokens.
Plain Python and numpy: nothing here touches a device.
"""

from __future__ import annotations

import numpy as np

from qwenjax._errors import QwenJaxError


class OutOfPages(QwenJaxError):
  """The page pool holds fewer free pages than a request for pages needs (the caller preempts or waits)."""


class PagePool:
  """The ids 0 .. num_pages - 1 of a pool of KV pages; `alloc` takes free ones (a stack: lowest ids first, then
  the most recently freed), `free` returns them. Every id is either free or held, never both, and never freed
  twice."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"a page pool needs num_pages >= 1 and page_size >= 1; got {num_pages} and {page_size}.")
    self.num_pages = num_pages
    self.page_size = page_size
    self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest id on top
    self._held: set[int] = set()

  @property
  def num_free(self) -> int:
    return len(self._free)

  def alloc(self, n: int) -> list[int]:
    """Takes n free pages, all or none: raises OutOfPages (and takes nothing) when fewer than n are free."""
    if n < 0:
      raise ValueError(f"cannot allocate {n} pages.")
    if n > len(self._free):
      raise OutOfPages(f"the page pool has {len(self._free)} free pages of {self.num_pages}; {n} were asked for.")
    ids = [self._free.pop() for _ in range(n)]
    self._held.update(ids)
    return ids

  def free(self, ids) -> None:
    """Returns held pages to the pool; an id that is not held (unknown, or freed already) is an error, and then
    nothing is freed."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if i not in self._held]
    if bad or len(set(ids)) != len(ids):
      culprit = bad[0] if bad else next(i for i in ids if ids.count(i) > 1)
      raise ValueError(f"page {culprit} is not held (out of range, already free, or listed twice); freed nothing.")
    self._held.difference_update(ids)
    self._free.extend(reversed(sorted(ids)))


def pages_needed(length: int, page_size: int) -> int:
  """Pages that hold `length` tokens."""
  return -(-length // page_size)


class SequencePages:
  """One sequence's page table: `pages[i]` holds its positions i * page_size .. (i + 1) * page_size - 1, and
  `length` positions are in use."""

  def __init__(self, pool: PagePool):
    self.pool = pool
    self.pages: list[int] = []
    self.length = 0

  def grow(self, num_new: int) -> np.ndarray:
    """Makes room for `num_new` more tokens (taking pages from the pool as whole pages fill) and returns their
    slots, [num_new] int32, for positions length .. length + num_new - 1. If the pool runs dry it raises
    OutOfPages and the table is unchanged."""
    if num_new < 0:
      raise ValueError(f"a sequence cannot grow by {num_new} tokens.")
    ps = self.pool.page_size
    self.pages.extend(self.pool.alloc(pages_needed(self.length + num_new, ps) - len(self.pages)))
    positions = np.arange(self.length, self.length + num_new)
    self.length += num_new
    return (np.asarray(self.pages, np.int64)[positions // ps] * ps + positions % ps).astype(np.int32)

  def release(self) -> None:
    """Returns every page to the pool (the sequence ended or was preempted)."""
    self.pool.free(self.pages)
    self.pages, self.length = [], 0

  def page_row(self, width: int) -> np.ndarray:
    """The page table as one row of `page_indices`: [width] int32, padded with 0 (never read: masked by length)."""
    if len(self.pages) > width:
      raise ValueError(f"the sequence holds {len(self.pages)} pages; a page table row of {width} cannot hold them.")
    row = np.zeros(width, np.int32)
    row[:len(self.pages)] = self.pages
    return row
