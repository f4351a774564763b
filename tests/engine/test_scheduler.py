"""The scheduler alone, on plain data and with no device: admission under a full pool, preemption order, prefix hits.
Every expectation is worked out by hand from the page arithmetic in each test's docstring."""

import subprocess
import sys
import textwrap

from qwenjax.engine.kv_manager import KVManager
from qwenjax.engine.pages import PagePool
from qwenjax.engine.scheduler import Scheduler
from qwenjax.engine.sequence import Sequence
from qwenjax.kernels.buckets import LengthBuckets

from conftest import REPO


def _scheduler(num_pages, page_size=4, slots=4, decode_steps=2, chunk=16, prefix_caching=True):
  kv = KVManager(PagePool(num_pages, page_size), prefix_caching)
  return Scheduler(kv, max_batch_size=slots, decode_steps=decode_steps,
                   buckets=LengthBuckets(maximum=chunk, minimum=min(4, chunk)))


def _seq(index, prompt, max_tokens=100):
  return Sequence(index, 0, list(prompt), None, 0, frozenset(), max_tokens)


def _prefill(scheduler, admission, first_token=7):
  """Runs ragged steps as a runner would until the admission's sequences are prefilled: each decoding sequence gets
  a token (1), each chunk that ends a fresh context its first token; returns each step's chunks as (request index,
  start, tokens) rows."""
  steps = []
  while any(seq.pages.length < len(seq.context) for seq in admission.seqs if seq.slot is not None):
    plan = scheduler.schedule()
    assert plan.width == scheduler.buckets.bucket(sum(-(-len(r.tokens) // plan.block) * plan.block
                                                      for r in plan.chunks))
    steps.append([(row.seq.request_index, row.start, len(row.tokens)) for row in plan.chunks])
    for row in plan.decode:
      assert row.tokens == row.seq.tokens[-1:] and row.start == len(row.seq.context)
      row.seq.tokens.append(1)
    for row in plan.chunks:
      if row.last:
        scheduler.prefilled(row.seq)
        if not row.seq.tokens:
          row.seq.tokens.append(first_token)
  return steps


def _decode(scheduler, plan):
  """A decode block as the device would run it: each live slot appends min(num_steps, budget) tokens."""
  for seq in plan.slots:
    if seq is not None:
      seq.tokens.extend([1] * min(plan.num_steps, seq.budget()))


def test_admission_waits_for_pages_and_keeps_fifo_order():
  """Pool of 5 pages of 4 tokens; prompts of 6 tokens, decode blocks of 2: each admission takes
  pages_needed(6 + 2, 4) = 2 pages, so two fit (4 pages) and the third waits, though slots are free; the fourth, a
  1-token prompt whose 1 page would fit, does not overtake it. Once the first finishes, its 2 pages and the free one
  admit the third (2 pages, plus 1 that the second's next block needs: 3 of 3), and the fourth still waits."""
  s = _scheduler(num_pages=5)
  a, b, c, d = _seq(0, range(6)), _seq(1, range(10, 16)), _seq(2, range(20, 26)), _seq(3, [30])
  s.add([a, b, c, d])
  first = s.admit()
  assert first.seqs == [a, b] and [a.slot, b.slot] == [0, 1]
  assert list(s.waiting) == [c, d]
  assert _prefill(s, first) == [[(0, 0, 6), (1, 0, 6)]]  # one step: two chunks of 6, two blocks of 4 each (16)
  assert s.kv.pages_in_use == 4  # 2 + 2 pages: the prompts' 6 tokens, and room for the first decode block
  assert s.admit().seqs == []  # 1 page free: c waits, and d behind it
  plan = s.schedule()
  assert plan.slots == [a, b, None, None] and plan.num_steps == 2 and s.stats["preemptions"] == 0
  _decode(s, plan)
  s.finish(a)
  assert a.pages is None and a.slot is None and s.kv.pages_in_use == 2
  second = s.admit()
  assert second.seqs == [c] and c.slot == 0  # the freed slot
  assert list(s.waiting) == [d]


def test_refill_is_asked_only_when_the_queue_is_empty_and_a_slot_free():
  s = _scheduler(num_pages=64, slots=2)
  queue = [[_seq(0, range(5))], [_seq(1, range(10, 15))], [_seq(2, range(20, 25))]]
  asked = []

  def refill():
    asked.append(len(queue))
    if not queue:
      return False
    s.add(queue.pop(0))
    return True

  admission = s.admit(refill)
  assert [q.request_index for q in admission.seqs] == [0, 1] and asked == [3, 2]  # two slots: asked twice
  assert s.admit(refill).seqs == [] and asked == [3, 2]  # no free slot: not asked


def test_preemption_takes_the_most_recently_admitted_first_and_requeues_it_at_the_head():
  """Pool of 6 pages of 4 tokens, decode blocks of 4, three 4-token prompts: admission reserves pages_needed(4 + 4)
  = 2 each (6 in all). Prefill fills one page each; the first block grows each to 8 tokens (2 pages: the pool is
  full). The next block needs a third page for the oldest, a: the newest, c, is preempted (its 2 pages free), a and
  b each take one. The block after: a needs a fourth page, none is free, so b (now the newest) goes, ahead of c."""
  s = _scheduler(num_pages=6, decode_steps=4)
  a, b, c = _seq(0, range(4)), _seq(1, range(10, 14)), _seq(2, range(20, 24))
  s.add([a, b, c])
  _prefill(s, s.admit())
  assert s.kv.pages_in_use == 3
  _decode(s, s.schedule())
  assert s.kv.pages_in_use == 6 and [len(q.pages.pages) for q in (a, b, c)] == [2, 2, 2]
  plan = s.schedule()
  assert plan.slots[:3] == [a, b, None] and list(s.waiting) == [c] and c.pages is None and c.preemptions == 1
  assert c.tokens == [7, 1, 1, 1, 1]  # a preempted sequence keeps its tokens
  _decode(s, plan)
  plan = s.schedule()
  assert plan.slots[:3] == [a, None, None] and list(s.waiting) == [b, c] and s.stats["preemptions"] == 2
  # Readmitted: b's context is its prompt and the tokens it had generated but the last, recomputed.
  _decode(s, plan)
  s.finish(a)
  admission = s.admit()  # b: 1 cached page of its prompt held again, 3 more to fill; c (1 + 2) no longer fits
  assert admission.seqs == [b] and list(s.waiting) == [c]
  assert b.context == list(range(10, 14)) + [7, 1, 1, 1, 1, 1, 1, 1]


def test_prefix_hits_share_full_pages_and_wait_for_pages_being_written():
  """Two requests with one 9-token prompt, pages of 4 tokens. Admitted in one round, the second would read pages
  the first has not written yet: it waits a round. Then it shares the first's 2 full pages (8 tokens read, not
  computed) and prefills only its last token. A third prompt shares the first 6 tokens: the first full page, and 2
  tokens (>= page_size / 8) of the second, which it copies into a page of its own; it prefills from position 6."""
  s = _scheduler(num_pages=32)
  prompt = list(range(100, 109))
  a, b = _seq(0, prompt), _seq(1, prompt)
  c = _seq(2, prompt[:6] + [1, 2, 3])
  s.add([a, b])
  first = s.admit()
  assert first.seqs == [a] and list(s.waiting) == [b]  # b waits for a's pages
  assert _prefill(s, first) == [[(0, 0, 9)]]
  s.add([c])
  second = s.admit()
  assert second.seqs == [b, c]
  assert b.pages.pages[:2] == a.pages.pages[:2] and b.cached_tokens == 8
  assert c.pages.pages[0] == a.pages.pages[0] and c.cached_tokens == 6
  assert second.copies == [(a.pages.pages[1], c.pages.pages[1])]  # the partial match, copied into c's own page
  assert _prefill(s, second) == [[(1, 8, 1), (2, 6, 3)]]
  assert s.kv.cached_tokens == 14
  for q in (a, b, c):
    s.finish(q)
  assert s.kv.pages_in_use == 1  # only the copy source's hold, until the runner has copied
  s.kv.copied(second.copies)
  assert s.kv.pages_in_use == 0


def test_decoding_goes_on_while_long_prompts_prefill_under_the_token_budget():
  """Budget 16 prompt tokens a step, blocks of 4. a (5 tokens) prefills in one step and decodes; b (30 tokens) then
  prefills in two steps, 16 tokens and 14, and each of those steps also gives a one token. c and d (10 each)
  share a step: c's 10 fill 3 blocks (12), leaving d one block, 4 tokens; the next step takes d's last 6 (2
  blocks: the part padded to the bucket 8). With nothing prefilling, the next plan is a decode block."""
  s = _scheduler(num_pages=64)
  a, b = _seq(0, range(5)), _seq(1, range(100, 130))
  s.add([a])
  assert _prefill(s, s.admit()) == [[(0, 0, 5)]] and a.tokens == [7]
  s.add([b])
  admission = s.admit()
  first = s.schedule()
  assert [(r.seq, r.start, r.tokens) for r in first.decode] == [(a, 5, [7])] and first.width == 16
  assert [(r.start, len(r.tokens), r.last) for r in first.chunks] == [(0, 16, False)]
  a.tokens.append(1)
  assert _prefill(s, admission) == [[(1, 16, 14)]] and a.tokens == [7, 1, 1] and b.tokens == [7]
  c, d = _seq(2, range(200, 210)), _seq(3, range(300, 310))
  s.add([c, d])
  admission = s.admit()
  assert admission.seqs == [c, d]
  widths = []
  original = s.schedule
  s.schedule = lambda: widths.append((plan := original()).width) or plan
  assert _prefill(s, admission) == [[(2, 0, 10), (3, 0, 4)], [(3, 4, 6)]] and widths == [16, 8]
  s.schedule = original
  plan = s.schedule()
  assert plan.slots == [a, b, c, d] and plan.num_steps == 2


def test_abort_drops_waiting_and_running_sequences_and_their_pages():
  s = _scheduler(num_pages=8, slots=1)
  a, b = _seq(0, range(6)), _seq(1, range(10, 16))
  s.add([a, b])
  _prefill(s, s.admit())
  assert s.abort(1) == [b] and not s.waiting
  assert s.abort(0) == [a] and s.kv.pages_in_use == 0 and not s.has_unfinished()


def test_the_scheduler_runs_where_jax_cannot_be_imported():
  """The scheduler, its KV manager, the sequences they hold and their SamplingParams import no jax (nor flax): with
  both blocked, and the qwenjax packages loaded without their __init__ (which imports the whole library), an
  admission, a prefill plan and a decode plan still run."""
  script = textwrap.dedent(f"""
      import importlib.abc, sys, types
      class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
          if name.split(".")[0] in ("jax", "jaxlib", "flax", "torch"):
            raise ImportError("blocked: " + name)
      sys.meta_path.insert(0, Blocked())
      for package in ("qwenjax", "qwenjax.engine", "qwenjax.kernels"):
        module = types.ModuleType(package)
        module.__path__ = [{str(REPO)!r} + "/" + package.replace(".", "/")]
        sys.modules[package] = module
      from qwenjax.engine.kv_manager import KVManager
      from qwenjax.engine.pages import PagePool
      from qwenjax.engine.sampling_params import SamplingParams
      from qwenjax.engine.scheduler import Scheduler
      from qwenjax.engine.sequence import Sequence
      from qwenjax.kernels.buckets import LengthBuckets
      s = Scheduler(KVManager(PagePool(8, 4)), max_batch_size=2, decode_steps=2, buckets=LengthBuckets(16, 4))
      s.add([Sequence(0, 0, [1, 2, 3], SamplingParams(max_tokens=5), 0, frozenset(), 5)])
      admission = s.admit()
      rows = s.schedule().chunks
      admission.seqs[0].tokens.append(4)
      plan = s.schedule()
      print(len(admission.seqs), [(r.start, len(r.tokens), r.last) for r in rows], plan.num_steps,
            sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax")))
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["1", "[(0,", "3,", "True)]", "2", "[]"]
