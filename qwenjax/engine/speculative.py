"""Speculative decoding, the host's part: what to propose, how much, and what was accepted. Host only: no jax.

    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    engine = Engine(model, tokenizer, speculative=spec)       # or Engine.load(..., speculative={...})

Proposers: n-gram prompt lookup (`ngram_lookup`, on the host), or a draft model: a smaller Qwen with the target's
tokenizer that takes every token the target does into a KV pool of its own (the target's page ids, so the host's
page tables serve both) and proposes its continuation inside the verify program (`programs.paged_verify`): greedy,
or drawn by each request's sampling settings (`SpeculativeConfig.draft_sampling`).

Each decode step of a speculative engine asks the proposer for up to k tokens per running sequence; the runner
feeds every sequence's last token and its proposals through the target model in one forward over the paged cache
(`qwenjax.engine.programs.paged_verify`) and samples every position as plain decoding would, with the same random
numbers (those of the token's own index). A proposal is accepted while it equals the token sampled at its
position, and the first sample that differs is kept as the step's last token. For a deterministic proposer
(n-gram lookup, a greedy draft: a one-hot proposal distribution) this is rejection sampling: a proposal d is kept
with probability p(d) and, when refused, the token comes from p with d removed, renormalised; here it is also the
very token plain decoding draws with the same seed, so speculative outputs equal plain ones token for token,
greedy or sampled, with penalties, filters and stops. A sampled draft's proposals come from a distribution q of
their own; each is kept with probability min(1, p/q) and else replaced by a draw from max(p - q, 0)
(`qwenjax.engine.sampling.speculative_sample`): outputs follow plain sampling's distribution, not its draws.
Positions past the accepted run were written to the cache and are dropped: their sequence's length is set back
(`SequencePages.shrink`), freeing whole pages past it, and the next step writes over the rest.

When it runs. A step speculates only when some running sequence has a proposal; otherwise the engine decodes a
plain block of decode_steps tokens. A sequence gets no proposal when its request opts out
(`SamplingParams.speculative`), when a grammar constrains it and a draft model proposes (the draft proposes on
the device; a grammar's masks are computed on the host, one token at a time), when its budget leaves no room,
when nothing in its prompt and output matches its last tokens, or when its recent proposals were mostly refused
(`Acceptance`: after `backoff_after` refused proposals in a row it proposes again only after as many plain
steps). A step with proposals then weighs them (`Proposer.choose_width`): each
sequence's expected tokens (its acceptance so far) against the verify step's time at each width and a plain
step's, as this machine measured them in this engine; it cuts the proposals to the best width, or decodes plainly
if that is faster. A verify step's extra rows are nearly free where decoding only streams weights (a GPU, a TPU),
and cost up to 3.4x a plain step on a 2-core CPU in float32 (`launch.bench.speculative`). And with more than
`disable_batch_size` sequences running, no step speculates.

Constraints. A constrained sequence's n-gram proposal is cut where its constraint would refuse a token; the verify
step samples each position under the mask that holds after the proposals before it (`Constraint.fill_along`: the
host walks a copy of the grammar's matcher along the proposal), so a proposal the grammar refuses is never kept
and the token sampled at the first refusal is one the grammar takes, as plain decoding gives it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwenjax._errors import ConfigError

METHODS = ("ngram", "draft")
DRAFT_SAMPLING = ("greedy", "sampled")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """How a speculative engine proposes.

  method: "ngram", prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last n
    tokens (n from prompt_lookup_max down to prompt_lookup_min) in its prompt and output; or "draft": a smaller
    model with the target's tokenizer (`draft_model`) proposes its continuation (`draft_sampling`), k steps on
    the device in the verify program itself (its own paged KV, kept in step with the target's).
  draft_model: with method "draft", the draft: a name or path `qwenjax.load` reads (loaded in the target's
    dtype), or a loaded `qwenjax.Qwen2`.
  num_speculative_tokens: k, the most tokens proposed per sequence and step (1 to 16).
  prompt_lookup_min, prompt_lookup_max: the n-gram sizes matched (1 <= min <= max).
  disable_batch_size: no step speculates while more sequences than this are running (0: never disabled).
  backoff_after: a sequence whose proposals were refused at their first token this many steps in a row rests
    (proposes nothing) for as many steps (0: never rests).
  adaptive: each step weighs the tokens its proposals are expected to gain against this machine's measured step
    times, and cuts them, or decodes plainly, where that is faster (`Proposer.choose_width`); False: every step
    with a proposal verifies it whole.
  draft_sampling: with method "draft", how the draft proposes for a sampling request. "greedy" (the default): its
    greedy continuation, a one-hot proposal, kept where it equals the target's own sample: outputs equal plain
    decoding's seed for seed. "sampled": drawn from the draft's distribution q under the request's temperature
    and filters, kept with probability min(1, p/q) and else replaced by a draw from max(p - q, 0) (rejection
    sampling): outputs follow plain sampling's distribution exactly, not its draws, and more proposals are kept
    where the temperature is high. Greedy requests are decoded the same either way.
  """

  method: str = "ngram"
  num_speculative_tokens: int = 4
  prompt_lookup_min: int = 2
  prompt_lookup_max: int = 4
  disable_batch_size: int = 8
  backoff_after: int = 4
  adaptive: bool = True
  draft_model: Any = None
  draft_sampling: str = "greedy"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ConfigError(f"speculative method {self.method!r} is not one of {', '.join(METHODS)}.")
    if (self.method == "draft") != (self.draft_model is not None):
      raise ConfigError("a draft model is what speculative method 'draft' proposes with: pass draft_model with "
                        f"method 'draft' and only then (method {self.method!r}, draft_model {self.draft_model!r}).")
    if self.draft_sampling not in DRAFT_SAMPLING:
      raise ConfigError(f"draft_sampling {self.draft_sampling!r} is not one of {', '.join(DRAFT_SAMPLING)}.")
    if self.draft_sampling != "greedy" and self.method != "draft":
      raise ConfigError(f"draft_sampling {self.draft_sampling!r} is how a draft model proposes; method "
                        f"{self.method!r} proposes deterministically (use method 'draft').")
    if not (isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 16):
      raise ConfigError(f"num_speculative_tokens must be an integer in [1, 16], got "
                        f"{self.num_speculative_tokens!r}.")
    if not (isinstance(self.prompt_lookup_min, int) and isinstance(self.prompt_lookup_max, int)
            and 1 <= self.prompt_lookup_min <= self.prompt_lookup_max):
      raise ConfigError(f"prompt_lookup_min and prompt_lookup_max must be integers with 1 <= min <= max, got "
                        f"{self.prompt_lookup_min!r} and {self.prompt_lookup_max!r}.")
    for name in ("disable_batch_size", "backoff_after"):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= 0):
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}.")

  @classmethod
  def of(cls, spec: SpeculativeConfig | Mapping[str, Any] | None) -> SpeculativeConfig | None:
    """A config from itself, a mapping of its fields (ConfigError naming an unknown one), or None."""
    if spec is None or isinstance(spec, SpeculativeConfig):
      return spec
    if not isinstance(spec, Mapping):
      raise ConfigError(f"speculative must be a SpeculativeConfig, a mapping or None, got {type(spec).__name__}.")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in spec:
      if key not in names:
        raise ConfigError(f"unknown speculative setting {key!r}; expected one of {', '.join(names)}.")
    return cls(**spec)

  @property
  def widths(self) -> tuple[int, ...]:
    """The verify programs' token widths (a sequence's last token plus its proposals, padded): powers of two from
    2 below k + 1, and k + 1; a step takes the smallest that holds its longest proposal."""
    k1 = self.num_speculative_tokens + 1
    widths, w = [], 2
    while w < k1:
      widths.append(w)
      w *= 2
    return (*widths, k1)

  def width(self, longest: int) -> int:
    """The verify width for a step whose longest proposal has `longest` tokens."""
    return next(w for w in self.widths if w >= longest + 1)


def ngram_lookup(history: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
  """Prompt lookup: up to k tokens that followed the latest earlier occurrence of history's last n tokens, for the
  largest n in [n_min, n_max] that occurs (and has a token after it); [] if none does.

  history: [L] int, the prompt then the generated tokens. An occurrence must end before the last token (it is
  not the suffix itself), and what it proposes stops at the end of the history."""
  size = len(history)
  for n in range(min(n_max, size - 1), n_min - 1, -1):
    suffix = history[size - n:]
    windows = np.lib.stride_tricks.sliding_window_view(history[:size - 1], n)  # [L - n, n], starts 0 .. L - n - 1
    hits = np.flatnonzero((windows == suffix).all(axis=1))
    if hits.size:
      start = int(hits[-1]) + n  # the latest occurrence; the token after it
      return history[start:start + k].tolist()
  return []


@dataclasses.dataclass
class Acceptance:
  """One sequence's speculation so far: its accepted proposals, the verify steps that refused one of its
  proposals, and its back-off (refused first proposals in a row; plain steps left to rest)."""

  accepted: int = 0
  refusals: int = 0
  refused_in_a_row: int = 0
  resting: int = 0

  @property
  def rate(self) -> float:
    """The chance that its next proposal is kept, given those before it were: kept / (kept + refused), counted
    from one kept (optimistic, so that a new sequence tries)."""
    return (self.accepted + 1) / (self.accepted + self.refusals + 1)

  def expected_tokens(self, n: int) -> float:
    """Tokens a verify step with n of its proposals is expected to give it: 1 + rate + rate^2 + ... + rate^n."""
    return 1 + sum(self.rate ** i for i in range(1, n + 1))


class Proposer:
  """Proposes tokens for running sequences (`propose`) and keeps their acceptance (`record`, `stats`)."""

  def __init__(self, config: SpeculativeConfig):
    self.config = config
    self.totals = {"spec_proposed_tokens": 0, "spec_accepted_tokens": 0, "spec_verify_rows": 0}
    self._seconds: dict[int, list[float]] = {}  # width (1: a plain decode step) -> recent seconds per call
    self._timed: set[int] = set()  # widths whose first call was seen (and dropped)

  # ---- whether a step speculates, and how wide ---------------------------------------------------------------

  def note_seconds(self, width: int, seconds: float) -> None:
    """A call's time as the engine measured it: a verify step of `width`, or (width 1) a plain decode step (a
    block's time over its steps). The first of each is dropped (it may have compiled); the last 8 are kept."""
    if width not in self._timed:
      self._timed.add(width)
      return
    times = self._seconds.setdefault(width, [])
    times.append(seconds)
    del times[:-8]

  def _cost(self, width: int) -> float | None:
    times = self._seconds.get(width)
    return float(np.median(times)) if times else None

  def choose_width(self, seqs: list, proposals: list[list[int]]) -> int:
    """The verify width whose expected tokens per second (each sequence's `Acceptance.expected_tokens` of its
    proposals cut to the width, over the width's measured step time) is best, or 0 if a plain decode step's rate
    (sequences per step time) is better: speculation backs off where this machine's verify step costs more than
    the tokens it is expected to gain. A width not yet timed counts as costing a plain step (so it is tried)."""
    widest = self.config.width(max(len(p) for p in proposals))
    if not self.config.adaptive:
      return widest
    plain = self._cost(1)
    best, best_rate = 0, len(seqs) / plain if plain else 0.0
    for w in self.config.widths:
      if w > widest:
        break
      cost = self._cost(w) or plain
      if cost is None:
        return widest  # nothing timed yet: try the proposals whole
      gained = sum(seq.speculation.expected_tokens(min(len(p), w - 1)) for seq, p in zip(seqs, proposals))
      if gained / cost > best_rate:
        best, best_rate = w, gained / cost
    return best

  def propose(self, seq, room: int) -> list[int]:
    """Up to min(k, room) tokens for seq (a `qwenjax.engine.sequence.Sequence` whose last token the step feeds);
    [] when it opts out, it rests, or nothing matches. A constrained sequence's n-gram proposal is cut where its
    constraint would refuse a token (`Constraint.admits`); a draft model proposes on the device, min(k, room)
    placeholders (-1): how many it is to make, none for a grammar-constrained sequence (its masks are the
    host's, one token at a time)."""
    cfg = self.config
    state = seq.speculation
    grammar = seq.constraint is not None and seq.constraint.per_token
    if room <= 0 or not seq.params.speculative or (grammar and cfg.method == "draft"):
      return []  # a draft proposes on the device, where a grammar's masks, the host's, are not
    if state.resting > 0:
      state.resting -= 1
      return []
    if cfg.method == "draft":
      return [-1] * min(cfg.num_speculative_tokens, room)
    history = np.asarray(seq.prompt + seq.tokens, np.int64)
    proposal = ngram_lookup(history, min(cfg.num_speculative_tokens, room), cfg.prompt_lookup_min,
                            cfg.prompt_lookup_max)
    if seq.constraint is not None and proposal:  # only what the constraint allows, one token after another
      proposal = proposal[:seq.constraint.admits(proposal)]
    return proposal

  def record(self, seq, proposal: list[int], emitted: list[int]) -> int:
    """Notes one verify step of seq: its proposal and the tokens it emitted; returns how many proposals were
    accepted (the emitted tokens that equal them, from the first)."""
    accepted = 0
    while accepted < min(len(proposal), len(emitted)) and emitted[accepted] == proposal[accepted]:
      accepted += 1
    if not proposal:
      return 0
    state = seq.speculation
    state.accepted += accepted
    self.totals["spec_proposed_tokens"] += len(proposal)
    self.totals["spec_accepted_tokens"] += accepted
    self.totals["spec_verify_rows"] += 1
    state.refusals += accepted < len(proposal)
    state.refused_in_a_row = 0 if accepted else state.refused_in_a_row + 1
    if self.config.backoff_after and state.refused_in_a_row >= self.config.backoff_after:
      state.resting, state.refused_in_a_row = self.config.backoff_after, 0
    return accepted

  def stats(self) -> dict[str, float]:
    """The counters and their mean accepted length (`with_mean_length`)."""
    return with_mean_length(self.totals)


def with_mean_length(counts: Mapping[str, int]) -> dict[str, float]:
  """Speculation counters (spec_proposed_tokens, spec_accepted_tokens, spec_verify_rows) with their mean accepted
  length: tokens a sequence gained per verify step it proposed in (its accepted proposals plus the token sampled
  after them)."""
  rows = counts["spec_verify_rows"]
  mean = (counts["spec_accepted_tokens"] + rows) / rows if rows else 0.0
  return {**counts, "spec_mean_accepted_length": round(mean, 3)}
