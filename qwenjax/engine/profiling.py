"""Compilations, as jax.monitoring reports them: one listener for the process, which every counter here shares.

    with count_compilations() as compiled:             # XLA compilations by function name, inside the block
      generator.generate(prompts, sampling)
    assert compiled["prefill_impl"] <= len(buckets)
    timer = CompileTimer()                              # from now on: seconds spent compiling, and compilations
    trim_after_compilations()                           # hand the compiler's freed heap back to the system
    trim_heap()                                         # the same, once, now (before reading the resident memory)
    limit_malloc_arenas()                               # before jax starts its threads: one malloc arena per core

Bucketing promises are checked with the first (tests, benchmarks); a batch job reports the second in its summary.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator

from jax import monitoring

# jax.monitoring duration events of a compilation (tracing, lowering, XLA compile or a persistent-cache read); the
# last one is the XLA compilation itself (a cache miss), once per program.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_BACKEND_COMPILE_EVENT = COMPILE_EVENTS[-1]

_Handler = Callable[[str, float, dict], None]
_handlers: list[_Handler] = []
_lock = threading.Lock()
_registered = False


def _listen(event: str, duration: float, **kwargs) -> None:
  """The process's one jax.monitoring listener: every compile event to every handler (jax calls it from the
  compiling thread)."""
  if event in COMPILE_EVENTS:
    for handler in tuple(_handlers):
      handler(event, duration, kwargs)


def _subscribe(handler: _Handler) -> None:
  global _registered
  with _lock:
    if not _registered:  # once for the process, whoever asks first
      monitoring.register_event_duration_secs_listener(_listen)
      _registered = True
    _handlers.append(handler)


def _unsubscribe(handler: _Handler) -> None:
  with _lock:
    _handlers.remove(handler)


@contextlib.contextmanager
def count_compilations() -> Iterator[collections.Counter]:
  """Yields a Counter of function name -> backend compilations (cache misses) inside the block.

      with count_compilations() as compiled:
        generator.generate(prompts, sampling)
      assert compiled["prefill_impl"] <= len(buckets)
  """
  counts: collections.Counter = collections.Counter()

  def count(event: str, duration: float, details: dict) -> None:
    del duration
    if event == _BACKEND_COMPILE_EVENT:
      counts[details.get("fun_name", "?")] += 1

  _subscribe(count)
  try:
    yield counts
  finally:
    _unsubscribe(count)


class CompileTimer:
  """Seconds this process spent compiling since the timer was made: the sum of jax.monitoring's compile duration
  events, and `count`, the XLA compilations among them (the total is only read)."""

  def __init__(self):
    self.seconds, self.count = 0.0, 0
    _subscribe(self._add)

  def _add(self, event: str, duration: float, details: dict) -> None:
    del details
    self.seconds += duration
    self.count += event == _BACKEND_COMPILE_EVENT


_M_ARENA_MAX = -8  # glibc's malloc.h: mallopt's parameter for the most arenas malloc makes


@functools.cache
def _libc() -> ctypes.CDLL | None:
  """glibc, or None (another system). Looked up once."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None


def limit_malloc_arenas(count: int | None = None) -> bool:
  """Caps the malloc arenas glibc makes from now on at `count` (default: one per core this process may run on;
  glibc's own cap is eight per core). Under the cap glibc gives each new thread that allocates an arena of its own,
  which keeps the free memory of the largest blocks its threads held: XLA:CPU's compiler and executor threads
  allocate each program's temporaries, so on the embedded model a 32-slot w8a16 job on 2 cores peaked 51 MB lower
  with two arenas (2.34 against 2.39 GiB, three runs each). Call it before jax starts its threads; arenas made
  already stay. False where the C library has no mallopt or refuses (nothing is done)."""
  libc = _libc()
  mallopt = getattr(libc, "mallopt", None)
  if mallopt is None:
    return False
  if count is None:
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return bool(mallopt(_M_ARENA_MAX, max(1, int(count))))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
  """glibc's malloc_trim, or None (another C library, another system). Looked up once."""
  return getattr(_libc(), "malloc_trim", None)  # musl and others have no malloc_trim


def trim_heap() -> bool:
  """Hands the free heap of every malloc arena back to the system now (glibc's `malloc_trim(0)`), so that the
  resident memory read next counts what is in use, not what the allocator keeps for later. False where the C
  library has no malloc_trim (nothing is done)."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True


_trim_handler: _Handler | None = None


def trim_after_compilations() -> bool:
  """After every XLA compilation of this process from now on, hands the heap memory the compiler freed back to the
  system (glibc's `malloc_trim(0)`). XLA compiles on threads of their own, and glibc keeps what they free in
  per-thread arenas: on the embedded model a 32-slot w8a8 engine's 10 programs left ~150 MB of free heap resident
  (the process's peak RSS 2.27-2.31 GiB with the trim, 2.44-2.47 GiB without). Returns False where the C library
  has no malloc_trim (nothing is done). Idempotent: one handler for the process."""
  global _trim_handler
  if _malloc_trim() is None:
    return False
  with _lock:
    if _trim_handler is not None:
      return True

    def handler(event: str, duration: float, details: dict) -> None:
      del duration, details
      if event == _BACKEND_COMPILE_EVENT:
        trim_heap()

    _trim_handler = handler
  _subscribe(handler)
  return True
