"""Jitted prefill and decode steps: pure functions of (graphdef, params, cache, inputs), the cache donated.

    graphdef, params = nnx.split(model)
    cache = KVCache.zeros(cfg, batch, max_len)
    logits, cache = prefill(graphdef, params, cache, tokens, lengths)   # tokens [B, T] padded to a bucket
    logits, cache = decode_step(graphdef, params, cache, next_tokens)    # next_tokens [B]

On a device mesh, place params and cache with `qwenjax.parallel.sharding` (`shard_model`, `KVCache.zeros(...,
sharding=cache_sharding(...))`) and call the steps inside `sharding.use_mesh(mesh)`: each returns the cache in the
layout it came in.

`*_impl` are the same steps unjitted, for composing into larger jitted functions (sampling, several decode
steps per call). Each step returns float32 logits and the cache with `lengths` advanced. Prompt lengths pad to `LengthBuckets`
so a long-running process compiles one prefill program per bucket (and per batch size), not per prompt.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.model.decoder import KVCache


def _run(graphdef, params, cache: KVCache, tokens, num_new, rows, *, fresh: bool, all_logits: bool,
         kv_len: int | None = None, rope_positions=None, rope_offset=None, embeds=None):
  """Runs tokens [B, T] at positions lengths + [0, T) of cache rows `rows` ([B], None: all rows in order);
  num_new [B] of them are real, the rest padding.

  RoPE positions are the cache positions plus each row's `rope_offset`, unless `rope_positions` ([3, B, T] for
  M-RoPE) gives them; `rope_offset` [B], when given, becomes the rows' offset for the tokens that follow."""
  model = nnx.merge(graphdef, params)
  b, t = tokens.shape
  row = (lambda a: a) if rows is None else (lambda a: a[rows])
  lengths = row(cache.lengths)  # [B]
  positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
  if rope_positions is None:
    rope_positions = positions + row(cache.rope_offset)[:, None]
  h, cache = model(tokens, positions, cache, rows=rows, attend_to_cache=not fresh, kv_len=kv_len,
                   rope_positions=rope_positions, embeds=embeds)  # [B, T, D]
  cache = dataclasses.replace(cache, lengths=_set_rows(cache.lengths, rows, lengths + num_new))
  if rope_offset is not None:
    cache = dataclasses.replace(cache, rope_offset=_set_rows(cache.rope_offset, rows, rope_offset))
  cache = cache.constrained()  # under a mesh (`qwenjax.parallel.sharding.use_mesh`): returned in the layout it came in
  if all_logits:
    return model.logits(h), cache  # [B, T, V]
  last = jnp.take_along_axis(h, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
  return model.logits(last), cache  # [B, V]


def _set_rows(array: jax.Array, rows, values: jax.Array) -> jax.Array:
  return values if rows is None else array.at[rows].set(values)


def prefill_impl(graphdef, params, cache: KVCache, tokens: jax.Array, lengths: jax.Array, rows=None,
                 all_logits: bool = False, rope_positions=None, rope_offset=None, embeds=None):
  """Prompts into empty cache rows. tokens: [B, T] right-padded; lengths: [B] true prompt lengths; rows: [B]
  the cache rows to fill (None: rows 0..B-1 of a B-row cache).

  Multimodal prompts also pass rope_positions [3, B, T] (M-RoPE), rope_offset [B] (rotary minus cache
  position after the prompt) and embeds (vision features [M, D], index [B, T]; see `Qwen2.__call__`).
  Attends within the prompt only (T x T, not T x S). Returns logits at each prompt's last token [B, V] (or at
  every position [B, T, V] with all_logits) and the cache holding the prompts.
  """
  empty = jnp.zeros_like(cache.lengths if rows is None else rows)
  cache = dataclasses.replace(cache, lengths=_set_rows(cache.lengths, rows, empty))
  if rope_offset is None:
    rope_offset = empty
  return _run(graphdef, params, cache, tokens, lengths, rows, fresh=True, all_logits=all_logits,
              rope_positions=rope_positions, rope_offset=rope_offset, embeds=embeds)


def extend_impl(graphdef, params, cache: KVCache, tokens: jax.Array, num_new: jax.Array, rows=None,
                all_logits: bool = False, rope_positions=None, rope_offset=None, embeds=None):
  """Appends tokens [B, T] (num_new [B] real) after what cache rows `rows` hold: chunked prefill, prefixes."""
  return _run(graphdef, params, cache, tokens, num_new, rows, fresh=False, all_logits=all_logits,
              rope_positions=rope_positions, rope_offset=rope_offset, embeds=embeds)


def decode_step_impl(graphdef, params, cache: KVCache, tokens: jax.Array, kv_len: int | None = None):
  """One token per sequence, each at its own position. tokens: [B] -> logits [B, V].

  kv_len (static): attend to positions [0, kv_len) only; every row's position must be below it. A cache of
  4096 positions holding 300-token sequences then reads 512 positions per step, not 4096."""
  return _run(graphdef, params, cache, tokens[:, None], jnp.ones_like(cache.lengths), None, fresh=False,
              all_logits=False, kv_len=kv_len)


_jit = functools.partial(jax.jit, static_argnames=("graphdef", "all_logits"), donate_argnames=("cache",))
prefill = _jit(prefill_impl)
extend = _jit(extend_impl)
decode_step = jax.jit(decode_step_impl, static_argnames=("graphdef", "kv_len"), donate_argnames=("cache",))


@dataclasses.dataclass(frozen=True)
class LengthBuckets:
  """The padded lengths prompts are compiled at: powers of two from `minimum`, capped at `maximum`."""

  maximum: int
  minimum: int = 16

  @property
  def sizes(self) -> tuple[int, ...]:
    sizes, s = [], self.minimum
    while s < self.maximum:
      sizes.append(s)
      s *= 2
    return tuple(sizes) + (self.maximum,)

  def bucket(self, length: int) -> int:
    """The smallest bucket that holds `length` tokens."""
    sizes = self.sizes
    i = bisect.bisect_left(sizes, length)
    if i == len(sizes):
      raise ValueError(f"{length} tokens exceed the largest bucket ({sizes[-1]}).")
    return sizes[i]
