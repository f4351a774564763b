"""Bucketing is a promise: each engine step is one model program keyed by its padded token count, then one sampler
keyed by its sampling variant, so prompts of any length and any mix compile a small, fixed set."""

import ctypes
import ctypes.util
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from launch.bench.measure import rss_mib
from qwenjax import Engine, Request, SamplingParams
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine import profiling
from qwenjax.engine.profiling import count_compilations


def _engine(path, **kw):
  return Engine(load_model(path), None, eos_token_ids=(), **{**dict(max_batch_size=4, max_seq_len=2048,
                                                                    max_prefill_chunk=512, page_size=16), **kw})


def test_a_job_within_three_tokens_of_an_earlier_one_compiles_at_most_two_more_programs(tiny_factory):
  """13 prompts from 8 to 1,500 tokens, then 48 prompts each within 3 tokens of one of them. The step's programs are
  keyed by its prefill part (a bucket of 16..512 tokens, beside the 4 decode slots), its sampler by the sampling
  variant; page tables are max_pages wide for every length. So the first job compiles at most the 5 step buckets,
  the sampler, the decode block and the slot reset and page copy, and the second, packing its prompts
  differently, almost nothing."""
  path, _ = tiny_factory("compile", num_key_value_heads=2)
  engine = _engine(path)
  assert engine.buckets.sizes == (16, 32, 64, 128, 256, 512)
  lengths = np.geomspace(8, 1500, 13).astype(int)
  rng = np.random.default_rng(0)
  prompt = lambda n: rng.integers(0, 300, size=int(n)).tolist()
  jax.clear_caches()  # programs other tests compiled in this process would be reused
  with count_compilations() as first:
    engine.generate([prompt(n) for n in lengths], SamplingParams(max_tokens=4))
  steps = sum(c for name, c in first.items() if "ragged_step" in name)
  assert 1 <= steps <= len(engine.buckets.sizes), first
  assert sum(first.values()) <= steps + 5, first  # the sampler, the decode block, slot reset, page copy, a slice
  near = [int(n) + int(d) for n, d in zip(np.resize(lengths, 48), rng.integers(-3, 4, size=48))]
  with count_compilations() as second:
    engine.generate([prompt(n) for n in near], SamplingParams(max_tokens=4))
  assert sum(second.values()) <= 2, second


def test_mixed_sampling_variants_compile_nothing_after_warm_up(tiny_factory):
  """warm_up runs every prefill part's step and every variant's sampler and decode block; then greedy, sampled and
  penalised requests of every length come and go together and compile nothing."""
  path, _ = tiny_factory("compile", num_key_value_heads=2)
  engine = _engine(path, max_seq_len=512, max_prefill_chunk=128)
  shapes = engine.program_shapes()
  assert shapes == {"step": [16, 32, 64, 128], "sample": [4], "decode": [4], "restore_slot": [512],
                    "copy_pages": [4]}
  with count_compilations() as warm:
    ran = engine.warm_up()
  assert ran == 4 + 3 * (1 + 1) + 1 + 1
  assert sum(warm.values()) <= ran + 2, warm  # and a slice or two of the host's reads
  rng = np.random.default_rng(1)
  workload = [Request(prompt=rng.integers(0, 300, size=int(n)).tolist(),
                      sampling=SamplingParams(max_tokens=int(rng.integers(1, 12)), temperature=[0.0, 0.9, 0.7][i % 3],
                                              seed=i, top_k=[0, 0, 5][i % 3], repetition_penalty=[1, 1, 1.3][i % 3]))
              for i, n in enumerate(rng.integers(1, 400, size=30))]
  with count_compilations() as compiled:
    outs = engine.generate(workload)
  assert sum(compiled.values()) == 0, compiled
  assert all(len(o.token_ids) == r.sampling.max_tokens for o, r in zip(outs, workload))


def test_an_xla_compilation_hands_the_heap_freed_before_it_back_to_the_system():
  """200 MB of 64 KiB blocks (heap, not mmap: glibc maps only blocks of 128 KiB and up) are written and freed below
  one kept block, so glibc cannot shrink the heap from its top and keeps them resident, as it keeps what XLA's
  compile threads free. The next compilation gives them back: the process's resident memory falls by most of it."""
  if not profiling.trim_after_compilations():
    pytest.skip("this C library has no malloc_trim")
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  block, count = 64 << 10, 3200
  blocks = [libc.malloc(block) for _ in range(count)]
  keep = libc.malloc(block)  # above the freed blocks: the heap's top stays in use
  for b in blocks:
    ctypes.memset(b, 1, block)
  for b in blocks:
    libc.free(b)
  held = rss_mib()
  jax.jit(lambda x: x * 3 + 1).lower(np.float32(0)).compile()  # a program no test compiled before
  released = held - rss_mib()  # MiB
  libc.free(keep)
  assert released > 0.6 * block * count / 2**20, (held, released)


_ARENAS_SCRIPT = """
import ctypes, ctypes.util, sys, tempfile, threading
from qwenjax.engine import profiling
cap = int(sys.argv[1])
if cap and not profiling.limit_malloc_arenas(cap):
  print("no mallopt"); sys.exit(0)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
together = threading.Barrier(7)
def allocate():  # a thread's first malloc gives it an arena: a new one while glibc's cap allows
  libc.malloc(1 << 12)
  together.wait()
  together.wait()
threads = [threading.Thread(target=allocate) for _ in range(6)]
for t in threads:
  t.start()
together.wait()  # all six alive, each with its first block
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
  out = libc.fopen(f.name.encode(), b"w")
  libc.malloc_info(0, out)
  libc.fclose(out)
  print(open(f.name).read().count("<heap nr="))
together.wait()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_malloc_arenas_are_capped_at_the_count_given():
  """Six threads alive at once, each allocating: glibc gives each an arena of its own (the control, uncapped), and
  after `limit_malloc_arenas(2)` the process has two (counted in glibc's own `malloc_info` report)."""
  def arenas(cap):
    out = subprocess.run([sys.executable, "-c", _ARENAS_SCRIPT, str(cap)], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).parents[2]).stdout.split()
    if out[:2] == ["no", "mallopt"]:
      pytest.skip("this C library has no mallopt")
    return int(out[-1])

  capped = arenas(2)  # first: a C library without mallopt skips here, before the uncapped control runs
  assert arenas(0) >= 7  # the main arena and the six threads'
  assert capped == 2
