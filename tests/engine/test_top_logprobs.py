"""Top log-probabilities (`SamplingParams.top_logprobs`) against transformers' float32 log_softmax at each
generated position: the most likely ids in order and their values, beside sampled, greedy and penalised rows that
share the decode blocks; both caches; compiled by warm_up."""

import numpy as np
import pytest
import torch

from qwenjax import InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.engine import Engine
from qwenjax.engine.profiling import count_compilations
from qwenjax.engine.requests import Request
from qwenjax.engine.sampling import SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_factory):
  d, hf = tiny_factory("top_logprobs", num_key_value_heads=2)
  return hf, load_model(d)


def _hf_logprobs(hf, prompt, generated):
  """[len(generated), V]: transformers' log_softmax at each generated position (the logits before each token)."""
  with torch.no_grad():
    logits = hf(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1].float()
  return torch.log_softmax(logits, -1).numpy()


def _check(hf, prompt, completion, k):
  want = _hf_logprobs(hf, prompt, completion.token_ids)
  assert len(completion.top_logprobs) == len(completion.token_ids)
  for pos, (tok, lp, top) in enumerate(zip(completion.token_ids, completion.logprobs, completion.top_logprobs)):
    order = np.argsort(-want[pos], kind="stable")[:k]
    assert [i for i, _ in top] == order.tolist(), pos
    np.testing.assert_allclose([v for _, v in top], want[pos][order], atol=TOL, rtol=0)
    assert abs(lp - want[pos][tok]) < TOL


def test_top_logprobs_equal_transformers_beside_other_rows(tiny):
  hf, model = tiny
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 300, size=n).tolist() for n in (9, 4, 17)]
  params = [SamplingParams(max_tokens=7, temperature=1.0, seed=3, top_logprobs=5),
            SamplingParams(max_tokens=7),
            SamplingParams(max_tokens=6, repetition_penalty=1.3, top_logprobs=20, n=2)]
  engine = Engine(model, None, eos_token_ids=(), max_batch_size=4, max_seq_len=64, decode_steps=3)
  outs = engine.generate([Request(prompt=p, sampling=s) for p, s in zip(prompts, params)])
  _check(hf, prompts[0], outs[0].outputs[0], 5)
  for c in outs[2].outputs:
    _check(hf, prompts[2], c, 20)
  assert outs[1].outputs[0].top_logprobs is None and outs[1].outputs[0].logprobs is None
  alone = Engine(model, None, eos_token_ids=(), max_batch_size=4, max_seq_len=64, decode_steps=3)
  [plain] = alone.generate([Request(prompt=prompts[1], sampling=params[1])])
  assert outs[1].token_ids == plain.token_ids  # the variant changes no row's tokens


def test_warm_up_covers_the_top_logprobs_variants(tiny):
  _, model = tiny
  engine = Engine(model, None, eos_token_ids=(), max_batch_size=2, max_seq_len=16, max_prefill_chunk=16,
                  page_size=16)
  # The step; six variants (three, each with top log-probabilities too), each a sampler and a decode block; the
  # slot reset and the page copy.
  assert engine.warm_up(top_logprobs=True) == 1 + 6 * (1 + 1) + 1 + 1
  with count_compilations() as compiled:
    engine.generate([Request(prompt=[3, 4], sampling=SamplingParams(max_tokens=3, top_logprobs=2)),
                     Request(prompt=[5], sampling=SamplingParams(max_tokens=4, temperature=0.7, seed=1))])
  assert sum(compiled.values()) == 0, compiled


def test_the_parameter_is_validated():
  assert SamplingParams(top_logprobs=3).logprobs  # asking for alternatives reports the chosen token's too
  assert SamplingParams.from_dict({"top_logprobs": None}).top_logprobs == 0
  with pytest.raises(InputError, match=r"top_logprobs must be an integer in \[0, 20\], got 21"):
    SamplingParams(top_logprobs=21)
