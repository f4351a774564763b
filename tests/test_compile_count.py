"""Bucketing is a promise: prompts of any length compile one prefill program per length bucket."""

import numpy as np

from qwenjax import Generator, SamplingParams
from qwenjax.checkpoint import load_model
from qwenjax.profiling import count_compilations


def test_twenty_prompt_lengths_compile_at_most_one_program_per_bucket(tiny_factory):
  path, _ = tiny_factory("compile", num_key_value_heads=2)
  gen = Generator(load_model(path), max_seq_len=256)
  assert gen.buckets.sizes == (16, 32, 64, 128, 256)
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 200, size=20)
  with count_compilations() as compiled:
    for n in lengths:
      gen.generate([rng.integers(0, 300, size=int(n)).tolist()], SamplingParams(max_tokens=4))
  used = {gen.buckets.bucket(int(n)) for n in lengths}
  assert len(used) >= 3  # the workload really spans several buckets
  prefill_compiles = sum(c for name, c in compiled.items() if "prefill" in name)
  decode_compiles = sum(c for name, c in compiled.items() if "decode" in name)
  assert prefill_compiles == len(used) <= len(gen.buckets.sizes), compiled
  assert decode_compiles == 1, compiled
  # The rest is the one-time allocation of the KV cache (zeros for keys/values and lengths).
  assert sum(compiled.values()) - prefill_compiles - decode_compiles <= 4, compiled

  # Once warm, more prompts in the same buckets compile nothing at all.
  with count_compilations() as again:
    for n in lengths[:5]:
      gen.generate([rng.integers(0, 300, size=int(n)).tolist()], SamplingParams(max_tokens=4))
  assert sum(again.values()) == 0, again
