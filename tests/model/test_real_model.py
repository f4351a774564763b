"""The embedded Qwen2.5-Coder-0.5B-Instruct against transformers loading the same GGUF, in float32.

transformers dequantizes the GGUF to float32 torch weights (accelerate + gguf), so both sides start from the
same numbers; differences come from summation order only.
"""

import numpy as np
import pytest
import torch
from flax import nnx

import qwenjax
from qwenjax import KVCache, SamplingParams, prefill

pytestmark = pytest.mark.real_model

LOGIT_TOL = 2e-4  # measured: largest |difference| 8.4e-5 over three chat prompts (logits of magnitude ~20)

CHATS = [
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "用一句话解释什么是递归。"}],
    [{"role": "user", "content": "Fix this bug:\n```js\nconst xs = [1,2,3];\nfor (i = 0; i <= xs.length; i++) "
                                 "console.log(xs[i]);\n```"}],
]


@pytest.fixture(scope="module")
def ours():
  """The embedded model as users load it on a CPU (unrolled layers, the default), held to transformers."""
  return qwenjax.load("default", dtype="float32")


@pytest.fixture(scope="module")
def theirs(ours):
  transformers = pytest.importorskip("transformers")
  from pathlib import Path

  path = Path(ours.source)
  model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32)
  return model.eval()


def _prompt_ids(ours, chat):
  return ours.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)


def test_logits_match_transformers(ours, theirs):
  graphdef, params = nnx.split(ours.model)
  worst = 0.0
  for chat in CHATS:
    ids = _prompt_ids(ours, chat)
    with torch.no_grad():
      ref = theirs(torch.tensor([ids])).logits[0].numpy()
    cache = KVCache.zeros(ours.config, 1, 128)
    tokens = np.zeros((1, 128), np.int32)
    tokens[0, :len(ids)] = ids
    logits, _ = prefill(graphdef, params, cache, tokens, np.array([len(ids)], np.int32), all_logits=True)
    got = np.asarray(logits)[0, :len(ids)]
    worst = max(worst, float(np.abs(got - ref).max()))
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
  print(f"worst |logit difference| {worst:.2e}")
  assert worst < LOGIT_TOL, worst


def test_greedy_generation_matches_transformers(ours, theirs):
  eos = ours.tokenizer.eos_token_ids
  engine = qwenjax.Engine(ours.model, ours.tokenizer, max_batch_size=2, max_seq_len=256)
  prompts = [_prompt_ids(ours, chat) for chat in CHATS]
  # Three prompts through two slots: the third is admitted when the first finishes (continuous batching).
  batched = engine.generate(prompts, SamplingParams(max_tokens=32))
  for ids, got in zip(prompts, batched):
    with torch.no_grad():
      out = theirs.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eos,
                            pad_token_id=ours.tokenizer.pad_token_id,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    want = out[0, len(ids):].tolist()
    assert got.token_ids == want, ours.tokenizer.decode(got.token_ids) + " != " + ours.tokenizer.decode(want)
    assert got.finish_reason == ("stop" if want[-1] in eos else "length")


def test_ngram_speculation_on_code_edits_equals_plain_decoding(real_float32):
  """Prompt lookup on the embedded model, k = 4, over code-editing prompts of 256+ tokens (functions of
  textwrap.py with an edit to make: launch.bench.speculative's workload), three slots: greedy outputs equal plain
  decoding's, and the edits' copied code is proposed and kept (over two tokens gained per verified step). (k = 1 to
  8 run on the tiny models, tests/engine/test_speculative.py.) Scanned layers (`real_float32`): speculation is held
  to plain decoding of the same model, and the scanned one compiles 4x faster."""
  from launch.bench import speculative

  ours = real_float32
  prompts = sorted((_prompt_ids(ours, r["messages"]) for r in speculative.requests("code")), key=len)
  prompts = [p for p in prompts if len(p) >= 256][:3]  # the three shortest of 256 tokens or more
  params = SamplingParams(max_tokens=48)
  plain = qwenjax.Engine(ours.model, ours.tokenizer, max_batch_size=3, max_seq_len=1024).generate(prompts, params)
  engine = qwenjax.Engine(ours.model, ours.tokenizer, max_batch_size=3, max_seq_len=1024,
                          speculative=dict(num_speculative_tokens=4))
  spec = engine.generate(prompts, params)
  assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
  stats = engine.stats()
  print({key: v for key, v in stats.items() if key.startswith("spec_")})
  assert stats["spec_mean_accepted_length"] > 2, stats
