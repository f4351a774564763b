"""The decoder's KV cache: keys and values of every layer, one row per sequence, and the in-place row writer.

Legend: L layers, B (or C) cache rows, K KV heads, S positions, T tokens written, H head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwenjax.config import QwenConfig
from qwenjax.parallel.axes import BATCH, HEAD_DIM, KV_HEADS, LAYERS, LENGTH, constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer, one row per sequence.

  k, v: [L, B, K, S, H], logical axes (layers, batch, kv_heads, length, head_dim). Position p of sequence b
    lives at [:, b, :, p]; keys are stored after RoPE. Heads before positions, so that attention reads each
    head's [S, H] block contiguously (no per-step transpose of the cache).
  lengths: [B] int32, tokens held per sequence = the position the next token is written to. Slots at or past
    `lengths` hold stale data; attention never reads them because keys past the query's position are masked.
  rope_offset: [B] int32, RoPE position minus cache position of the tokens that follow (0 for text; with
    M-RoPE, an image's tokens advance the rotary position by less than their count: Qwen's `rope_deltas`).
  A step writing T tokens (a padded prompt bucket) at position p needs p + T <= S: `qwenjax.Engine` allocates
  its largest prefill chunk of headroom past the context it serves.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  rope_offset: jax.Array

  AXES = (LAYERS, BATCH, KV_HEADS, LENGTH, HEAD_DIM)

  @classmethod
  def zeros(cls, cfg: QwenConfig, batch: int, max_len: int, dtype=jnp.float32,
            sharding: KVCache | None = None) -> KVCache:
    """An empty cache; `sharding` (a KVCache of shardings, `qwenjax.parallel.sharding.cache_sharding`) allocates
    each device's shards in place."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    where = sharding or cls(None, None, None, None)
    return cls(jnp.zeros(shape, dtype, device=where.k), jnp.zeros(shape, dtype, device=where.v),
               jnp.zeros((batch,), jnp.int32, device=where.lengths),
               jnp.zeros((batch,), jnp.int32, device=where.rope_offset))

  def constrained(self) -> KVCache:
    """Inside a jitted step under a mesh: the cache pinned to its sharding, so that a step returns it laid out as
    it came (donation reuses the buffers, and the layout never drifts). Without a mesh: itself."""
    return KVCache(constrain(self.k, self.AXES), constrain(self.v, self.AXES), constrain(self.lengths, (BATCH,)),
                   constrain(self.rope_offset, (BATCH,)))

  @property
  def max_len(self) -> int:
    return self.k.shape[3]


def write_rows(cache: jax.Array, layer, rows: jax.Array, start: jax.Array, new: jax.Array) -> jax.Array:
  """cache[layer, rows[b], :, start[b]:start[b]+T] = new[b] for each b. cache: [L, C, K, S, H]; new: [B, T, K, H].

  One in-place dynamic_update_slice per row, in a loop: XLA:CPU lowers the equivalent scatter to a loop fusion
  that rewrites the whole cache, once per layer (4.8 GB per step for 32 rows of 256 positions of the 0.5B model).
  A slice that would run past the cache's end is clamped by XLA, so callers leave T positions of headroom.
  """
  new = new.astype(cache.dtype).transpose(0, 2, 1, 3)  # [B, K, T, H]

  def body(b, cache):
    return jax.lax.dynamic_update_slice(cache, new[b][None, None], (layer, rows[b], 0, start[b], 0))

  return jax.lax.fori_loop(0, new.shape[0], body, cache)
