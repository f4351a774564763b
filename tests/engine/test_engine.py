"""The continuous-batching engine on a tiny Qwen2 with a real (tiny) tokenizer, against transformers."""

import numpy as np
import pytest
import torch
import transformers

from qwenjax import InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.engine import Engine
from qwenjax.engine.profiling import count_compilations
from qwenjax.engine.requests import Request
from qwenjax.engine.sampling import SamplingParams
from qwenjax.text.tokenizer import Tokenizer

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("engine"))
  hf = build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  return d, hf, load_model(d), Tokenizer.from_directory(d)


def _engine(tiny, **kw):
  _, _, model, tok = tiny
  kw.setdefault("max_seq_len", 256)
  return Engine(model, tok, eos_token_ids=(), **kw)


def _hf_greedy(hf, prompt, n):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


def _prompts(n, seed=0, lo=3, hi=60):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 600, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def test_continuous_batching_greedy_equals_transformers(tiny):
  """Seven requests of different lengths and budgets through two slots: slots free and refill mid-run."""
  hf = tiny[1]
  prompts = _prompts(7)
  budgets = [5, 17, 9, 24, 3, 12, 20]
  engine = _engine(tiny, max_batch_size=2, decode_steps=4)
  requests = [Request(prompt=p, sampling=SamplingParams(max_tokens=m)) for p, m in zip(prompts, budgets)]
  outs = engine.generate(requests)
  for p, m, out in zip(prompts, budgets, outs):
    assert out.token_ids == _hf_greedy(hf, p, m)
    assert out.finish_reason == "length" and out.usage == {"prompt_tokens": len(p), "completion_tokens": m}
  assert engine.stats()["decode_calls"] < sum(budgets) / 4  # several steps per call, two slots at once


def test_long_prompts_prefill_in_chunks(tiny):
  hf = tiny[1]
  prompts = _prompts(2, seed=1, lo=70, hi=100)
  engine = _engine(tiny, max_batch_size=2, max_prefill_chunk=32)
  outs = engine.generate(prompts, SamplingParams(max_tokens=8))
  assert engine.stats()["prefill_calls"] >= 6
  for p, out in zip(prompts, outs):
    assert out.token_ids == _hf_greedy(hf, p, 8)


def test_seeded_sampling_ignores_batch_mates(tiny):
  sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
  target = Request(prompt="def fibonacci(n):", sampling=sampled)
  alone = _engine(tiny, max_batch_size=1).generate([target])[0].token_ids
  others = [Request(prompt=p, sampling=SamplingParams(max_tokens=m, temperature=t, seed=s))
            for p, m, t, s in [("import numpy", 5, 0.0, 0), ("The quick brown", 20, 1.2, 7), ("x", 3, 0.5, 9)]]
  mixed = _engine(tiny, max_batch_size=4).generate([others[0], others[1], target, others[2]])
  assert mixed[2].token_ids == alone
  # A different seed gives a different stream (the test model is not degenerate).
  other_seed = Request(prompt="def fibonacci(n):",
                       sampling=SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=99))
  assert _engine(tiny, max_batch_size=1).generate([other_seed])[0].token_ids != alone


def test_n_samples_differ_and_are_reproducible(tiny):
  params = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=5)
  a = _engine(tiny, max_batch_size=2).generate(["hello world"], params)[0]
  b = _engine(tiny, max_batch_size=4).generate(["hello world"], params)[0]
  assert [c.index for c in a.outputs] == [0, 1, 2]
  assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
  assert len({tuple(c.token_ids) for c in a.outputs}) == 3
  assert a.usage["completion_tokens"] == 30


def test_stop_strings_cut_across_token_boundaries(tiny):
  tok = tiny[3]
  prompt = "The quick brown fox"
  full = _engine(tiny).generate([prompt], SamplingParams(max_tokens=30))[0]
  pieces = [tok.decode([t]) for t in full.token_ids]
  # A stop string made of the end of one token's text and the start of the next one's.
  i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
  stop = pieces[i][-2:] + pieces[i + 1][:1]
  text = full.text
  cut = text.find(stop)
  assert 0 <= cut <= len("".join(pieces[:i + 1]))
  out = _engine(tiny).generate([prompt], SamplingParams(max_tokens=30, stop=[stop, "never appears"]))[0]
  assert out.finish_reason == "stop"
  assert out.text == text[:cut]
  assert out.token_ids == full.token_ids[:len(out.token_ids)]
  # Streaming never shows text that a stop string later removes.
  streamed = "".join(e.text for e in _engine(tiny).stream([prompt], SamplingParams(max_tokens=30, stop=[stop])))
  assert streamed == text[:cut]


def test_stop_token_ids_and_eos(tiny):
  prompt = _prompts(1, seed=3)[0]
  full = _engine(tiny).generate([prompt], SamplingParams(max_tokens=20))[0].token_ids
  stop = full[6]
  first = full.index(stop)
  out = _engine(tiny).generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=[stop]))[0]
  assert out.token_ids == full[:first + 1] and out.finish_reason == "stop"
  _, _, model, tok = tiny
  eos_engine = Engine(model, tok, eos_token_ids=[stop], max_seq_len=256)
  assert eos_engine.generate([prompt], SamplingParams(max_tokens=20))[0].token_ids == full[:first + 1]
  ignored = eos_engine.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
  assert ignored.token_ids == full and ignored.finish_reason == "length"


def test_logprobs_are_the_models(tiny):
  hf = tiny[1]
  prompt = _prompts(1, seed=4)[0]
  out = _engine(tiny).generate([prompt], SamplingParams(max_tokens=6, logprobs=True))[0]
  ids = torch.tensor([prompt + out.token_ids])
  with torch.no_grad():
    logp = torch.log_softmax(hf(ids).logits[0].double(), -1).numpy()
  want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(out.token_ids)]
  np.testing.assert_allclose(out.outputs[0].logprobs, want, atol=1e-4)


def test_stream_matches_generate(tiny):
  prompts = ["def fibonacci(n):", "你好，世界", "x = np.arange(10)"]
  params = SamplingParams(max_tokens=12)
  outs = _engine(tiny, max_batch_size=2).generate(prompts, params)
  tokens, texts, reasons = ([[] for _ in prompts], ["" for _ in prompts], [None for _ in prompts])
  for e in _engine(tiny, max_batch_size=2).stream(prompts, params):
    tokens[e.request_index] += e.token_ids
    texts[e.request_index] += e.text
    reasons[e.request_index] = e.finish_reason or reasons[e.request_index]
  assert tokens == [o.token_ids for o in outs]
  assert texts == [o.text for o in outs]
  assert reasons == [o.finish_reason for o in outs]


def test_chat_requests_use_the_template(tiny):
  d, hf, _, tok = tiny
  messages = [{"role": "user", "content": "Write a haiku"}]
  ids = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(
      messages, add_generation_prompt=True, tokenize=True, return_dict=False)
  out = _engine(tiny).generate([{"messages": messages}], SamplingParams(max_tokens=8))[0]
  assert out.usage["prompt_tokens"] == len(ids)
  assert out.token_ids == _hf_greedy(hf, list(ids), 8)


@pytest.mark.parametrize("request_, message", [
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": [1, 2, 10_000]}, "token id 10000 is outside the vocabulary"),
    ({"prompt": "x" * 300}, "the context holds 256"),
    ({"text": "hi"}, "unknown request field 'text'"),
    ({"messages": "hi"}, "'messages' must be a list"),
    ({}, "needs a 'prompt' or 'messages'"),
])
def test_bad_requests_raise_one_clear_error(tiny, request_, message):
  with pytest.raises(InputError, match=message):
    _engine(tiny).generate([request_])


def test_context_bounds_max_tokens(tiny):
  prompt = _prompts(1, seed=5, lo=240, hi=241)[0]
  out = _engine(tiny, max_seq_len=256).generate([prompt], SamplingParams(max_tokens=100))[0]
  assert len(out.token_ids) == 16 and out.finish_reason == "length"


def test_paged_engine_compiles_nothing_after_warm_up(tiny):
  """warm_up compiles the bounded set `program_shapes` names; a varied workload then compiles nothing."""
  engine = _engine(tiny, max_batch_size=4, max_seq_len=128, max_prefill_chunk=64, page_size=16)
  shapes = engine.program_shapes()
  # The step: prefill parts 16/32/64 beside the 4 decode slots; the sampler of the 4 slots; the decode block; one
  # slot reset (prompts padded to the context, 128); one page copy of B pairs. Page tables are max_pages (8) wide
  # in every program.
  assert engine.max_pages == 8
  assert shapes == {"step": [16, 32, 64], "sample": [4], "decode": [4], "restore_slot": [128], "copy_pages": [4]}
  with count_compilations() as warm:
    ran = engine.warm_up()
  assert ran == 3 + 3 * (1 + 1) + 1 + 1
  assert sum(warm.values()) <= ran, warm
  rng = np.random.default_rng(9)
  workload = [Request(prompt=rng.integers(0, 600, size=int(rng.integers(1, 110))).tolist(),
                      sampling=SamplingParams(max_tokens=int(rng.integers(1, 20)),
                                              temperature=float(rng.choice([0.0, 0.8])), seed=int(i),
                                              top_k=int(rng.choice([0, 5])), repetition_penalty=float(i % 2 + 1),
                                              stop=["zz"] if i % 3 else ()))
              for i in range(25)]
  with count_compilations() as compiled:
    outs = engine.generate(workload)
  assert sum(compiled.values()) == 0, compiled
  one_at_a_time = _engine(tiny, max_batch_size=1, max_seq_len=128).generate(workload)
  assert [o.token_ids for o in outs] == [o.token_ids for o in one_at_a_time]
  assert engine.pool.num_free == engine.pool.num_pages  # every page returned


def test_packed_prefill_admits_many_prompts_in_few_calls(tiny):
  """32 prompts into 32 slots: rows x bucket <= max_prefill_chunk tokens per call, so a handful of calls."""
  hf = tiny[1]
  prompts = _prompts(32, seed=4, lo=3, hi=30)  # buckets 16 and 32
  engine = _engine(tiny, max_batch_size=32, max_prefill_chunk=512, decode_steps=4)
  outs = engine.generate(prompts, SamplingParams(max_tokens=5))
  assert engine.stats()["prefill_calls"] <= 4, engine.stats
  for p, out in zip(prompts, outs):
    assert out.token_ids == _hf_greedy(hf, p, 5)


def test_a_short_context_does_not_shrink_the_step_budget(tiny):
  """max_seq_len caps one prompt, not a step: 8 prompts of 40-48 tokens with max_seq_len 64 prefill in one step of
  up to 8 x 64 tokens (they would take 8 steps if the budget were max_seq_len), and greedy stays transformers'."""
  hf = tiny[1]
  prompts = _prompts(8, seed=6, lo=40, hi=49)
  engine = _engine(tiny, max_batch_size=8, max_seq_len=64, max_prefill_chunk=512)
  assert engine.program_shapes()["step"] == [16, 32, 64, 128, 256, 512]
  outs = engine.generate(prompts, SamplingParams(max_tokens=6))
  assert engine.stats()["prefill_calls"] == 1, engine.stats()
  for p, out in zip(prompts, outs):
    assert out.token_ids == _hf_greedy(hf, p, 6)
  assert _engine(tiny, max_batch_size=2, max_seq_len=64).program_shapes()["step"] == [16, 32, 64, 128]
