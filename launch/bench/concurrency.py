"""How many sequences a fixed KV cache budget keeps decoding at once at a long context: paged, against a cache of
one max_seq_len row per slot.

  contiguous: budget // one slot's row, computed (the engine before the page pool, which reserved every slot's
    whole context): L layers x 2 (keys, values) x K KV heads x H head dim x itemsize x (max_seq_len +
    max_prefill_chunk) bytes (the chunk is the headroom a padded last prefill chunk writes into).
  paged: measured: an Engine with many slots and a page pool of the budget serves the batch job's prompts, greedy,
    end-of-sequence ignored, a few tokens each; its stats["peak_sequences"] is the most that decoded at once.
"""

from __future__ import annotations

import time

from absl import logging


def contiguous_row_bytes(cfg, itemsize: int, max_seq_len: int, max_prefill_chunk: int) -> int:
  """Bytes of one slot of the contiguous KV cache (qwenjax.KVCache) of `max_seq_len` positions."""
  return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize * (max_seq_len + max_prefill_chunk)


def measure(model, tokenizer, requests: list[dict], *, memory_gib: float, max_seq_len: int, max_batch_size: int,
            new_tokens: int, max_prefill_chunk: int = 512) -> dict:
  """The report's "concurrency" section: both sequence counts for `memory_gib` of KV cache."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.pages import pages_needed  # pylint: disable=g-import-not-at-top

  cfg, budget = model.cfg, memory_gib * 2**30
  row = contiguous_row_bytes(cfg, jnp.dtype(model.dtype).itemsize, max_seq_len, max_prefill_chunk)
  start = time.perf_counter()
  engine = qwenjax.Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                          max_prefill_chunk=max_prefill_chunk, kv_cache_memory=memory_gib)
  prompts = [engine.prepare({"messages": r["messages"]}) for r in requests]
  engine.generate(prompts, qwenjax.SamplingParams(max_tokens=new_tokens, ignore_eos=True))
  seconds = time.perf_counter() - start
  stats, pages = dict(engine.stats()), engine.pool.num_pages
  peak, most = stats["peak_sequences"], min(max_batch_size, len(prompts))
  limited_by = "pages" if peak < most else "slots" if max_batch_size <= len(prompts) else "requests"
  mean_pages = sum(pages_needed(len(p) + new_tokens, engine.page_size) for p in prompts) / len(prompts)
  contiguous = int(budget // row)
  paged = {"max_batch_size": max_batch_size, "requests": len(prompts), "new_tokens": new_tokens,
           "page_size": engine.page_size, "pool_pages": pages, "peak_sequences": peak, "limited_by": limited_by,
           "pool_holds_sequences_of_this_job": int(pages // mean_pages), "stats": stats, "wall_s": seconds}
  logging.info("Concurrency at %d positions, %.3g GiB: contiguous %d sequences, paged %d (%s).", max_seq_len,
               memory_gib, contiguous, peak, limited_by)
  del engine
  return {"max_seq_len": max_seq_len, "kv_cache_memory_gib": memory_gib, "max_prefill_chunk": max_prefill_chunk,
          "contiguous_row_bytes": row, "contiguous_sequences": contiguous, "paged": paged}
