"""Bucketing is a promise: prompts of any length compile one prefill program per length bucket."""

import jax
import numpy as np

from qwenjax import Engine, SamplingParams
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.profiling import count_compilations


def test_twenty_prompt_lengths_compile_at_most_one_program_per_bucket(tiny_factory):
  path, _ = tiny_factory("compile", num_key_value_heads=2)
  engine = Engine(load_model(path), None, eos_token_ids=(), max_batch_size=1, max_seq_len=256,
                  max_prefill_chunk=256, page_size=64)
  assert engine.buckets.sizes == (16, 32, 64, 128, 256)
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 200, size=20)
  jax.clear_caches()  # programs other tests compiled in this process (the first-token sampler) would be reused
  with count_compilations() as compiled:
    for n in lengths:
      engine.generate([rng.integers(0, 300, size=int(n)).tolist()], SamplingParams(max_tokens=4))
  used = {engine.buckets.bucket(int(n)) for n in lengths}
  assert len(used) >= 3  # the workload really spans several buckets
  per_name = lambda key: sum(c for name, c in compiled.items() if key in name)
  # One prefill per bucket used (a fresh prompt's page table is as wide as its bucket's pages); the first-token
  # sampler compiles per power-of-two prompt size, which for these buckets is the same set; one decode program
  # per power-of-two page-table width of 64-token pages holding the prompt and the 3 tokens one decode block writes.
  decode = len({1 << (-(-(int(n) + 3) // 64) - 1).bit_length() for n in lengths})
  assert per_name("prefill") == len(used) <= len(engine.buckets.sizes), compiled
  assert per_name("first_token") == len(used), compiled
  assert per_name("decode") == decode, compiled
  assert sum(compiled.values()) == 2 * len(used) + decode, compiled

  # Once warm, more prompts in the same buckets compile nothing at all.
  with count_compilations() as again:
    for n in lengths[:5]:
      engine.generate([rng.integers(0, 300, size=int(n)).tolist()], SamplingParams(max_tokens=4))
  assert sum(again.values()) == 0, again
