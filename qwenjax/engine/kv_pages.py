"""How many KV pages the engine holds, from a memory budget, and where they live on a mesh.

    pages = KVPages.sized(model, max_batch_size=8, max_seq_len=4096, page_size=None, memory_gib=None,
                          quantized=False, mesh=None, rules=DEFAULT_RULES)
    cache = pages.zeros()                    # the PagedKVCache, sharded
    pages.num_pages, pages.context_len       # the pool, and the longest sequence it lets run
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from qwenjax._errors import ConfigError
from qwenjax.config import QwenConfig
from qwenjax.engine.pages import pages_needed
from qwenjax.model.decoder import Qwen2
from qwenjax.model.kv_cache import PagedKVCache, default_page_size, page_bytes, paged_cache_sharding, pages_for_memory
from qwenjax.parallel.axes import KV_HEADS, PAGES, ShardingRules, spec_for

CPU_KV_MEMORY_GIB = 4.0  # the CPU default's cap: host memory beside the weights
DEVICE_KV_FRACTION = 0.9  # TPU/GPU default: this fraction of what a device has free once the weights are on it


@dataclasses.dataclass(frozen=True)
class KVPages:
  """The page pool's size and layout. context_len: the longest sequence (prompt plus generated tokens) that runs,
  max_seq_len or what the whole pool holds if less (longer ones end with finish_reason "length"); max_pages: the
  widest page table."""

  cfg: QwenConfig
  dtype: Any
  num_pages: int
  page_size: int
  quantized: bool
  sharding: jax.sharding.Sharding | None
  context_len: int
  max_pages: int

  @classmethod
  def sized(cls, model: Qwen2, *, max_batch_size: int, max_seq_len: int, page_size: int | None,
            memory_gib: float | None, quantized: bool, mesh: jax.sharding.Mesh | None, rules: ShardingRules
            ) -> KVPages:
    """The pool for `memory_gib` GiB of pages per device (None: on TPU/GPU 90% of what the device has free after
    the weights; on CPU what every slot fills at max_seq_len, at most 4 GiB), never more than every slot fills at
    max_seq_len; pages split over the data axes, KV heads over tensor."""
    cfg = model.cfg
    page_size = page_size or default_page_size()
    if page_size < 1:
      raise ConfigError(f"page_size must be a positive integer, got {page_size}.")
    mesh_shape = dict(mesh.shape) if mesh is not None else {}
    page_splits = math.prod(mesh_shape.get(a, 1) for a in rules[PAGES])  # pages: a multiple of it, split fully
    head_spec = spec_for((KV_HEADS,), (cfg.num_kv_heads,), mesh_shape, rules)[0]
    head_splits = math.prod(mesh_shape[a] for a in ((head_spec,) if isinstance(head_spec, str) else head_spec or ()))
    most = max_batch_size * pages_needed(max_seq_len, page_size)
    if memory_gib is None:
      memory_gib = _default_memory_gib(model, most, page_size, quantized, head_splits * page_splits)
    if not memory_gib > 0:
      raise ConfigError(f"kv_cache_memory must be a positive number of GiB, got {memory_gib}.")
    num_pages = pages_for_memory(cfg, memory_gib * 2**30, page_size, model.dtype, quantized, page_splits, head_splits)
    # Never more than every slot can fill at max_seq_len (a topology planned for a larger device, one slot).
    num_pages = min(num_pages, -(-most // page_splits) * page_splits)
    if num_pages < page_splits:
      raise ConfigError(f"kv_cache_memory={memory_gib:g} GiB holds no page of {page_size} tokens for this model "
                        f"({PagedKVCache.__name__} of {cfg.num_layers} layers, {cfg.num_kv_heads} KV heads).")
    where = None if mesh is None else paged_cache_sharding(cfg, mesh, num_pages, page_size, quantized, rules)
    context_len = min(max_seq_len, num_pages * page_size)
    max_pages = pages_needed(context_len, page_size)
    return cls(cfg, model.dtype, num_pages, page_size, quantized, where, context_len, max_pages)

  def for_draft(self, draft: Qwen2, mesh: jax.sharding.Mesh | None, rules: ShardingRules) -> KVPages:
    """The same pool (page count, page size, int8 or not) for a speculative engine's draft model: its pages carry
    the target's page ids, so the host's page tables serve both. Its memory comes on top of the target's budget
    (a draft's layers and heads are a fraction of the target's)."""
    where = None if mesh is None else paged_cache_sharding(draft.cfg, mesh, self.num_pages, self.page_size,
                                                           self.quantized, rules)
    return dataclasses.replace(self, cfg=draft.cfg, dtype=draft.dtype, sharding=where)

  def zeros(self) -> PagedKVCache:
    return PagedKVCache.zeros(self.cfg, self.num_pages, self.page_size, self.dtype, self.quantized,
                              sharding=self.sharding)


def _default_memory_gib(model: Qwen2, pages: int, page_size: int, quantized: bool, splits: int) -> float:
  """The page pool's budget per device when none is given (see `KVPages.sized`)."""
  stats = None if jax.default_backend() == "cpu" else jax.local_devices()[0].memory_stats()
  if stats and stats.get("bytes_limit"):
    return DEVICE_KV_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 2**30
  full = pages * page_bytes(model.cfg, page_size, model.dtype, quantized) / splits
  return min(CPU_KV_MEMORY_GIB, full / 2**30)
