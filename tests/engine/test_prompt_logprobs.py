"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`), scored in the prefill, against transformers' float32
log_softmax of the logits at the next token: packed, chunked, preempted, both caches; and perplexity from them."""

import math

import numpy as np
import pytest
import torch

from qwenjax import InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.engine import Engine
from qwenjax.engine.requests import Request, as_request
from qwenjax.engine.sampling import SamplingParams
from qwenjax.model.kv_cache import page_bytes

TOL = 1e-4
PAGE = 16


@pytest.fixture(scope="module")
def tiny(tiny_factory):
  d, hf = tiny_factory("prompt_logprobs", num_key_value_heads=2)
  return hf, load_model(d)


def _engine(tiny, **kw):
  kw = dict(dict(max_batch_size=4, max_seq_len=256, page_size=PAGE), **kw)
  if not kw.get("paged", True):
    del kw["page_size"]
  return Engine(tiny[1], None, eos_token_ids=(), **kw)


def _prompts(n, seed, lo, hi):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 300, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def _hf_prompt_logprobs(hf, prompt):
  """transformers' float32 log_softmax of the logits, at each next prompt token; None for the first."""
  with torch.no_grad():
    logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1).numpy()
  return [None] + [float(logp[i, t]) for i, t in enumerate(prompt[1:])]


def _assert_matches(got, want):
  assert len(got) == len(want) and got[0] is None and want[0] is None
  np.testing.assert_allclose(got[1:], want[1:], atol=TOL, rtol=0)


def _scored(max_tokens=4, **kw):
  return SamplingParams(max_tokens=max_tokens, prompt_logprobs=True, **kw)


def test_single_prompt_equals_transformers(tiny):
  hf = tiny[0]
  [prompt] = _prompts(1, 0, 40, 41)
  [out] = _engine(tiny).generate([Request(prompt=prompt, sampling=_scored())])
  _assert_matches(out.prompt_logprobs, _hf_prompt_logprobs(hf, prompt))


def test_packed_prompts_of_different_lengths(tiny):
  """Four prompts (one token, under a page, several pages) in one packed prefill call, next to a request that
  asks for nothing: each row scores its own tokens; the one that did not ask gets no field."""
  hf = tiny[0]
  prompts = [[7], *_prompts(3, 1, 5, 30)]
  # Without prefix caching: with it, the last request would wait a round to read the pages prompt 2 writes.
  engine = _engine(tiny, max_batch_size=5, max_prefill_chunk=256, prefix_caching=False)
  requests = [Request(prompt=p, sampling=_scored()) for p in prompts] + [Request(prompt=prompts[2])]
  outs = engine.generate(requests, SamplingParams(max_tokens=4))
  assert engine.stats()["prefill_calls"] == 1, engine.stats
  for p, out in zip(prompts, outs):
    _assert_matches(out.prompt_logprobs, _hf_prompt_logprobs(hf, p))
  assert outs[-1].prompt_logprobs is None
  assert outs[-1].token_ids == outs[2].token_ids


def test_chunked_prefill_carries_across_chunks(tiny):
  """Prompts of 70 and 45 tokens in 16-token chunks: each chunk's first token is scored by the last position of
  the chunk before it."""
  hf = tiny[0]
  prompts = [_prompts(1, 2, 70, 71)[0], _prompts(1, 3, 45, 46)[0]]
  engine = _engine(tiny, max_prefill_chunk=16)
  outs = engine.generate(prompts, _scored())
  assert engine.stats()["prefill_calls"] == 5 + 3, engine.stats
  for p, out in zip(prompts, outs):
    _assert_matches(out.prompt_logprobs, _hf_prompt_logprobs(hf, p))


def test_generated_tokens_are_unchanged(tiny):
  """Seeded sampling with penalties, n > 1 with stop token ids and logprobs: the same completions with prompt
  log-probabilities on, which come once per request however many samples it has. (Every request has a penalty,
  so that one decode variant serves them all: a fast test. Greedy tokens: test_packed_prompts_of_different_lengths.)"""
  hf = tiny[0]
  prompts = _prompts(3, 5, 10, 60)
  kinds = [dict(temperature=0.9, top_k=20, repetition_penalty=1.3, seed=5),
           dict(temperature=1.0, n=3, seed=2, stop_token_ids=[17], logprobs=True, presence_penalty=0.5),
           dict(n=2, stop_token_ids=[3, 4, 5], frequency_penalty=0.4)]
  # Without prefix caching: with it, the second job would read the first one's cached pages and so run other
  # batches (its samples 1.. would not wait for sample 0), whose float rounding differs in the last bits.
  engine = _engine(tiny, max_batch_size=8, max_seq_len=128, page_size=64, prefix_caching=False)
  plain = engine.generate([Request(prompt=p, sampling=SamplingParams(max_tokens=8, **k))
                           for p, k in zip(prompts, kinds)])
  scored = engine.generate([Request(prompt=p, sampling=_scored(8, **k)) for p, k in zip(prompts, kinds)])
  for p, a, b in zip(prompts, plain, scored):
    assert a.prompt_logprobs is None
    assert [(c.token_ids, c.finish_reason, c.logprobs) for c in a.outputs] == [
        (c.token_ids, c.finish_reason, c.logprobs) for c in b.outputs]
    _assert_matches(b.prompt_logprobs, _hf_prompt_logprobs(hf, p))
  assert [len(out.outputs) for out in scored] == [1, 3, 2]


def test_preempted_sequences_keep_their_prompt_logprobs(tiny):
  """Six sequences whose KV cache needs 3x the pool: the preempted ones are recomputed, and their
  prompt log-probabilities are those an ample pool gives, neither repeated nor rescored."""
  hf, model = tiny
  prompts = _prompts(6, 7, 20, 40)
  requests = [Request(prompt=p, sampling=_scored(30)) for p in prompts]
  gib = 12 * page_bytes(model.cfg, PAGE, model.dtype) / 2**30
  small = _engine(tiny, max_batch_size=4, max_seq_len=128, kv_cache_memory=gib)
  assert small.pool.num_pages == 12
  outs = small.generate(requests)
  assert small.stats()["preemptions"] > 0, small.stats
  ample = _engine(tiny, max_batch_size=4, max_seq_len=128).generate(requests)
  for p, out, ref in zip(prompts, outs, ample):
    assert out.token_ids == ref.token_ids
    # One entry per prompt token, as the ample pool's (to float rounding: the packing of calls differs).
    assert len(out.prompt_logprobs) == len(ref.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
    np.testing.assert_allclose(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], rtol=1e-5, atol=1e-6)
    _assert_matches(out.prompt_logprobs, _hf_prompt_logprobs(hf, p))


def test_warm_up_covers_the_scoring_variants(tiny):
  """warm_up(prompt_logprobs=True) adds each step shape's scoring variant; scored requests then compile
  nothing."""
  from qwenjax.engine.profiling import count_compilations

  engine = _engine(tiny, max_batch_size=1, max_seq_len=16, max_prefill_chunk=16)  # one program of each kind
  shapes = engine.program_shapes()
  assert shapes == {"step": [16], "sample": [1], "decode": [engine.decode_steps], "restore_slot": [16],
                    "copy_pages": [1]}
  # The step plain and scoring; per variant the sampler and the decode block; the slot reset; the page copy.
  assert engine.warm_up(prompt_logprobs=True) == 2 + 3 * (1 + 1) + 1 + 1
  with count_compilations() as compiled:
    engine.generate([[5], *_prompts(2, 8, 2, 13)], _scored(3))
  assert sum(compiled.values()) == 0, compiled


def test_the_parameter_is_validated_and_parsed():
  assert as_request({"prompt": "x", "sampling": {"prompt_logprobs": True}}).sampling.prompt_logprobs
  assert SamplingParams.from_dict({"prompt_logprobs": None}).prompt_logprobs is False
  with pytest.raises(InputError, match="prompt_logprobs must be true or false, got 'yes'"):
    SamplingParams.from_dict({"prompt_logprobs": "yes"})


def test_perplexity_equals_transformers(tiny):
  """`launch.bench.perplexity.perplexity` over 40-token windows (the last one shorter, each window's first token
  unscored) is exp of the mean NLL transformers' logits give on the same windows. One slot: each window's request
  ends at its first token, and the paged scheduler admits the next one."""
  from launch.bench.perplexity import perplexity

  hf, model = tiny
  ids = _prompts(1, 9, 150, 151)[0]
  got = perplexity(_engine(tiny, max_batch_size=1, max_prefill_chunk=16), ids, window=40)  # a window at a time
  nll = []
  for i in range(0, len(ids), 40):
    nll += [-lp for lp in _hf_prompt_logprobs(hf, ids[i:i + 40])[1:]]
  assert got["tokens"] == 150 and got["windows"] == 4 and got["scored"] == len(nll) == 146
  assert got["nll"] == pytest.approx(np.mean(nll), abs=TOL)
  assert got["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=TOL)


def test_launch_generate_and_batch_lines_report_them(tmp_path):
  """`launch.generate --json --prompt_logprobs` and a batch line's "sampling": {"prompt_logprobs": true} put the
  field in their JSON records (null first); a line that does not ask has none."""
  import json
  import subprocess
  import sys

  import transformers

  from conftest import REPO, build_tiny_qwen2, save_tiny_tokenizer_dir

  d = save_tiny_tokenizer_dir(tmp_path / "model")
  hf = build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  ids = transformers.AutoTokenizer.from_pretrained(d).encode("def fibonacci(n):")
  run = lambda *args: subprocess.run([sys.executable, "-m", *args, f"--model={d}", "--max_new_tokens=2"], cwd=REPO,
                                     capture_output=True, text=True, timeout=600)
  proc = run("launch.generate", "--raw", "--prompt=def fibonacci(n):", "--json", "--prompt_logprobs")
  assert proc.returncode == 0, proc.stderr[-2000:]
  _assert_matches(json.loads(proc.stdout)["prompt_logprobs"], _hf_prompt_logprobs(hf, ids))
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  inp.write_text(json.dumps({"id": "a", "prompt": "def fibonacci(n):", "sampling": {"prompt_logprobs": True}})
                 + "\n" + json.dumps({"id": "b", "prompt": "def fibonacci(n):"}) + "\n")
  proc = run("launch.batch_generate", f"--input={inp}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
  _assert_matches(records["a"]["prompt_logprobs"], _hf_prompt_logprobs(hf, ids))
  assert "prompt_logprobs" not in records["b"] and records["a"]["token_ids"] == records["b"]["token_ids"]
