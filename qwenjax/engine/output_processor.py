"""The output processor: sampled tokens in, per-request outputs out. Host only.

    outputs = OutputProcessor()
    outputs.add(index, request_id, prompt_tokens, seqs)   # a request's n sequences
    outputs.accept(seq, tokens, logprobs)                 # a step's new tokens of one sequence
    step_outputs, events = outputs.collect()              # per request that advanced; stream deltas

It owns every stop condition the host decides (stop ids, stop strings, max_tokens, a grammar's refusal),
incremental detokenisation, the hold-back of streamed text that may yet begin a stop string, log-probabilities,
prompt log-probabilities and gathering a request's n samples into one `RequestOutput`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from qwenjax.engine import constraints as constraints_lib
from qwenjax.engine import sampling as sampling_lib
from qwenjax.engine.requests import Completion, RequestOutput, StreamEvent
from qwenjax.engine.sequence import Sequence


@dataclasses.dataclass
class _RequestState:
  request_id: Any
  prompt_tokens: int
  seqs: list[Sequence]


class OutputProcessor:
  """Turns accepted tokens into completions, stream events and finished requests."""

  def __init__(self):
    self._requests: dict[int, _RequestState] = {}
    self._advanced: collections.OrderedDict[int, None] = collections.OrderedDict()  # last advanced last
    self._events: list[StreamEvent] = []
    self.generated_tokens = 0

  def add(self, index: int, request_id: Any, prompt_tokens: int, seqs: list[Sequence]) -> None:
    self._requests[index] = _RequestState(request_id, prompt_tokens, seqs)

  def drop(self, index: int) -> None:
    """Forgets an aborted request: nothing more comes out for it."""
    self._requests.pop(index, None)
    self._advanced.pop(index, None)
    self._events = [e for e in self._events if e.request_index != index]

  def accept_block(self, seq: Sequence, tokens: np.ndarray, logprobs: np.ndarray) -> None:
    """A decode block's column for seq: tokens [k] (-1 from where its row stopped) and logprobs [k]."""
    n = int(np.argmax(tokens < 0)) if (tokens < 0).any() else len(tokens)
    self.accept(seq, tokens[:n].tolist(), logprobs[:n].tolist())

  def accept(self, seq: Sequence, tokens: list[int], logprobs: list) -> None:
    """Appends tokens to seq, applying every stop condition exactly, and notes what it streams."""
    for tok, lp in zip(tokens, logprobs):
      if isinstance(lp, list):  # a row of sampling.with_top_logprobs: some slot of the call asked for them
        lp, top = sampling_lib.split_top_logprobs(lp, seq.params.top_logprobs)
        if seq.params.top_logprobs:
          seq.top_logprobs.append(top)
      seq.tokens.append(tok)
      seq.logprobs.append(lp)
      self.generated_tokens += 1
      if tok in seq.stop_ids:
        seq.finish_reason = "stop"
        break
      seq.text += seq.decoder.add(tok)
      if seq.constraint is not None and not seq.constraint.advance(tok):
        seq.finish_reason = constraints_lib.GRAMMAR_ERROR  # never with a mask that held; a matcher's limit, say
        break
      if seq.params.stop and _cut_stop_string(seq):
        break
      if len(seq.tokens) >= seq.max_tokens:
        seq.finish_reason = "length"
        break
    upto = len(seq.text)
    if seq.params.stop and seq.finish_reason is None:  # hold back what may yet begin a stop string
      upto = max(seq.emitted_text, upto - max(len(s) for s in seq.params.stop) + 1)
    event = StreamEvent(seq.request_index, seq.sample_index, seq.tokens[seq.emitted_tokens:],
                        seq.text[seq.emitted_text:upto], seq.finish_reason)
    seq.emitted_tokens, seq.emitted_text = len(seq.tokens), upto
    if event.token_ids or event.finish_reason:
      self._events.append(event)
    self._advanced[seq.request_index] = None
    self._advanced.move_to_end(seq.request_index)

  def collect(self) -> tuple[list[tuple[int, RequestOutput]], list[StreamEvent]]:
    """What the step produced: (request index, RequestOutput) for each request that advanced (in the order they
    last did, so finished ones in the order they finished), with its completions so far (streamed text: without
    what it holds back) and `finished` once all its samples are; and the stream events. A finished request is
    forgotten."""
    outputs = []
    for index in self._advanced:
      state = self._requests[index]
      finished = all(seq.finish_reason is not None for seq in state.seqs)
      outputs.append((index, self._output(state, finished)))
      if finished:
        del self._requests[index]
    events, self._events = self._events, []
    self._advanced.clear()
    return outputs, events

  @staticmethod
  def _output(state: _RequestState, finished: bool) -> RequestOutput:
    completions = [Completion(seq.text[:seq.emitted_text], list(seq.tokens), seq.finish_reason, seq.sample_index,
                              list(seq.logprobs) if seq.params.logprobs else None,
                              list(seq.top_logprobs) if seq.params.top_logprobs else None,
                              seq.constraint.error if seq.constraint is not None else None)
                   for seq in state.seqs]
    first = state.seqs[0]
    prompt_logprobs = None if first.prompt_logprobs is None or not finished else [None, *first.prompt_logprobs]
    return RequestOutput(state.request_id, state.prompt_tokens, completions, prompt_logprobs, first.cached_tokens,
                         finished=finished)


def _cut_stop_string(seq: Sequence) -> bool:
  """Ends seq at the first stop string in its text (which may span several tokens); the text is cut before it."""
  start = max(0, seq.searched_text - max(len(s) for s in seq.params.stop) + 1)
  hits = [i for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
  seq.searched_text = len(seq.text)
  if not hits:
    return False
  seq.text = seq.text[:min(hits)]
  seq.finish_reason = "stop"
  return True
