"""Host-side bookkeeping of the paged KV cache: which pages are free, which pages each sequence holds, and which
hold a prompt prefix that later sequences may read.

`PagePool` hands out page ids of a pool of `num_pages` pages and counts each page's holders; `SequencePages` is one
sequence's page table, growing by whole pages as its length grows, and gives the flat slots (page * page_size +
offset, as `qwenjax.kernels.paged_attention.write_pages` takes them) of its new tokens.

Prefix sharing (the engine's `prefix_caching`): `prefix_hashes` chains a digest over each full page of a prompt's
tokens (page i's digest covers tokens 0 .. (i + 1) * page_size - 1 and whatever else the keys depend on), and the
pool keeps a table digest -> page. A page registered with a digest (a full prompt page) or with its first tokens (a
prompt's partial last page, which later prompts may copy) outlives its last holder: it stays cached, unreferenced,
until `alloc` runs out of free pages and evicts the least recently released one. Every id is at any time exactly
one of free, held (its count of holders >= 1) or cached (unreferenced, registered).
Plain Python and numpy: nothing here touches a device.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from qwenjax._errors import QwenJaxError


class OutOfPages(QwenJaxError):
  """The page pool holds fewer free pages than a request for pages needs (the caller preempts or waits)."""


def prefix_root(extra: bytes = b"") -> bytes:
  """The digest that page 0's chains from: a 16-byte blake2b of `extra`, what a prompt's keys and values depend on
  besides its tokens (nothing for text; a Qwen2.5-VL prompt's images and videos)."""
  return hashlib.blake2b(b"qwenjax-prefix:" + extra, digest_size=16).digest()


def prefix_hashes(tokens: Sequence[int], page_size: int, root: bytes = prefix_root()) -> list[bytes]:
  """The chained digest of each full page of `tokens` ([len(tokens) // page_size] of 16 bytes): page i's is the
  blake2b of page i - 1's (page -1's: `root`) and page i's tokens. Two prompts' page i digests are equal exactly
  when their first (i + 1) * page_size tokens and roots are (short of a 128-bit collision); a partial last page
  has none."""
  full = len(tokens) // page_size
  ids = np.asarray(tokens[:full * page_size], np.int64).reshape(full, page_size)
  out, parent = [], root
  for row in ids:
    parent = hashlib.blake2b(parent + row.tobytes(), digest_size=16).digest()
    out.append(parent)
  return out


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
  """How many leading tokens the 1-D arrays a and b share."""
  n = min(len(a), len(b))
  differ = np.flatnonzero(a[:n] != b[:n])
  return int(differ[0]) if len(differ) else n


@dataclasses.dataclass(frozen=True)
class _Entry:
  """What a registered page holds: `tokens` [<= page_size] after the prefix whose digest is `parent`; `digest` its
  own (a full page), or None (a partial page, only ever copied)."""

  parent: bytes
  digest: bytes | None
  tokens: np.ndarray


class PagePool:
  """The ids 0 .. num_pages - 1 of a pool of KV pages. `alloc` takes free pages (a stack: lowest ids first, then
  the most recently freed), then evicts cached ones, least recently released first; `free` drops one holder of
  each page given; `acquire` adds a holder to a registered page (held or cached). Every id is free, held or
  cached, never two, and a page is never freed more often than it was held."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"a page pool needs num_pages >= 1 and page_size >= 1; got {num_pages} and {page_size}.")
    self.num_pages = num_pages
    self.page_size = page_size
    self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest id on top
    self._refs: dict[int, int] = {}  # held pages: how many holders each
    self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # least recently released first
    self._entries: dict[int, _Entry] = {}  # registered pages (held or cached)
    self._by_digest: dict[bytes, int] = {}
    self._children: dict[bytes, dict[int, None]] = {}  # parent digest -> registered pages under it, in order

  @property
  def num_free(self) -> int:
    """Pages `alloc` can hand out: the free ones and the cached ones it would evict."""
    return len(self._free) + len(self._cached)

  def refcount(self, page: int) -> int:
    """How many holders the page has (0: free or cached)."""
    return self._refs.get(page, 0)

  def state(self, page: int) -> str:
    """"free", "held" or "cached"."""
    if page in self._refs:
      return "held"
    return "cached" if page in self._cached else "free"

  def alloc(self, n: int) -> list[int]:
    """Takes n pages, all or none: free ones first, then cached ones, least recently released first (their
    registrations dropped). Raises OutOfPages (and takes nothing) when fewer than n are free or cached."""
    if n < 0:
      raise ValueError(f"cannot allocate {n} pages.")
    if n > self.num_free:
      raise OutOfPages(f"the page pool has {self.num_free} free pages of {self.num_pages}; {n} were asked for.")
    ids = []
    for _ in range(n):
      if self._free:
        page = self._free.pop()
      else:
        page, _ = self._cached.popitem(last=False)
        self._forget(page)
      self._refs[page] = 1
      ids.append(page)
    return ids

  def acquire(self, page: int) -> None:
    """One more holder of a registered page (one that `lookup` or `longest_child` named): a cached page is held
    again and leaves the eviction order."""
    if page not in self._entries:
      raise ValueError(f"page {page} holds no registered prefix; only those are shared.")
    if page in self._cached:
      del self._cached[page]
    self._refs[page] = self._refs.get(page, 0) + 1

  def free(self, ids) -> None:
    """Drops one holder of each page of `ids`. A page's last holder gone, it is free, or, registered, cached (most
    recently released last, in the order given). An id that is not held (unknown, or freed already) or listed
    twice is an error, and then nothing is freed."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if i not in self._refs]
    if bad or len(set(ids)) != len(ids):
      culprit = bad[0] if bad else next(i for i in ids if ids.count(i) > 1)
      raise ValueError(f"page {culprit} is not held (out of range, already free, or listed twice); freed nothing.")
    unregistered = []
    for page in ids:
      self._refs[page] -= 1
      if self._refs[page]:
        continue
      del self._refs[page]
      if page in self._entries:
        self._cached[page] = None
      else:
        unregistered.append(page)
    self._free.extend(reversed(sorted(unregistered)))

  def register(self, page: int, parent: bytes, tokens: Sequence[int], digest: bytes | None = None) -> bool:
    """Records what held `page` holds once written: `tokens` after the prefix `parent` (`prefix_root` for page 0),
    under `digest` for a full page (`prefix_hashes`), or, digest None, the first tokens of a partial page. Returns
    whether it registered: a page registers once, and a digest another page holds already is not taken again."""
    if page not in self._refs:
      raise ValueError(f"page {page} is not held; only a holder that wrote it registers it.")
    if page in self._entries or (digest is not None and digest in self._by_digest):
      return False
    self._entries[page] = _Entry(parent, digest, np.asarray(tokens, np.int64))
    if digest is not None:
      self._by_digest[digest] = page
    self._children.setdefault(parent, {})[page] = None
    return True

  def lookup(self, digest: bytes) -> int | None:
    """The registered page of a full-page digest, or None."""
    return self._by_digest.get(digest)

  def longest_child(self, parent: bytes, tokens: Sequence[int]) -> tuple[int | None, int]:
    """Of the pages registered under `parent`, the one whose tokens begin with the longest prefix of `tokens`:
    (page, how many tokens), or (None, 0)."""
    tokens = np.asarray(tokens, np.int64)
    best, most = None, 0
    for page in self._children.get(parent, ()):
      n = common_prefix(self._entries[page].tokens, tokens)
      if n > most:
        best, most = page, n
    return best, most

  def _forget(self, page: int) -> None:
    entry = self._entries.pop(page)
    if entry.digest is not None:
      del self._by_digest[entry.digest]
    siblings = self._children[entry.parent]
    del siblings[page]
    if not siblings:
      del self._children[entry.parent]


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

  def adopt(self, pages: Sequence[int], length: int) -> None:
    """Starts the empty table with pages the sequence holds already (the caller took a hold on each: shared prefix
    pages, a private copy of a partial one) whose first `length` positions are written."""
    if self.pages or pages_needed(length, self.pool.page_size) != len(pages):
      raise ValueError(f"an empty table adopts the {pages_needed(length, self.pool.page_size)} pages of {length} "
                       f"positions; got {len(pages)} pages for a table holding {len(self.pages)}.")
    self.pages, self.length = list(pages), length

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

  def shrink(self, length: int) -> None:
    """Sets the table back to its first `length` positions (a speculative step's refused tokens), freeing the
    pages wholly past them; the last page kept may hold stale positions past `length`, which no query reads and
    the next tokens overwrite."""
    if not 0 <= length <= self.length:
      raise ValueError(f"a table of {self.length} positions cannot shrink to {length}.")
    keep = pages_needed(length, self.pool.page_size)
    self.pool.free(self.pages[keep:][::-1])
    del self.pages[keep:]
    self.length = length

  def release(self) -> None:
    """Lets go of every page (the sequence ended or was preempted), its last page first: of its cached pages, those
    deepest into the prompt are evicted first, the prefix that others share last."""
    self.pool.free(self.pages[::-1])
    self.pages, self.length = [], 0

  def page_row(self, width: int) -> np.ndarray:
    """The page table as one row of `page_indices`: [width] int32, padded with 0 (never read: masked by length)."""
    if len(self.pages) > width:
      raise ValueError(f"the sequence holds {len(self.pages)} pages; a page table row of {width} cannot hold them.")
    row = np.zeros(width, np.int32)
    row[:len(self.pages)] = self.pages
    return row
