"""The KV cache's host side behind one interface: the page pool and the prefix cache.

    kv = KVManager(PagePool(num_pages, page_size), prefix_caching=True)
    match = kv.match(seq, pending)          # what of seq's context cached pages hold
    seq.pages = kv.admit(seq, match, copies, pending)
    kv.register(seq)                        # once prefilled: its pages readable by later prompts
    kv.release(seq)

The scheduler asks it what an admission costs and takes the pages; it never sees block hashes or the pool's
eviction order. Host only: no jax.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwenjax.engine.pages import PagePool, SequencePages, common_prefix, pages_needed, prefix_hashes
from qwenjax.engine.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class PrefixMatch:
  """What an admission reads of a sequence's context from cached pages. pages: full pages it shares (by block
  hash); copy: (a registered page, m) whose first m tokens continue the context, copied into a private page;
  hashes: the context's full-page digests; wait: a sequence admitted this round writes a page that shares more of
  the context than the cache holds, so this one waits for the next round and reads it."""

  pages: list[int]
  copy: tuple[int, int] | None
  hashes: list[bytes]
  wait: bool = False


NO_MATCH = PrefixMatch([], None, [])


class KVManager:
  """The page pool and, with prefix_caching, the prefix cache: sequences that share a prompt prefix read its keys
  and values from the same pages (full pages found by their chained block hash, plus a copy of the shared start of
  a partial page); pages that held a prefix stay cached when released, evicted least recently used first."""

  def __init__(self, pool: PagePool, prefix_caching: bool = True):
    self.pool = pool
    self.prefix_caching = bool(prefix_caching)
    self.cached_tokens = 0  # context tokens admissions read from shared pages

  @property
  def page_size(self) -> int:
    return self.pool.page_size

  @property
  def pages_in_use(self) -> int:
    """Pages some sequence holds (cached pages that no sequence holds count as free)."""
    return self.pool.num_pages - self.pool.num_free

  def match(self, seq: Sequence, pending: dict[bytes, list[np.ndarray]]) -> PrefixMatch:
    """The cached pages seq's context can start from: the longest run of full pages whose block hashes the pool
    holds, then the registered page under the last one that shares most of the next tokens (copied, if at least
    page_size / 8 of them). At most len(context) - 1 tokens: the last is computed, its logits give the next token.
    The first sample of a request with prompt_logprobs shares nothing (its prefill scores every prompt token); its
    other samples do. `pending`: the pages sequences admitted this round are about to write (not yet readable)."""
    if not self.prefix_caching:
      return NO_MATCH
    ps, context = self.page_size, seq.context
    hashes = prefix_hashes(context, ps, seq.prefix_root)
    if seq.prompt_logprobs is not None and not seq.tokens:
      return PrefixMatch([], None, hashes)
    limit = len(context) - 1
    pages = []
    for digest in hashes[:limit // ps]:
      page = self.pool.lookup(digest)
      if page is None:
        break
      pages.append(page)
    parent = hashes[len(pages) - 1] if pages else seq.prefix_root
    rest = np.asarray(context[len(pages) * ps:min(limit, (len(pages) + 1) * ps)], np.int64)
    least = max(1, ps // 8)  # a partial match of fewer tokens saves less than the copy's extra call costs
    source, m = self.pool.longest_child(parent, rest) if len(rest) else (None, 0)
    if m < least:
      source, m = None, 0
    ahead = max((common_prefix(tokens, rest) for tokens in pending.get(parent, ())), default=0)
    return PrefixMatch(pages, None if source is None else (source, m), hashes, wait=ahead >= least and ahead > m)

  def admission_cost(self, seq: Sequence, match: PrefixMatch, ahead: int) -> tuple[int, int]:
    """Pages an admission takes from the pool: (now: cached pages it holds again and its copy, with the copy's
    source held until copied; later: those its prefill and its next `ahead` tokens fill)."""
    later = pages_needed(len(seq.context) + ahead, self.page_size) - len(match.pages) - (match.copy is not None)
    now = sum(self.pool.refcount(p) == 0 for p in match.pages)
    if match.copy is not None:
      now += 1 + (self.pool.refcount(match.copy[0]) == 0)
    return now, later

  def admit(self, seq: Sequence, match: PrefixMatch, copies: list[tuple[int, int]],
            pending: dict[bytes, list[np.ndarray]]) -> SequencePages:
    """seq's page table at admission: the shared pages of its match (a hold taken on each), then a fresh page for
    the copy of a partial one (`copies` gets (source, page); the source is held until `copied`). Notes in
    `pending` the pages its prefill writes and counts the tokens it reads."""
    pages = SequencePages(self.pool)
    if not self.prefix_caching:
      return pages
    ps, table = self.page_size, list(match.pages)
    for page in table:
      self.pool.acquire(page)
    length = len(table) * ps
    if match.copy is not None:
      source, m = match.copy
      self.pool.acquire(source)  # allocating the copy's page must not evict its source
      table += self.pool.alloc(1)
      copies.append((source, table[-1]))
      length += m
    pages.adopt(table, length)
    seq.prefix_hashes = match.hashes  # `register` files its pages under them once prefilled
    self.note_writes(seq, pending, len(match.pages))
    self.cached_tokens += length
    if not seq.tokens:
      seq.cached_tokens = length
    return pages

  def note_writes(self, seq: Sequence, pending: dict[bytes, list[np.ndarray]], first: int = 0) -> None:
    """Notes in `pending` the pages from the first-th on that seq's prefill writes (by parent digest): a sequence
    whose prompt begins as one of them waits for it to be registered rather than computing it again."""
    if not self.prefix_caching:
      return
    ps, context = self.page_size, seq.context
    for j in range(first, pages_needed(len(context), ps)):
      parent = seq.prefix_hashes[j - 1] if j else seq.prefix_root
      pending.setdefault(parent, []).append(np.asarray(context[j * ps:(j + 1) * ps], np.int64))

  def copied(self, copies: list[tuple[int, int]]) -> None:
    """Drops the holds on the sources of copies the runner has made."""
    for source, _ in copies:
      self.pool.free([source])

  def register(self, seq: Sequence) -> None:
    """Once seq's prefill has written its context: each full page under its block hash, and its partial last
    page's tokens (whose start later prompts may copy), for the sequences admitted from the next round on. Those
    positions are never written again: decode writes past the context."""
    if not self.prefix_caching:
      return
    ps, context, hashes = self.page_size, seq.context, seq.prefix_hashes
    parents = [seq.prefix_root, *hashes]
    for i, page in enumerate(seq.pages.pages[:pages_needed(len(context), ps)]):
      self.pool.register(page, parents[i], context[i * ps:(i + 1) * ps], hashes[i] if i < len(hashes) else None)

  def release(self, seq: Sequence) -> None:
    """Lets go of seq's pages (those registered stay cached for later prefixes)."""
    seq.pages.release()
    seq.pages = None
