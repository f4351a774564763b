"""The scheduler: which sequences run, on which pages, in which calls. Host only: it imports no jax.

    scheduler = Scheduler(kv, max_batch_size=8, decode_steps=4, buckets=LengthBuckets(512))
    scheduler.add(seqs)                                 # a request's n prepared sequences
    admission = scheduler.admit()                       # waiting -> free slots, pages shared and reserved
    plan = scheduler.schedule()                         # the next step, preempting if the pool is short
    ...a StepPlan: one ragged step, a token for each decoding sequence and the next prefill chunks (a chunk with
    `last` set completes its context: `prefilled(seq)`); a DecodePlan: decode_steps tokens for each, nothing
    prefilling; a VerifyPlan (a speculative engine, nothing prefilling, some sequence has proposals): each
    sequence's last token and proposals in one call, then `verified(seq)` to drop the refused ones' positions;
    a sequence that ended: `finish(seq)`

It owns the waiting queue and the B decode slots, admission (FIFO: nothing overtakes the head), page reservation
through the `KVManager` (the pool and the prefix cache), preemption (the most recently admitted first, so the oldest
always progress and every request finishes; a preempted sequence keeps its tokens and its context is recomputed
when it is readmitted) and the planning of each step under a token budget (buckets.maximum prompt tokens beside
one token per decoding sequence), so decoding goes on while prompts prefill. What it hands out is plain data:
`Admission`, `StepPlan`, `DecodePlan`, `VerifyPlan`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from qwenjax.engine.kv_manager import KVManager
from qwenjax.engine.pages import pages_needed
from qwenjax.engine.sequence import Sequence
from qwenjax.engine.speculative import Proposer
from qwenjax.kernels.buckets import LengthBuckets


@dataclasses.dataclass(frozen=True)
class Admission:
  """The sequences one round admitted (each in its slot, `seq.slot`, with the pages it shares) and the partial
  pages to copy before their prefill: (source, destination) pairs."""

  seqs: list[Sequence]
  copies: list[tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class StepRow:
  """One sequence's tokens in a ragged step: context tokens [start, start + len(tokens)) of seq (a decode row: its
  last token, at position len(context)), written at `slots` ([len(tokens)] int32 pool slots); last: the row
  completes its context (its logits give the next token, unless a resumed sequence has it already)."""

  seq: Sequence
  start: int
  tokens: list[int]
  slots: np.ndarray
  last: bool


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """A ragged step: `decode`, a row of one token (its last) for each decoding sequence; `chunks`, the next prefill
  chunk of prefilling sequences, in admission order, each starting a block of `block` tokens; `width`, what the
  chunks fill in whole blocks, padded to a length bucket (the step's prefill part)."""

  decode: list[StepRow]
  chunks: list[StepRow]
  width: int
  block: int


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """A decode block: slots[i], the sequence in decode slot i (None: idle), each with pages for its next
  min(num_steps, budget) tokens; num_steps: 1 when every sequence is grammar-constrained (each samples one
  token per block), else the engine's decode_steps."""

  slots: list[Sequence | None]
  num_steps: int


@dataclasses.dataclass(frozen=True)
class VerifyPlan:
  """A speculative decode step: slots[i], the sequence in decode slot i (None: idle); proposals[i], the tokens
  proposed to follow its last token ([] for none, and for idle slots); each holds pages for its last token and
  its proposals. width: the verify program's tokens per slot (`SpeculativeConfig.width`), at least 1 + the
  longest proposal."""

  slots: list[Sequence | None]
  proposals: list[list[int]]
  width: int


class Scheduler:
  """Continuous batching over B = max_batch_size decode slots and the pages of `kv`.

  decode_steps: tokens a decode block generates per sequence (pages are reserved for that many ahead).
  buckets: the padded sizes of a step's prefill part; its maximum is the step's token budget for prompt chunks
    (their blocks), its minimum the block size.
  proposer: a speculative engine's (`qwenjax.engine.speculative.Proposer`): decode steps with proposals are
    VerifyPlans; None: never.
  """

  def __init__(self, kv: KVManager, *, max_batch_size: int, decode_steps: int, buckets: LengthBuckets,
               proposer: Proposer | None = None):
    self.kv, self.proposer = kv, proposer
    self.max_batch_size, self.decode_steps, self.buckets = max_batch_size, decode_steps, buckets
    self.block = buckets.minimum  # tokens of one prefill block (`StepPlan.block`)
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
    pending: dict[bytes, list[np.ndarray]] = {}  # the pages admitted prefills are writing, by parent digest
    for seq in self.running:
      if seq.pages.length < len(seq.context):
        self.kv.note_writes(seq, pending)
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

  def schedule(self) -> StepPlan | DecodePlan | None:
    """The next step's plan, oldest sequences first, preempting the most recently admitted while the pool is
    short. While some admitted sequence is still prefilling: a `StepPlan`, one token for every decoding sequence
    and the next chunks of the prefilling ones while the token budget (buckets.maximum) lasts; else a `DecodePlan`
    of decode_steps tokens for each. None: nothing runs."""
    if not any(seq.pages.length < len(seq.context) for seq in self.running):
      return self.schedule_decode()
    q = self.block
    room = self.buckets.maximum // q * q  # the prefill part: whole blocks
    decode, chunks, used = [], [], 0
    for seq in sorted(self.running, key=lambda s: s.admitted):
      if seq.slot is None:  # preempted by an older one's growth
        continue
      start, context = seq.pages.length, seq.context
      n = 1 if start == len(context) else min(len(context) - start, room - used)
      if n <= 0 or not self._make_room(seq, n):
        continue  # the budget is spent (it waits, FIFO), or seq itself was preempted
      if start == len(context):
        decode.append(StepRow(seq, start, [seq.tokens[-1]], seq.pages.grow(1), True))
      else:
        chunks.append(StepRow(seq, start, context[start:start + n], seq.pages.grow(n), start + n == len(context)))
        used += -(-n // q) * q
    self._note_peaks()
    if not chunks and not decode:
      return None
    # (No chunk left: every prefilling sequence was preempted; the decode rows run with an empty prefill part.)
    return StepPlan(decode, chunks, self.buckets.bucket(max(used, 1)), q)

  def _make_room(self, seq: Sequence, n: int) -> bool:
    """Preempts the most recently admitted sequences until the pool has the pages for n more tokens of seq; False
    if seq itself was preempted."""
    while pages_needed(seq.pages.length + n, self.kv.page_size) - len(seq.pages.pages) > self.kv.pool.num_free:
      victim = max(self.running, key=lambda s: s.admitted)
      self._preempt(victim)
      if victim is seq:
        return False
    return True

  def _note_peaks(self) -> None:
    self.stats["peak_sequences"] = max(self.stats["peak_sequences"], len(self.running))
    self.stats["peak_pages"] = max(self.stats["peak_pages"], self.kv.pages_in_use)

  def prefilled(self, seq: Sequence) -> None:
    """seq's whole context is in its pages: they become readable by later prompts (prefix caching)."""
    self.kv.register(seq)

  # ---- decode --------------------------------------------------------------------------------------------

  def schedule_decode(self) -> DecodePlan | VerifyPlan | None:
    """Gives every decoding sequence pages for its next block, oldest first, preempting the most recently admitted
    (pages returned, tokens kept; it waits at the head of the queue) while the pool is short. A speculative
    engine's step with proposals is a VerifyPlan instead (`schedule_verify`). None: nothing runs."""
    plan = self.schedule_verify() if self.proposer is not None else None
    if plan is not None:
      return plan
    for seq in sorted(self.running, key=lambda s: s.admitted):
      if seq.slot is None:  # preempted by an older one's growth
        continue
      grow = min(self.decode_steps, seq.budget())
      if self._make_room(seq, grow):
        seq.pages.grow(grow)
    live = self.running
    if not live:
      return None
    self._note_peaks()
    paused = all(s.constraint is not None and s.constraint.per_token for s in live)
    return DecodePlan(list(self.slots), 1 if paused else self.decode_steps)

  def schedule_verify(self) -> VerifyPlan | DecodePlan | None:
    """A speculative step: each running sequence's proposals (none past its budget: a step emits at most its
    proposals plus one token), and pages for its last token and them, oldest first; a sequence whose proposals
    the pool cannot hold runs without them, and the most recently admitted are preempted while even that is
    short; proposals are cut to the width the proposer expects the most tokens per second from
    (`Proposer.choose_width`). None, for a plain decode block: no sequence has a proposal, a plain step is expected
    to do better, or more are running than the speculation's disable_batch_size."""
    live = sorted(self.running, key=lambda s: s.admitted)
    limit = self.proposer.config.disable_batch_size
    if not live or (limit and len(live) > limit):
      return None
    proposals = {id(seq): self.proposer.propose(seq, seq.remaining() - 1) for seq in live}
    if not any(proposals.values()):
      return None
    width = self.proposer.choose_width(live, [proposals[id(seq)] for seq in live])
    if not width:  # a plain step is expected to give more tokens per second
      return None
    proposals = {key: p[:width - 1] for key, p in proposals.items()}
    for seq in live:
      if seq.slot is None:  # preempted by an older one's growth
        continue
      n = len(proposals[id(seq)]) + 1
      if pages_needed(seq.pages.length + n, self.kv.page_size) - len(seq.pages.pages) > self.kv.pool.num_free:
        proposals[id(seq)], n = [], 1
      if self._make_room(seq, n):
        seq.pages.grow(n)
    slots = list(self.slots)
    if not any(seq is not None for seq in slots):
      return None
    self._note_peaks()
    kept = [proposals[id(seq)] if seq is not None else [] for seq in slots]
    longest = max(len(p) for p in kept)
    if not longest:  # every proposal gave way to the pool: a block of one plain step on the pages taken
      return DecodePlan(slots, 1)
    return VerifyPlan(slots, kept, self.proposer.config.width(longest))

  def verified(self, seq: Sequence) -> None:
    """After a VerifyPlan step, for a sequence that goes on: its table set back to its context, the positions of
    its refused proposals dropped and the pages wholly past them freed."""
    seq.pages.shrink(len(seq.context))

  def _block_pages(self, seq: Sequence) -> int:
    """Pages seq needs beyond those it holds to finish its prefill and run the next decode block."""
    grow = min(self.decode_steps, seq.budget())
    return max(0, pages_needed(len(seq.context) + grow, self.kv.page_size) - len(seq.pages.pages))

  def _preempt(self, seq: Sequence) -> None:
    """Frees a decoding sequence's slot and pages (its holds on shared ones dropped); it waits at the head of the
    queue with its tokens, and its context is prefilled again when it is readmitted (recompute, from the prefix
    pages still cached: the outputs are unchanged)."""
    self.finish(seq)
    seq.preemptions += 1
    self.stats["preemptions"] += 1
    self.waiting.appendleft(seq)
