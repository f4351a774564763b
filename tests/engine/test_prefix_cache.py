"""Prefix caching in the paged engine: requests sharing a header, the n samples of a request and a request scored
with prompt log-probabilities read the header's KV pages instead of computing them, and every output equals the
engine's without sharing (greedy tokens exactly, log-probabilities within float32 noise) and transformers' greedy
tokens; a small pool evicts cached pages and preempts without changing an output; a 64-request job over a
~1,500-token header computes about the unique prompt tokens only."""

import numpy as np
import pytest
import torch

from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.engine import Engine
from qwenjax.engine.requests import Request
from qwenjax.engine.sampling import SamplingParams
from qwenjax.model.kv_cache import page_bytes

from conftest import build_tiny_qwen2

PS = 16  # small pages: a short header spans several, and the partial-page copy needs >= PS / 8 shared tokens
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("prefix")
  hf = build_tiny_qwen2(d, vocab_size=320, num_key_value_heads=2, max_position_embeddings=4096)
  return hf, load_model(d)


def _engine(model, **kw):
  kw = dict(dict(eos_token_ids=(), max_batch_size=4, max_seq_len=512, page_size=PS), **kw)
  return Engine(model, None, **kw)


def _tokens(rng, n):
  return rng.integers(0, 300, size=n).tolist()


def _hf_greedy(hf, prompt, n):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


def _assert_same(outs, refs):
  for out, ref in zip(outs, refs, strict=True):
    for a, b in zip(out.outputs, ref.outputs, strict=True):
      assert a.token_ids == b.token_ids
      if b.logprobs is not None:
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=TOL)
    if ref.prompt_logprobs is not None:
      np.testing.assert_allclose(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], atol=TOL)


def test_a_shared_header_is_computed_once_and_outputs_are_unchanged(tiny):
  """Ten requests: a header of 5 pages and 7 tokens, then suffixes of their own. The first computes its prompt;
  the rest read the 5 pages and copy the 7 tokens of the first's partial page (copy-on-write), computing their
  suffixes only. Two requests repeat a prompt exactly: they read all of it but the last token."""
  hf, model = tiny
  rng = np.random.default_rng(0)
  header = _tokens(rng, 5 * PS + 7)
  suffixes = [[300 + i] + _tokens(rng, int(n)) for i, n in enumerate(rng.integers(3, 30, size=8))]  # distinct starts
  prompts = [header + s for s in suffixes] + [header + suffixes[0], header + suffixes[3]]
  sampling = SamplingParams(max_tokens=8, logprobs=True)
  engine = _engine(model)
  outs = engine.generate(prompts, sampling)
  refs = _engine(model, prefix_caching=False).generate(prompts, sampling)
  _assert_same(outs, refs)
  for p, out in zip(prompts[:3], outs):
    assert out.token_ids == _hf_greedy(hf, p, 8)
  unique = len(header) + sum(map(len, suffixes)) + 2  # the repeats compute their last token
  assert engine.stats()["prompt_tokens"] == unique, engine.stats
  assert engine.stats()["cached_tokens"] == sum(map(len, prompts)) - unique
  cached = [o.cached_tokens for o in outs]
  assert cached[0] == 0 and cached[1:8] == [len(header)] * 7  # 5 full pages + 7 copied tokens: not page-aligned
  # A repeat reads all but its last token: 6 full pages, then 3 and 2 tokens copied (at least PS / 8 = 2).
  assert [len(p) for p in prompts[8:]] == [100, 99] and cached[8:] == [99, 98]
  assert engine.pool.num_free == engine.pool.num_pages and any(
      engine.pool.state(page) == "cached" for page in range(engine.pool.num_pages))
  # A second job finds the header cached from the first.
  again = engine.generate([header + [7, 8, 9]], sampling)[0]
  assert again.cached_tokens == len(header) and again.token_ids == _hf_greedy(hf, header + [7, 8, 9], 8)


def test_n_samples_and_prompt_logprobs_share_the_first_samples_pages(tiny):
  """A request's n samples wait for the first one's prefill (admitted together, they would read pages not yet
  written), then each computes only its last prompt token; with prompt_logprobs the first sample computes and
  scores the whole prompt, the others share. Seeded samples equal those without sharing."""
  _, model = tiny
  rng = np.random.default_rng(1)
  prompt = _tokens(rng, 3 * PS + 9)
  sampled = SamplingParams(n=4, max_tokens=6, temperature=0.9, top_k=30, repetition_penalty=1.2, seed=3,
                           logprobs=True)
  scored = SamplingParams(n=2, max_tokens=4, prompt_logprobs=True, logprobs=True)
  requests = [Request(prompt=prompt, sampling=sampled), Request(prompt=prompt[::-1], sampling=scored)]
  engine = _engine(model)
  outs = engine.generate(requests)
  refs = _engine(model, prefix_caching=False).generate(requests)
  _assert_same(outs, refs)
  assert len(outs[0].outputs) == 4 and len({tuple(c.token_ids) for c in outs[0].outputs}) > 1  # really sampled
  assert outs[0].cached_tokens == 0 and outs[1].cached_tokens == 0  # the first samples compute their prompts
  assert len(outs[1].prompt_logprobs) == len(prompt)
  # Each other sample computes one token: 3 of the first request's, 1 of the second's.
  assert engine.stats()["prompt_tokens"] == 2 * len(prompt) + 3 + 1, engine.stats
  assert engine.stats()["cached_tokens"] == 4 * (len(prompt) - 1)


def test_a_small_pool_evicts_cached_pages_and_preempts_without_changing_outputs(tiny):
  """Twelve header-sharing requests and four unrelated ones through a pool of 14 pages for 4 slots: cached pages
  are evicted for new ones, sequences holding shared pages are preempted and readmitted (reading their own cached
  prompt pages when still there); every output equals an ample pool's without sharing, and no page leaks."""
  _, model = tiny
  rng = np.random.default_rng(2)
  header = _tokens(rng, 2 * PS + 5)
  prompts = [header + _tokens(rng, int(n)) for n in rng.integers(2, 20, size=12)]
  prompts[4:4] = [_tokens(rng, int(n)) for n in (40, 25, 50, 33)]
  greedy = SamplingParams(max_tokens=30, logprobs=True)
  sampled = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, presence_penalty=0.5, seed=9, logprobs=True)
  requests = [Request(prompt=p, sampling=greedy if i % 3 else sampled) for i, p in enumerate(prompts)]
  small = _engine(model, kv_cache_memory=14 * page_bytes(model.cfg, PS, model.dtype) / 2**30)
  assert small.pool.num_pages == 14
  outs = small.generate(requests)
  assert small.stats()["preemptions"] > 0 and small.stats()["cached_tokens"] > 0, small.stats
  refs = _engine(model, prefix_caching=False, max_batch_size=2).generate(requests)
  _assert_same(outs, refs)
  pool = small.pool
  assert pool.num_free == pool.num_pages and all(pool.state(p) in ("free", "cached") for p in range(14))


def test_64_requests_over_a_1500_token_header_compute_the_unique_tokens(tiny):
  """The issue's figure, at the CPU page size (64): 64 requests whose prompts share a 1,500-token header compute
  at most 1.1x the unique prompt tokens (the header once plus each request's own), where without sharing they
  compute all 64 headers; greedy outputs equal the unshared run's."""
  _, model = tiny
  rng = np.random.default_rng(3)
  header = _tokens(rng, 1500)
  prompts = [header + [250 + i] + _tokens(rng, int(n)) for i, n in enumerate(rng.integers(5, 40, size=64))]
  unique = len(header) + sum(len(p) - len(header) for p in prompts)
  kw = dict(max_batch_size=16, max_seq_len=2048, page_size=64, max_prefill_chunk=512)
  engine = _engine(model, **kw)
  outs = engine.generate(prompts, SamplingParams(max_tokens=4))
  assert engine.stats()["prompt_tokens"] <= 1.1 * unique, (engine.stats, unique)
  assert engine.stats()["prompt_tokens"] + engine.stats()["cached_tokens"] == sum(map(len, prompts))
  assert [o.cached_tokens for o in outs] == [0] + [len(header)] * 63, outs  # 23 pages and a copied 28 tokens
  plain = _engine(model, prefix_caching=False, **kw)
  refs = plain.generate(prompts[:16], SamplingParams(max_tokens=4))
  assert [o.token_ids for o in outs[:16]] == [o.token_ids for o in refs]
  assert plain.stats()["prompt_tokens"] == sum(map(len, prompts[:16]))
