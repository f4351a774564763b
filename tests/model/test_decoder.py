"""The decoder against transformers: logits within 1e-4 in float32, greedy tokens identical."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenjax import Engine, KVCache, SamplingParams, decode_step, extend, prefill
from qwenjax.checkpoints.hf import load_model
from qwenjax.model.decoder import StepMetadata

from conftest import check_prefill_then_decode

TOL = 1e-4

CONFIGS = {
    # GQA ratio 2, tied embeddings, rope_theta 1e4.
    "tied_gqa2": dict(tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=4, rope_theta=1e4),
    # GQA ratio 8, untied, rope_theta 1e6 (Qwen2.5's).
    "untied_gqa8": dict(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=1, rope_theta=1e6),
    # YaRN as Qwen documents it, scaled down: factor 4 over an original context of 64.
    "yarn": dict(num_key_value_heads=2, rope_theta=1e6,
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                  "rope_theta": 1e6}),
    # Sliding-window attention on layers >= 1 (no released Qwen2.5 uses it; the config fields exist).
    "sliding": dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1),
}


def _hf_logits(hf, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def _hf_greedy(hf, prompt, n):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def tiny(request, tiny_factory):
  return tiny_factory(request.param, **CONFIGS[request.param])


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_prefill_then_decode_logits_match_transformers(tiny, scan_layers):
  path, hf = tiny
  model = load_model(path, scan_layers=scan_layers)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 300, size=(2, 24))
  ref = _hf_logits(hf, ids)  # [2, 24, V]

  # Prefill 16 tokens (padded to a bucket of 32), then decode the remaining 8 one at a time.
  logits, cache = check_prefill_then_decode(model, ids, ref, tol=TOL)
  assert np.asarray(cache.lengths).tolist() == [24, 24]

  # One prefill over all 24 tokens gives the same last logits as prefill + 8 decode steps.
  cache2 = KVCache.zeros(model.cfg, 2, 64)
  full, _ = prefill(graphdef, params, cache2, jnp.asarray(np.pad(ids, ((0, 0), (0, 8)))), jnp.array([24, 24]))
  np.testing.assert_allclose(np.asarray(full), np.asarray(logits), atol=1e-5, rtol=0)


def test_extend_continues_a_prefix(tiny):
  """Chunked prefill: 10 tokens, then 14 more through `extend`, equals transformers over all 24."""
  path, hf = tiny
  model = load_model(path, scan_layers=False)
  graphdef, params = nnx.split(model)
  ids = np.random.default_rng(1).integers(0, 300, size=(1, 24))
  ref = _hf_logits(hf, ids)
  cache = KVCache.zeros(model.cfg, 1, 64)
  _, cache = prefill(graphdef, params, cache, jnp.asarray(np.pad(ids[:, :10], ((0, 0), (0, 6)))), jnp.array([10]))
  logits, cache = extend(graphdef, params, cache, jnp.asarray(np.pad(ids[:, 10:], ((0, 0), (0, 2)))),
                         jnp.array([14]), all_logits=True)
  np.testing.assert_allclose(np.asarray(logits)[:, :14], ref[:, 10:], atol=TOL, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_greedy_tokens_match_transformers_alone_and_batched(tiny, scan_layers):
  path, hf = tiny
  model = load_model(path, scan_layers=scan_layers)
  engine = Engine(model, None, eos_token_ids=(), max_batch_size=4, max_seq_len=128)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 300, size=n).tolist() for n in (5, 17, 40)]
  expected = [_hf_greedy(hf, p, 32) for p in prompts]
  batched = engine.generate(prompts, SamplingParams(max_tokens=32))
  for p, want, got in zip(prompts, expected, batched):
    assert got.token_ids == want, f"prompt of {len(p)} tokens"
    assert got.finish_reason == "length"
  alone = [engine.generate([p], SamplingParams(max_tokens=32))[0].token_ids for p in prompts]
  assert alone == expected


def test_eos_stops_and_reports_stop(tiny_factory):
  path, hf = tiny_factory("tied_gqa2", **CONFIGS["tied_gqa2"])
  model = load_model(path)
  prompt = [3, 1, 4, 1, 5, 9, 2, 6]
  ref = _hf_greedy(hf, prompt, 12)
  eos = ref[5]  # pretend the 6th generated token is an end-of-sequence token
  stop_at = ref.index(eos)
  engine = Engine(model, None, eos_token_ids=[eos], max_batch_size=1, max_seq_len=64)
  [out] = engine.generate([prompt], SamplingParams(max_tokens=12))
  assert out.token_ids == ref[:stop_at + 1] and out.finish_reason == "stop"
  [out] = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))
  assert out.token_ids == ref and out.finish_reason == "length"


def test_bfloat16_runs_close_to_float32(tiny_factory):
  path, hf = tiny_factory("untied_gqa8", **CONFIGS["untied_gqa8"])
  ids = np.random.default_rng(3).integers(0, 300, size=(1, 19))
  ref = _hf_logits(hf, ids)
  model = load_model(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert model.embed[...].dtype == jnp.bfloat16
  graphdef, params = nnx.split(model)
  cache = KVCache.zeros(model.cfg, 1, 32, jnp.bfloat16)
  logits, cache = prefill(graphdef, params, cache, jnp.asarray(ids[:, :16], jnp.int32), jnp.array([16]),
                          all_logits=True)
  assert logits.dtype == jnp.float32  # logits stay float32 whatever the compute dtype
  scale = np.abs(ref).max()
  assert np.abs(np.asarray(logits) - ref[:, :16]).max() < 0.05 * scale
  # Decode steps read the bfloat16 cache (on CPU its bits, stored as uint16) back.
  for t in range(16, 19):
    logits, cache = decode_step(graphdef, params, cache, jnp.asarray(ids[:, t], jnp.int32))
    assert np.abs(np.asarray(logits) - ref[:, t]).max() < 0.05 * scale, t


def test_step_metadata_travels_through_jit_with_its_static_fields_static():
  """A StepMetadata is a jit argument: its arrays are leaves, and attend_to_cache, kv_len and impl are part of its
  structure (a new kv_len is a new program), read as Python values inside."""
  positions = jnp.arange(4, dtype=jnp.int32)[None]
  meta = StepMetadata(positions, rows=jnp.zeros(1, jnp.int32), attend_to_cache=False, kv_len=8, impl="pallas")
  leaves, treedef = jax.tree.flatten(meta)
  assert len(leaves) == 2  # positions and rows; None fields and static fields are no leaves
  assert jax.tree.structure(dataclasses.replace(meta, kv_len=16)) != treedef
  seen = []

  @jax.jit
  def static_fields(m):
    seen.append((m.attend_to_cache, m.kv_len, m.impl))
    return m.positions + m.rows[:, None]

  np.testing.assert_array_equal(static_fields(meta), [[0, 1, 2, 3]])
  assert seen == [(False, 8, "pallas")]


def test_packed_training_step_equals_each_segment_alone(tiny_factory):
  """`StepMetadata.packed_training`: two prompts packed in one row and run without a cache give each prompt the
  logits transformers gives it alone."""
  path, hf = tiny_factory("untied_gqa8", **CONFIGS["untied_gqa8"])
  model = load_model(path)
  rng = np.random.default_rng(4)
  a, b = rng.integers(0, 300, size=(1, 7)), rng.integers(0, 300, size=(1, 9))
  tokens = jnp.asarray(np.concatenate([a, b], axis=1), jnp.int32)  # [1, 16]
  segment_positions = jnp.asarray(np.concatenate([np.arange(7), np.arange(9)])[None], jnp.int32)
  h, cache = model(tokens, None, StepMetadata.packed_training(segment_positions))
  logits = np.asarray(model.logits(h))[0]  # [16, V]
  assert cache is None
  np.testing.assert_allclose(logits[:7], _hf_logits(hf, a)[0], atol=TOL, rtol=0)
  np.testing.assert_allclose(logits[7:], _hf_logits(hf, b)[0], atol=TOL, rtol=0)
