"""The paged KV cache in the engine: tokens identical to transformers with either attention implementation, pool
exhaustion handled by preemption (nothing lost or altered), no per-slot reservation, int8 pages."""

import numpy as np
import pytest
import torch

from qwenjax import InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.engine import Engine
from qwenjax.engine.requests import Request
from qwenjax.engine.sampling import SamplingParams
from qwenjax.model.kv_cache import page_bytes

from conftest import build_tiny_qwen2

PAGE = 16  # the kernel's smallest page (a power of two >= 16), so short prompts span several pages


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
  """Head dim 16 (the kernel's minimum) and 3 query heads per KV head (a group size that is not a power of two)."""
  d = tmp_path_factory.mktemp("paged")
  hf = build_tiny_qwen2(d, vocab_size=320, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
  return hf, load_model(d), d


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sliding_window_layers_equal_transformers(tmp_path, impl):
  """Qwen2's sliding window on the layers past max_window_layers (a scanned model: the layer's window is traced,
  and the kernel path picks its variant per layer)."""
  hf = build_tiny_qwen2(tmp_path, vocab_size=320, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                        use_sliding_window=True, sliding_window=24, max_window_layers=1)
  hf.config._attn_implementation = "eager"  # pylint: disable=protected-access  (sdpa ignores the window)
  model = load_model(tmp_path)
  assert model.cfg.use_sliding_window and list(model.cfg.layer_windows()[1:]) == [24, 24]
  prompts = _prompts(3, 21, 30, 60)
  engine = Engine(model, None, eos_token_ids=(), max_batch_size=2, max_seq_len=128, page_size=PAGE,
                  attention_impl=impl)
  for p, out in zip(prompts, engine.generate(prompts, SamplingParams(max_tokens=10))):
    assert out.token_ids == _hf_greedy(hf, p, 10)


def _hf_greedy(hf, prompt, n):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


def _prompts(n, seed, lo, hi):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 300, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def _gib(model, pages, quantized=False):
  return pages * page_bytes(model.cfg, PAGE, model.dtype, quantized) / 2**30


@pytest.mark.parametrize("impl,scan", [("xla", True), ("xla", False), ("pallas", True), ("pallas", False)])
def test_paged_greedy_equals_transformers(tiny_gqa, impl, scan):
  """Mixed lengths (1 token, a page -1/+1, several pages, past the prefill chunk), three slots refilling;
  scanned and unrolled layers."""
  hf, _, _ = tiny_gqa
  model = load_model(tiny_gqa[2], scan_layers=scan)
  prompts = [[5], _prompts(1, 1, 15, 16)[0], _prompts(1, 2, 17, 18)[0]] + _prompts(4, 3, 30, 90)
  budgets = [9, 16, 2, 20, 5, 13, 8]
  engine = Engine(model, None, eos_token_ids=(), max_batch_size=3, max_seq_len=256, max_prefill_chunk=32,
                  page_size=PAGE, attention_impl=impl)
  outs = engine.generate([Request(prompt=p, sampling=SamplingParams(max_tokens=m)) for p, m in zip(prompts, budgets)])
  for p, m, out in zip(prompts, budgets, outs):
    assert out.token_ids == _hf_greedy(hf, p, m)
  assert engine.pool.num_free == engine.pool.num_pages


def test_pool_exhaustion_preempts_and_resumes_exactly(tiny_gqa):
  """Six sequences whose KV cache needs 3x the pool: the youngest are preempted and recomputed, every output is
  the one an ample pool gives (greedy against transformers; seeded sampling with penalties against the ample
  engine), and no page leaks."""
  hf, model, _ = tiny_gqa
  prompts = _prompts(6, 7, 20, 40)
  greedy = SamplingParams(max_tokens=40)
  sampled = SamplingParams(max_tokens=40, temperature=0.9, top_k=20, repetition_penalty=1.3, seed=5)
  requests = [Request(prompt=p, sampling=greedy if i % 2 == 0 else sampled) for i, p in enumerate(prompts)]
  small = Engine(model, None, eos_token_ids=(), max_batch_size=4, max_seq_len=128, page_size=PAGE,
                 kv_cache_memory=_gib(model, 12))  # 192 tokens for 4 slots of ~70
  assert small.pool.num_pages == 12
  outs = small.generate(requests)
  assert small.stats()["preemptions"] > 0, small.stats
  ample = Engine(model, None, eos_token_ids=(), max_batch_size=4, max_seq_len=128, page_size=PAGE).generate(requests)
  for i, (p, out, ref) in enumerate(zip(prompts, outs, ample)):
    assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason == "length"
    if i % 2 == 0:
      assert out.token_ids == _hf_greedy(hf, p, 40)
  assert small.pool.num_free == small.pool.num_pages


def test_max_seq_len_is_not_reserved_per_slot(tiny_gqa):
  """32 slots at a 32K context allocate the pool the budget names, not 32 x 32768 positions."""
  hf, model, _ = tiny_gqa
  engine = Engine(model, None, eos_token_ids=(), max_batch_size=32, max_seq_len=32768, page_size=PAGE,
                  kv_cache_memory=_gib(model, 64))
  cache = engine.runner.cache
  assert cache.k.shape == (3, 64, PAGE, 2, 16) and engine.context_len == 64 * PAGE
  held = sum(a.nbytes for a in (cache.k, cache.v))
  assert held == 64 * page_bytes(model.cfg, PAGE, model.dtype)  # vs 32 * 32768 positions contiguous
  assert held * 32 * 32768 // (64 * PAGE) > 1000 * held
  prompts = _prompts(8, 11, 5, 40)
  outs = engine.generate(prompts, SamplingParams(max_tokens=6))
  assert [o.token_ids for o in outs] == [_hf_greedy(hf, p, 6) for p in prompts]


def test_a_prompt_longer_than_the_pool_is_a_clear_error(tiny_gqa):
  _, model, _ = tiny_gqa
  engine = Engine(model, None, eos_token_ids=(), max_batch_size=2, max_seq_len=4096, page_size=PAGE,
                  kv_cache_memory=_gib(model, 4))
  with pytest.raises(InputError, match=r"the prompt has 70 tokens; the context holds 64 \(all 4 pages"):
    engine.prepare(list(range(70)))
  out = engine.generate([list(range(60))], SamplingParams(max_tokens=50))[0]
  assert len(out.token_ids) == 4 and out.finish_reason == "length"  # the pool bounds the context


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_int8_pages_track_float32(tiny_gqa, impl):
  """int8 KV pages: a quarter of float32's bytes per token and KV head (plus a 4-byte scale), greedy tokens
  mostly those of float32 pages on a random tiny model, and the kernel agrees with the XLA path."""
  _, model, _ = tiny_gqa
  cfg = model.cfg
  assert page_bytes(cfg, PAGE, np.float32, True) / page_bytes(cfg, PAGE, np.float32) == (16 + 4) / (4 * 16)
  prompts = _prompts(6, 13, 10, 60)
  kw = dict(eos_token_ids=(), max_batch_size=3, max_seq_len=128, page_size=PAGE, attention_impl=impl)
  f32 = Engine(model, None, **kw).generate(prompts, SamplingParams(max_tokens=12))
  int8_engine = Engine(model, None, kv_cache_dtype="int8", **kw)
  assert int8_engine.runner.cache.k.dtype == np.int8
  int8 = int8_engine.generate(prompts, SamplingParams(max_tokens=12))
  same = [a == b for x, y in zip(f32, int8) for a, b in zip(x.token_ids, y.token_ids)]
  assert np.mean(same) > 0.8, np.mean(same)
  if impl == "pallas":
    xla = Engine(model, None, kv_cache_dtype="int8", **dict(kw, attention_impl="xla")).generate(
        prompts, SamplingParams(max_tokens=12))
    assert [o.token_ids for o in int8] == [o.token_ids for o in xla]


def test_bad_paged_settings_are_one_line_errors(tiny_gqa):
  from qwenjax import ConfigError

  _, model, _ = tiny_gqa
  for kw, message in ((dict(attention_impl="triton"), "attention_impl 'triton' is not one of xla, pallas"),
                      (dict(kv_cache_dtype="fp8"), "kv_cache_dtype 'fp8' is not"),
                      (dict(kv_cache_memory=1e-9), "holds no page"),
                      (dict(kv_cache_memory=-1.0), "must be a positive number")):
    with pytest.raises(ConfigError, match=message):
      Engine(model, None, **kw)
