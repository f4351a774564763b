"""The scheduler: which sequences run, on which pages, in which calls. Host only: it imports no jax.

    scheduler = Scheduler(kv, max_batch_size=8, decode_steps=4, buckets=LengthBuckets(512))
    scheduler.add(seqs)                                 # a request's n prepared sequences
    admission = scheduler.admit()                       # waiting -> free slots, pages shared and reserved
    for call in scheduler.prefill_calls(admission):     # packed prefill: the next chunk of several contexts
      ...the runner runs `call`; a row with `last` set has its whole context in its pages: `prefilled(seq)`
    plan = scheduler.schedule_decode()                  # pages for the next decode block, preempting if short
    ...the runner runs `plan`; a sequence that ended: `finish(seq)`

It owns the waiting queue and the B decode slots, admission (FIFO: nothing overtakes the head), page reservation
through the `KVManager` (the pool and the prefix cache), preemption (the most recently admitted first, so the oldest
always progress and every request finishes; a preempted sequence keeps its tokens and its context is recomputed
when it is readmitted) and the planning of packed prefill calls. What it hands out is plain data: `Admission`,
`PrefillCall`, `DecodePlan`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from qwenjax.engine.kv_manager import KVManager
from qwenjax.engine.pages import pages_needed
from qwenjax.engine.sequence import Sequence
from qwenjax.kernels.buckets import LengthBuckets, next_power_of_two


@dataclasses.dataclass(frozen=True)
class Admission:
  """The sequences one round admitted (each in its slot, `seq.slot`, with the pages it shares) and the partial
  pages to copy before their prefill: (source, destination) pairs."""

  seqs: list[Sequence]
  copies: list[tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class PrefillRow:
  """One row of a packed prefill call: context tokens [start, start + len(tokens)) of seq, written at `slots`
  ([len(tokens)] int32 pool slots); last: the chunk completes its context (its logits give the next token)."""

  seq: Sequence
  start: int
  tokens: list[int]
  slots: np.ndarray
  last: bool


@dataclasses.dataclass(frozen=True)
class PrefillCall:
  """One packed prefill call: a row per sequence, each padded to `width` tokens (a length bucket)."""

  rows: list[PrefillRow]
  width: int


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """A decode block: slots[i], the sequence in decode slot i (None: idle), each with pages for its next
  min(num_steps, budget) tokens; num_steps: 1 when every sequence is grammar-constrained (each samples one
  token per block), else the engine's decode_steps."""

  slots: list[Sequence | None]
  num_steps: int


def rows_fit(rows: int, width: int, buckets: LengthBuckets, max_batch_size: int) -> bool:
  """Whether a packed prefill call of `rows` rows (padded to a power of two) of `width` tokens is allowed: at most
  buckets.maximum tokens in all, at most one row per slot."""
  return next_power_of_two(rows) * width <= buckets.maximum and rows <= max_batch_size


class Scheduler:
  """Continuous batching over B = max_batch_size decode slots and the pages of `kv`.

  decode_steps: tokens a decode block generates per sequence (pages are reserved for that many ahead).
  buckets: the prefill lengths; its maximum is the tokens one packed prefill call holds (rows x bucket) and the
    chunk that longer contexts are prefilled in.
  """

  def __init__(self, kv: KVManager, *, max_batch_size: int, decode_steps: int, buckets: LengthBuckets):
    self.kv = kv
    self.max_batch_size, self.decode_steps, self.buckets = max_batch_size, decode_steps, buckets
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.slots: list[Sequence | None] = [None] * max_batch_size
    self._admissions = 0
    self.stats = {"preemptions": 0, "peak_sequences": 0, "peak_pages": 0}

  # ---- queues --------------------------------------------------------------------------------------------

  def add(self, seqs: list[Sequence]) -> None:
    """Queues a request's sequences behind those waiting."""
    self.waiting.extend(seqs)

  @property
  def running(self) -> list[Sequence]:
    return [seq for seq in self.slots if seq is not None]

  def has_unfinished(self) -> bool:
    return bool(self.waiting) or any(seq is not None for seq in self.slots)

  def abort(self, request_index: int) -> list[Sequence]:
    """Takes every sequence of a request out (waiting or running), its pages back to the pool at once."""
    gone = [seq for seq in self.waiting if seq.request_index == request_index]
    self.waiting = collections.deque(seq for seq in self.waiting if seq.request_index != request_index)
    for seq in self.running:
      if seq.request_index == request_index:
        self.finish(seq)
        gone.append(seq)
    return gone

  def finish(self, seq: Sequence) -> None:
    """Frees a finished sequence's slot and lets go of its pages."""
    self.slots[seq.slot] = None
    seq.slot = None
    self.kv.release(seq)

  # ---- admission and prefill --------------------------------------------------------------------------------

  def admit(self, refill: Callable[[], bool] | None = None) -> Admission:
    """Admits waiting sequences (preempted ones first, then new ones in order) into free slots while the pool has
    pages for their context plus one decode block of every admitted sequence. refill: called when the queue runs
    dry while slots are free, to queue the next request (`add`); False: there is none."""
    admitted, copies = [], []
    pending: dict[bytes, list[np.ndarray]] = {}  # the pages this round's admissions write, by parent digest
    free = [s for s in range(self.max_batch_size) if self.slots[s] is None]
    reserve = sum(self._block_pages(seq) for seq in self.running)
    while free:
      if not self.waiting and (refill is None or not refill()):
        break
      seq = self.waiting[0]
      match = self.kv.match(seq, pending)
      if match.wait:
        break  # its prefix is being written this round: it reads it next round (FIFO)
      now, later = self.kv.admission_cost(seq, match, min(self.decode_steps, seq.budget()))
      if later + now + reserve > self.kv.pool.num_free and (admitted or self.running):
        break  # admission waits for pages (FIFO: nothing overtakes the head)
      self.waiting.popleft()
      seq.pages, seq.admitted = self.kv.admit(seq, match, copies, pending), self._admissions
      self._admissions += 1
      reserve += later
      seq.slot = free.pop(0)
      self.slots[seq.slot] = seq
      admitted.append(seq)
    return Admission(admitted, copies)

  def prefill_calls(self, admission: Admission) -> Iterator[PrefillCall]:
    """The admitted sequences' contexts in packed calls, generated one at a time (each takes its pages as it is
    planned, after the previous call ran): every call takes the next chunk (at most buckets.maximum tokens) of as
    many sequences as fit `rows x bucket <= buckets.maximum`. A resumed sequence's context includes the tokens it
    had generated but the last."""
    chunk = self.buckets.maximum
    todo = [(seq, seq.context) for seq in admission.seqs]
    done = {id(seq): seq.pages.length for seq, _ in todo}  # context tokens in its pages: shared, or prefilled
    while todo:
      group, width = [], 0
      for seq, context in todo:
        piece = min(chunk, len(context) - done[id(seq)])
        w = max(width, self.buckets.bucket(piece))
        if group and not self.rows_fit(len(group) + 1, w):
          break
        group.append((seq, context))
        width = w
      rows = []
      for seq, context in group:
        lo = done[id(seq)]
        piece = context[lo:lo + chunk]
        done[id(seq)] = lo + len(piece)
        rows.append(PrefillRow(seq, lo, piece, seq.pages.grow(len(piece)), done[id(seq)] == len(context)))
      todo = [(seq, context) for seq, context in todo if done[id(seq)] < len(context)]
      yield PrefillCall(rows, width)

  def rows_fit(self, rows: int, width: int) -> bool:
    return rows_fit(rows, width, self.buckets, self.max_batch_size)

  def prefilled(self, seq: Sequence) -> None:
    """seq's whole context is in its pages: they become readable by later prompts (prefix caching)."""
    self.kv.register(seq)

  # ---- decode --------------------------------------------------------------------------------------------

  def schedule_decode(self) -> DecodePlan | None:
    """Gives every decoding sequence pages for its next block, oldest first, preempting the most recently admitted
    (pages returned, tokens kept; it waits at the head of the queue) while the pool is short. None: nothing runs."""
    for seq in sorted(self.running, key=lambda s: s.admitted):
      if seq.slot is None:  # preempted by an older one's growth
        continue
      grow = min(self.decode_steps, seq.budget())
      while True:
        extra = pages_needed(seq.pages.length + grow, self.kv.page_size) - len(seq.pages.pages)
        if extra <= self.kv.pool.num_free:
          break
        victim = max(self.running, key=lambda s: s.admitted)
        self._preempt(victim)
        if victim is seq:
          break
      if seq.slot is not None:
        seq.pages.grow(grow)
    live = self.running
    if not live:
      return None
    self.stats["peak_sequences"] = max(self.stats["peak_sequences"], len(live))
    self.stats["peak_pages"] = max(self.stats["peak_pages"], self.kv.pages_in_use)
    paused = all(s.constraint is not None and s.constraint.per_token for s in live)
    return DecodePlan(list(self.slots), 1 if paused else self.decode_steps)

  def _block_pages(self, seq: Sequence) -> int:
    """Pages seq needs beyond those it holds to run the next decode block."""
    grow = min(self.decode_steps, seq.budget())
    return max(0, pages_needed(seq.pages.length + grow, self.kv.page_size) - len(seq.pages.pages))

  def _preempt(self, seq: Sequence) -> None:
    """Frees a decoding sequence's slot and pages (its holds on shared ones dropped); it waits at the head of the
    queue with its tokens, and its context is prefilled again when it is readmitted (recompute, from the prefix
    pages still cached: the outputs are unchanged)."""
    self.finish(seq)
    seq.preemptions += 1
    self.stats["preemptions"] += 1
    self.waiting.appendleft(seq)
