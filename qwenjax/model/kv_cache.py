"""The decoder's KV caches: a pool of pages (`PagedKVCache`, fixed-size pages that sequences take as they grow: the
engine's) and contiguous rows (`KVCache`, one row of S positions per sequence: the library steps' `prefill`,
`extend` and `decode_step`), with their in-place writers and the sizing arithmetic that the engine and the planner
share.

Legend: L layers, B (or C) cache rows, K KV heads, S positions, T tokens written, H head dim, NP pages in the pool,
PS tokens per page.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh

from qwenjax.config import QwenConfig
from qwenjax.kernels.paged_attention import pool_dtype, scatter_index, to_pool
from qwenjax.parallel.axes import (
  BATCH,
  DEFAULT_RULES,
  HEAD_DIM,
  KV_HEADS,
  LAYERS,
  LENGTH,
  PAGES,
  ShardingRules,
  constrain,
)
from qwenjax.parallel.sharding import named_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer, one row per sequence.

  k, v: [L, B, K, S, H], logical axes (layers, batch, kv_heads, length, head_dim). Position p of sequence b
    lives at [:, b, :, p]; keys are stored after RoPE. Heads before positions, so that attention reads each
    head's [S, H] block contiguously (no per-step transpose of the cache). In the compute dtype; bfloat16 on CPU
    as its bits, uint16 (`paged_attention.pool_dtype`: XLA:CPU converts a whole bfloat16 cache around each write).
  lengths: [B] int32, tokens held per sequence = the position the next token is written to. Slots at or past
    `lengths` hold stale data; attention never reads them because keys past the query's position are masked.
  rope_offset: [B] int32, RoPE position minus cache position of the tokens that follow (0 for text; with
    M-RoPE, an image's tokens advance the rotary position by less than their count: Qwen's `rope_deltas`).
  A step writing T tokens (a padded prompt bucket) at position p needs p + T <= S.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  rope_offset: jax.Array

  AXES = (LAYERS, BATCH, KV_HEADS, LENGTH, HEAD_DIM)

  @classmethod
  def zeros(cls, cfg: QwenConfig, batch: int, max_len: int, dtype=jnp.float32,
            sharding: KVCache | None = None) -> KVCache:
    """An empty cache; `sharding` (a KVCache of shardings, `cache_sharding`) allocates
    each device's shards in place."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    where = sharding or cls(None, None, None, None)
    dtype = pool_dtype(dtype)  # bfloat16 on CPU: its bits as uint16, as a PagedKVCache's pages (`pool_dtype`)
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
  new = to_pool(new, cache.dtype).transpose(0, 2, 1, 3)  # [B, K, T, H]

  def body(b, cache):
    return jax.lax.dynamic_update_slice(cache, new[b][None, None], (layer, rows[b], 0, start[b], 0))

  return jax.lax.fori_loop(0, new.shape[0], body, cache)


# Tokens per page, by backend. GPU: 16, the smallest tile Triton's dot takes, so a page wastes at most 15 slots and
# the ragged kernel's [Q * G', page] score tile stays in registers (vLLM's default, for the same reasons). TPU: 128,
# one full sublane-by-lane tile of a [page, H] block per DMA. CPU: 64; gathering pages for XLA attention measured
# the same at 16, 64 and 256 tokens per page (0.5B shapes, 32 sequences of 1024 tokens), and 64 keeps page tables
# short at 32K contexts (512 entries) while wasting under 64 positions per sequence.
PAGE_SIZES = {"cpu": 64, "gpu": 16, "tpu": 128}


def default_page_size(backend: str | None = None) -> int:
  return PAGE_SIZES.get(backend or jax.default_backend(), 16)


def page_bytes(cfg: QwenConfig, page_size: int, dtype, quantized: bool = False) -> int:
  """Bytes of one page over all layers, keys and values: float pages in `dtype`, or int8 plus a float32 scale per
  token and KV head."""
  per_token_head = cfg.head_dim * (1 if quantized else jnp.dtype(dtype).itemsize) + (4 if quantized else 0)
  return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * per_token_head


def pages_for_memory(cfg: QwenConfig, memory_bytes: float, page_size: int, dtype, quantized: bool = False,
                     page_splits: int = 1, head_splits: int = 1) -> int:
  """How many pages a budget of `memory_bytes` per device holds, when the pool's pages split over `page_splits`
  devices (each holding its share) and its KV heads over `head_splits`: a multiple of page_splits."""
  per_device = page_bytes(cfg, page_size, dtype, quantized) / head_splits
  return int(memory_bytes // per_device) * page_splits


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
  """Keys and values of every layer in a pool of pages.

  k, v: [L, NP, PS, K, H], logical axes (layers, pages, -, kv_heads, head_dim): token slot p * PS + o of the pool
    is offset o of page p, its K heads side by side (the layout of `qwenjax.kernels.paged_attention`). Keys are
    stored after RoPE. Float pages in the compute dtype (bfloat16 on CPU as its bits, uint16: `pool_dtype`), or
    int8 with
  k_scale, v_scale: [L, NP, PS, K] float32, one symmetric scale per token and KV head (`quantize_kv`); None for
    float pages.
  Which pages a sequence holds, and how long it is, lives on the host (`qwenjax.engine.pages`): a step gets page
  tables and flat slots as inputs. Slots past a sequence's length hold stale data that attention masks.
  """

  k: jax.Array
  v: jax.Array
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None

  AXES = (LAYERS, PAGES, None, KV_HEADS, HEAD_DIM)
  SCALE_AXES = (LAYERS, PAGES, None, KV_HEADS)

  @classmethod
  def zeros(cls, cfg: QwenConfig, num_pages: int, page_size: int, dtype=jnp.float32, quantized: bool = False,
            sharding: PagedKVCache | None = None) -> PagedKVCache:
    """An empty pool; `sharding` (a PagedKVCache of shardings, `paged_cache_sharding`)
    allocates each device's shards in place."""
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    where = sharding or cls(None, None, None, None)
    dt = jnp.int8 if quantized else pool_dtype(dtype)  # bfloat16 on CPU: its bits as uint16 (`pool_dtype`)
    k, v = jnp.zeros(shape, dt, device=where.k), jnp.zeros(shape, dt, device=where.v)
    if not quantized:
      return cls(k, v)
    return cls(k, v, jnp.zeros(shape[:4], jnp.float32, device=where.k_scale),
               jnp.zeros(shape[:4], jnp.float32, device=where.v_scale))

  def constrained(self) -> PagedKVCache:
    """Inside a jitted step under a mesh: pinned to its sharding (see `KVCache.constrained`)."""
    scale = lambda a: None if a is None else constrain(a, self.SCALE_AXES)
    return PagedKVCache(constrain(self.k, self.AXES), constrain(self.v, self.AXES), scale(self.k_scale),
                        scale(self.v_scale))

  @property
  def quantized(self) -> bool:
    return self.k_scale is not None

  @property
  def num_pages(self) -> int:
    return self.k.shape[1]

  @property
  def page_size(self) -> int:
    return self.k.shape[2]


def write_slots(pages: jax.Array, layer, slots: jax.Array, new: jax.Array) -> jax.Array:
  """pages[layer] at flat token slots `slots` [T] (page * PS + offset; -1: padding, not written) = new [T, ...].

  pages: [L, NP, PS, ...] (K/V pages or their scales). One scatter into the whole pool, in place when the pool is
  donated (measured: 0.3 ms for 24 layers of 32 tokens into a 1.5 GiB pool on XLA:CPU), never a copy of a layer.
  """
  num_layers, num_pages, page_size = pages.shape[:3]
  flat = pages.reshape((num_layers, num_pages * page_size) + pages.shape[3:])
  slots, new = scatter_index(slots, new, num_pages * page_size)  # -1: past the end, dropped
  return flat.at[layer, slots].set(to_pool(new, pages.dtype), mode="drop").reshape(pages.shape)


# ---- shardings ----------------------------------------------------------------------------------------------

def cache_sharding(cfg, mesh: Mesh | AbstractMesh, batch: int, max_len: int,
                   rules: ShardingRules = DEFAULT_RULES):
  """A `KVCache` of NamedShardings for `batch` rows of `max_len` positions of model config `cfg`: k and v by
  `KVCache.AXES` (rows over data, KV heads over tensor), lengths and rope offsets by their batch axis."""
  kv_shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  kv = named_sharding(mesh, KVCache.AXES, kv_shape, rules)
  rows = named_sharding(mesh, (BATCH,), (batch,), rules)
  return KVCache(kv, kv, rows, rows)


def paged_cache_sharding(cfg, mesh: Mesh | AbstractMesh, num_pages: int, page_size: int, quantized: bool = False,
                         rules: ShardingRules = DEFAULT_RULES):
  """A `PagedKVCache` of NamedShardings for a pool of `num_pages` pages: k and v by `PagedKVCache.AXES` (pages over
  data, KV heads over tensor), int8 scales by `SCALE_AXES`."""
  shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
  kv = named_sharding(mesh, PagedKVCache.AXES, shape, rules)
  scale = named_sharding(mesh, PagedKVCache.SCALE_AXES, shape[:4], rules) if quantized else None
  return PagedKVCache(kv, kv, scale, scale)
