"""A request's sampling parameters, validated on the host: `SamplingParams`.

    SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, seed=1)
    SamplingParams.from_dict({"temperature": 0.7, "stop": "\\n"}, base=default)  # a request's JSON object

Each field is checked as it is set, and a bad one raises an `InputError` that names it and what it must be. How the
parameters are applied on the device (penalties, temperature, top-k, top-p, min-p, the draw) is
`qwenjax.engine.sampling`'s part.

This module imports no jax: the scheduler's sequences carry SamplingParams, and the scheduler runs without jax.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwenjax._errors import InputError

_MIN_TEMPERATURE = 1e-5  # below this a request decodes greedily, as in vLLM
_MAX_SEED = 2**32
TOP_LOGPROBS = 20  # the most top log-probabilities a position reports (OpenAI's limit); computed for all 20


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded. The defaults decode greedily with no filter and no penalty.

  max_tokens: tokens to generate at most (>= 1).
  temperature: 0 is greedy; otherwise logits are divided by it (>= 0).
  top_k: keep the k most likely tokens (ties with the k-th included); 0 disables it.
  top_p: keep the smallest set of most likely tokens whose probability reaches top_p; 1 disables it.
  min_p: keep tokens at least min_p times as likely as the most likely one; 0 disables it.
  repetition_penalty: CTRL / transformers rule over prompt and generated tokens; 1 disables it.
  presence_penalty, frequency_penalty: OpenAI's, over generated tokens only, in [-2, 2].
  stop: strings that end the completion (not included in it). A single string is accepted.
  stop_token_ids: token ids that end the completion, in addition to the end-of-sequence tokens.
  ignore_eos: keep generating past end-of-sequence tokens.
  n: completions to generate for the prompt.
  seed: seeds the request's random stream, in [0, 2**32); None lets the engine draw one.
  logprobs: report the log-probability of each chosen token under the model's raw distribution.
  prompt_logprobs: report the log-probability of each prompt token given those before it, under the same raw
    distribution (None for the first token), computed in the prefill; once per request, whatever n is.
  top_logprobs: also report, at each generated position, the top_logprobs most likely tokens and their
    log-probabilities under the raw distribution (0 to TOP_LOGPROBS; more than 0 turns logprobs on).
  speculative: on a speculative engine (`qwenjax.engine.speculative`), whether this request's steps propose
    tokens; false: it decodes one token per step (its outputs are the same either way).
  """

  max_tokens: int = 256
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  n: int = 1
  seed: int | None = None
  logprobs: bool = False
  prompt_logprobs: bool = False
  top_logprobs: int = 0
  speculative: bool = True

  def __post_init__(self):
    def fix(name, value):
      object.__setattr__(self, name, value)

    for name in ("max_tokens", "n"):
      value = getattr(self, name)
      if not (_is_int(value) and value >= 1):
        raise InputError(f"{name} must be an integer >= 1, got {value!r}.")
      fix(name, int(value))
    if not (_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= TOP_LOGPROBS):
      raise InputError(f"top_logprobs must be an integer in [0, {TOP_LOGPROBS}], got {self.top_logprobs!r}.")
    fix("top_logprobs", int(self.top_logprobs))
    if not (_is_int(self.top_k) and self.top_k >= 0):
      raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}.")
    fix("top_k", int(self.top_k))

    floats = {  # name -> (test, what the message says it must be)
        "temperature": (lambda x: x >= 0, "a finite number >= 0"),
        "top_p": (lambda x: 0 < x <= 1, "a number in (0, 1]"),
        "min_p": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
        "repetition_penalty": (lambda x: x > 0, "a finite number > 0"),
        "presence_penalty": (lambda x: -2 <= x <= 2, "a number in [-2, 2]"),
        "frequency_penalty": (lambda x: -2 <= x <= 2, "a number in [-2, 2]"),
    }
    for name, (ok, must) in floats.items():
      value = getattr(self, name)
      if not (_is_real(value) and ok(value)):
        raise InputError(f"{name} must be {must}, got {value!r}.")
      fix(name, float(value))

    stop = (self.stop,) if isinstance(self.stop, str) else self.stop
    if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
      raise InputError(f"stop must be a string or a list of strings, got {self.stop!r}.")
    if any(not s for s in stop):
      raise InputError(f"stop must not contain an empty string, got {self.stop!r}.")
    fix("stop", tuple(stop))

    ids = self.stop_token_ids
    if not (isinstance(ids, (list, tuple)) and all(_is_int(i) and i >= 0 for i in ids)):
      raise InputError(f"stop_token_ids must be a list of integers >= 0, got {ids!r}.")
    fix("stop_token_ids", tuple(int(i) for i in ids))

    for name in ("ignore_eos", "logprobs", "prompt_logprobs", "speculative"):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be true or false, got {value!r}.")
      fix(name, bool(value))
    if self.top_logprobs:
      fix("logprobs", True)

    if self.seed is not None:
      if not (_is_int(self.seed) and 0 <= self.seed < _MAX_SEED):
        raise InputError(f"seed must be null or an integer in [0, 2**32), got {self.seed!r}.")
      fix("seed", int(self.seed))

  @property
  def greedy(self) -> bool:
    return self.temperature < _MIN_TEMPERATURE

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], base: SamplingParams | None = None) -> SamplingParams:
    """Parameters from a request's JSON object (OpenAI names), over `base` (default: the defaults).

    A null value keeps base's value (OpenAI clients send nulls for unset fields), except for seed, where null
    means "draw one".
    """
    if not isinstance(d, Mapping):
      raise InputError(f"sampling parameters must be a JSON object, got {type(d).__name__}.")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
      if key not in names:
        raise InputError(f"unknown sampling parameter {key!r}; expected one of {', '.join(names)}.")
    updates = {k: v for k, v in d.items() if v is not None or k == "seed"}
    return dataclasses.replace(base if base is not None else cls(), **updates)
