"""One sequence's host-side state, the plain data that the engine's parts hand each other.

The input processor makes a request's n `Sequence`s; the scheduler admits them into decode slots, gives them pages
and preempts them; the runner reads them to build device inputs; the output processor appends their tokens, text
and stop decisions. Nothing here touches a device: this module imports no jax, and neither does the scheduler that
holds these objects.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from qwenjax.engine.speculative import Acceptance

if TYPE_CHECKING:  # types only: the scheduler's side of the engine imports no jax
  import numpy as np

  from qwenjax.engine.constraints import Constraint
  from qwenjax.engine.pages import SequencePages
  from qwenjax.engine.sampling_params import SamplingParams
  from qwenjax.multimodal.positions import VLPrompt


@dataclasses.dataclass
class Media:
  """A multimodal prompt (`VLPrompt`: ids with a pad per merged patch, 3D positions, preprocessed images and
  videos), shared by the request's n samples, and its vision features [M, D], which the runner encodes once, when
  the first of them is admitted."""

  prompt: VLPrompt
  features: np.ndarray | None = None


@dataclasses.dataclass
class Sequence:
  """One sample of one request, from its preparation until it finishes or is aborted."""

  request_index: int  # the engine's own number for its request (in order of arrival)
  sample_index: int  # which of the request's n samples
  prompt: list[int]
  params: SamplingParams
  seed: int
  stop_ids: frozenset[int]
  max_tokens: int  # what it may generate: its sampling's max_tokens, bounded by the context
  media: Media | None = None  # a multimodal prompt's images and videos
  decoder: Any = None  # its incremental detokenizer (`Tokenizer.stream`)
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[Any] = dataclasses.field(default_factory=list)
  top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # params.top_logprobs > 0
  # Asked for (params.prompt_logprobs; sample 0 only, the request's n samples share a prompt): the log-probability
  # of prompt tokens 1, 2, ... given those before them, as its prefill chunks score them; None: not asked.
  prompt_logprobs: list[float] | None = None
  text: str = ""
  finish_reason: str | None = None
  emitted_tokens: int = 0  # tokens and text already streamed
  emitted_text: int = 0
  searched_text: int = 0  # text already searched for stop strings
  slot: int | None = None  # its decode slot while admitted
  pages: SequencePages | None = None  # the pages it holds while admitted
  # Prefix caching: the root its page hashes chain from (`pages.prefix_root` of its images' digest and adapter),
  # and the prompt tokens its first admission read from shared pages, not computed.
  prefix_root: bytes = b""
  prefix_hashes: list[bytes] | None = None  # its context's full-page digests at its latest admission
  cached_tokens: int = 0
  admitted: int = 0  # admission order (the most recent is preempted first)
  preemptions: int = 0
  # Its response_format / tool_choice (`qwenjax.engine.constraints`): the host-side matcher, which has consumed
  # exactly `tokens` (it stays with the sequence through preemption), or None: unconstrained.
  constraint: Constraint | None = None
  adapter: int = -1  # its LoRA adapter's index in the engine's bank (-1: the base model)
  # On a speculative engine: its proposals and their acceptance so far, and its back-off.
  speculation: Acceptance = dataclasses.field(default_factory=Acceptance)

  @property
  def context(self) -> list[int]:
    """What its cache holds once prefilled: the prompt, and on resuming after preemption the tokens it had
    generated but the last (the next one decode feeds)."""
    return self.prompt + self.tokens[:-1]

  @property
  def rope_offset(self) -> int:
    return self.media.prompt.rope_offset if self.media is not None else 0

  def targets(self, start: int, n: int) -> list[int]:
    """The prompt tokens that context positions [start, start + n) score: those after each, within the prompt;
    none unless prompt log-probabilities are asked and not yet taken (a resumed sequence has them already)."""
    if self.prompt_logprobs is None or self.tokens:
      return []
    return self.prompt[start + 1:start + n + 1]

  def budget(self) -> int:
    """Tokens the next decode block may generate, and so the most of its positions it writes: what it may still
    generate (`remaining`), or 1 if a grammar constrains it (the host computes its mask one token at a time, so it
    pauses after one token of each block; it does not end)."""
    if self.constraint is not None and self.constraint.per_token:
      return 1
    return self.remaining()

  def remaining(self) -> int:
    """Tokens it may still generate (a verify step's most: the host has each position's mask for it)."""
    return self.max_tokens - len(self.tokens)
