"""Counting XLA compilations, so bucketing promises can be checked (tests) and reported (benchmarks)."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from jax import monitoring

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations() -> Iterator[collections.Counter]:
  """Yields a Counter of function name -> backend compilations (cache misses) inside the block.

      with count_compilations() as compiled:
        generator.generate(prompts, sampling)
      assert compiled["prefill_impl"] <= len(buckets)
  """
  counts: collections.Counter = collections.Counter()

  def listener(event: str, duration: float, **kwargs) -> None:
    del duration
    if event == _BACKEND_COMPILE_EVENT:
      counts[kwargs.get("fun_name", "?")] += 1

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    monitoring.unregister_event_duration_listener(listener)
