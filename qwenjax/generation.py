"""Batched generation on top of the jitted steps: bucketed prefill, a decode loop, sampling, stop handling.

    gen = Generator(model, tokenizer, max_seq_len=2048)
    [completion] = gen.generate([tokenizer.encode("def fib(n):")], SamplingParams(max_tokens=64))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import steps
from qwenjax._errors import InputError
from qwenjax.model import KVCache, Qwen2


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

  max_tokens: int = 128
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  ignore_eos: bool = False

  def __post_init__(self):
    if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
      raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}.")
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise InputError(f"temperature must be a finite number >= 0, got {self.temperature!r}.")
    if not 0 < self.top_p <= 1:
      raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}.")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}.")


@dataclasses.dataclass
class Completion:
  token_ids: list[int]
  finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_tokens, or the context is full)
  prompt_tokens: int
  text: str = ""


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
  """Next tokens [B] from float32 logits [B, V], one PRNG key per row.

  Rows with temperature 0 take the argmax. Others scale by 1/temperature, keep the top_k most likely tokens
  (0: all), then the smallest set whose probability reaches top_p, and draw from what is left.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  order = jnp.argsort(-scaled, axis=-1)  # [B, V] descending
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  rank = jnp.arange(logits.shape[-1])[None, :]
  keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
  probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly ahead of each token
  keep &= before < top_p[:, None]
  choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, sorted_logits, -jnp.inf))
  sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def _keys(seeds: jax.Array, step: jax.Array) -> jax.Array:
  """One PRNG key per row from its request's seed and the step: a row's draws ignore its batch mates."""
  return jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), step))(seeds)


def _pick(logits, seeds, step, temperature, top_k, top_p, greedy):
  if greedy:  # static: a greedy batch skips the sort over the vocabulary
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample(logits, _keys(seeds, step), temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _prefill_and_sample(graphdef, params, cache, tokens, lengths, seeds, temperature, top_k, top_p, greedy):
  logits, cache = steps.prefill_impl(graphdef, params, cache, tokens, lengths)
  return _pick(logits, seeds, 0, temperature, top_k, top_p, greedy), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _decode_and_sample(graphdef, params, cache, tokens, step, seeds, temperature, top_k, top_p, greedy):
  logits, cache = steps.decode_step_impl(graphdef, params, cache, tokens)
  return _pick(logits, seeds, step, temperature, top_k, top_p, greedy), cache


def _batch_bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class Generator:
  """Generates from a batch of prompts with one jitted prefill per length bucket and one jitted decode step.

  max_seq_len: the KV cache's length per sequence: prompt plus generated tokens never exceed it.
  """

  def __init__(self, model: Qwen2, eos_token_ids: Sequence[int] = (), *, max_seq_len: int | None = None,
               min_bucket: int = 16):
    self.cfg = model.cfg
    self.graphdef, self.params = nnx.split(model)
    self.cache_dtype = model.dtype
    self.max_seq_len = max_seq_len or min(self.cfg.max_position_embeddings, 4096)
    self.buckets = steps.LengthBuckets(maximum=self.max_seq_len, minimum=min(min_bucket, self.max_seq_len))
    self.eos_token_ids = frozenset(eos_token_ids)
    self._caches: dict[int, KVCache] = {}  # batch size -> a cache to reuse

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
               ) -> list[Completion]:
    """Prompts (token ids) -> completions, in order. Prompts of any lengths share one batch."""
    if not prompts:
      return []
    params_list = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    n = len(prompts)
    for i, p in enumerate(prompts):
      if not p:
        raise InputError(f"prompt {i} is empty.")
      if len(p) + params_list[i].max_tokens > self.max_seq_len:
        raise InputError(f"prompt {i} has {len(p)} tokens; with max_tokens={params_list[i].max_tokens} it "
                         f"exceeds the context of {self.max_seq_len} tokens.")
    b = _batch_bucket(n)
    t = self.buckets.bucket(max(len(p) for p in prompts))
    tokens = np.zeros((b, t), np.int32)
    lengths = np.ones((b,), np.int32)  # padding rows hold one dummy token
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      lengths[i] = len(p)
    pad = lambda xs, fill: np.array(list(xs) + [fill] * (b - n))
    temperature = pad((s.temperature for s in params_list), 0.0).astype(np.float32)
    top_k = pad((s.top_k for s in params_list), 0).astype(np.int32)
    top_p = pad((s.top_p for s in params_list), 1.0).astype(np.float32)
    seeds = pad((s.seed for s in params_list), 0).astype(np.uint32)
    greedy = bool(np.all(temperature == 0))
    sample_args = (seeds, temperature, top_k, top_p)

    # Host arrays go straight into the jitted steps; the cache of each batch size is allocated once and
    # handed back and forth (donated), its stale rows overwritten by the next prefill.
    cache = self._caches.pop(b, None) or KVCache.zeros(self.cfg, b, self.max_seq_len, self.cache_dtype)
    next_tok, cache = _prefill_and_sample(self.graphdef, self.params, cache, tokens, lengths, *sample_args,
                                          greedy=greedy)
    out = [Completion([], "length", len(p)) for p in prompts]
    done = np.zeros(b, bool)
    done[n:] = True
    max_steps = max(s.max_tokens for s in params_list)
    for step in range(max_steps):
      host_tok = np.asarray(next_tok)
      for i in range(n):
        if done[i]:
          continue
        tok = int(host_tok[i])
        out[i].token_ids.append(tok)
        if tok in self.eos_token_ids and not params_list[i].ignore_eos:
          out[i].finish_reason, done[i] = "stop", True
        elif len(out[i].token_ids) >= params_list[i].max_tokens:
          done[i] = True
      if done.all():
        break
      next_tok, cache = _decode_and_sample(self.graphdef, self.params, cache, next_tok, np.int32(step + 1),
                                           *sample_args, greedy=greedy)
    self._caches[b] = cache
    return out
