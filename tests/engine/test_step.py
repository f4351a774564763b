"""The engine's step seam (add_request / step / abort / has_unfinished / stats) on a tiny Qwen2, with generate()'s
own outputs as the reference: what a server drives must be what a batch job gets."""

import pytest

from qwenjax import InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.engine import Engine
from qwenjax.engine.requests import Request
from qwenjax.engine.sampling import SamplingParams
from qwenjax.text.tokenizer import Tokenizer

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("step"))
  build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  return load_model(d), Tokenizer.from_directory(d)


@pytest.fixture(scope="module")
def engine(tiny):
  model, tok = tiny
  return Engine(model, tok, max_seq_len=128, max_batch_size=4, decode_steps=2, eos_token_ids=())


def _requests(sampling=None):
  prompts = ["def fibonacci(n):", "The quick brown fox jumps", "import numpy as np\n"]
  return [Request(prompt=p, id=f"r{i}", sampling=sampling or SamplingParams(max_tokens=12 + 3 * i))
          for i, p in enumerate(prompts)]


def _drive(engine, abort=None, after=2):
  """Steps until nothing is unfinished, aborting request `abort` after `after` steps; returns the final outputs by
  id, every step's outputs and the step count."""
  final, seen, steps = {}, [], 0
  while engine.has_unfinished():
    outs = engine.step()
    steps += 1
    seen.append(outs)
    for out in outs:
      if out.finished:
        assert out.id not in final, out.id
        final[out.id] = out
    if steps == after and abort is not None:
      assert engine.abort(abort)
  return final, seen, steps


def test_step_with_an_abort_gives_generates_tokens_and_returns_every_page(engine):
  reference = {out.id: out for out in engine.generate(_requests())}
  ids = [engine.add_request(r) for r in _requests()]
  assert ids == ["r0", "r1", "r2"]
  assert engine.stats()["requests_waiting"] == 3 and engine.stats()["requests_running"] == 0
  final, seen, _ = _drive(engine, abort="r1")
  assert sorted(final) == ["r0", "r2"]  # nothing more came out for the aborted one
  assert all(out.id != "r1" for outs in seen[2:] for out in outs)
  for rid in ("r0", "r2"):
    assert final[rid].token_ids == reference[rid].token_ids
    assert final[rid].text == reference[rid].text and final[rid].finish_reason == reference[rid].finish_reason
  # Outputs so far grow monotonically: each step's tokens extend the last step's.
  last = {}
  for outs in seen:
    for out in outs:
      assert out.token_ids[:len(last.get(out.id, []))] == last.get(out.id, [])
      assert out.outputs[0].finish_reason is None or out.finished
      last[out.id] = out.token_ids
  stats = engine.stats()
  assert stats["kv_pages_in_use"] == 0 and stats["kv_pages_total"] == engine.pool.num_pages
  assert stats["requests_running"] == 0 and stats["requests_waiting"] == 0
  assert not engine.abort("r1") and not engine.abort("r0")  # nothing unfinished by those ids any more


def test_abort_returns_a_running_requests_pages_at_once(engine):
  engine.add_request(Request(prompt="a long enough prompt " * 4, id="long", sampling=SamplingParams(max_tokens=40)))
  engine.step()
  held = engine.stats()["kv_pages_in_use"]
  assert held > 0 and engine.stats()["requests_running"] == 1
  assert engine.abort("long")
  assert engine.stats()["kv_pages_in_use"] == 0 and not engine.has_unfinished()


def test_step_streams_text_that_only_grows_to_the_final_text(engine):
  """With stop strings, a step's text so far holds back what may begin one: it is always a prefix of the final."""
  sampling = SamplingParams(max_tokens=24, stop=["e("])
  reference = {out.id: out for out in engine.generate(_requests(sampling))}
  for r in _requests(sampling):
    engine.add_request(r)
  final, seen, _ = _drive(engine)
  for rid, out in final.items():
    assert out.text == reference[rid].text and out.token_ids == reference[rid].token_ids
  for outs in seen:
    for out in outs:
      assert final[out.id].text.startswith(out.text)


def test_stream_deltas_concatenate_to_the_final_text(engine):
  sampling = SamplingParams(max_tokens=20, stop=["e("])
  reference = engine.generate(_requests(sampling))
  text, tokens, finish = {}, {}, {}
  for event in engine.stream(_requests(sampling)):
    assert event.request_index not in finish  # nothing after a sequence's last event
    text[event.request_index] = text.get(event.request_index, "") + event.text
    tokens[event.request_index] = tokens.get(event.request_index, []) + event.token_ids
    if event.finish_reason:
      finish[event.request_index] = event.finish_reason
  assert [text[i] for i in range(3)] == [out.text for out in reference]
  assert [tokens[i] for i in range(3)] == [out.token_ids for out in reference]
  assert [finish[i] for i in range(3)] == [out.finish_reason for out in reference]


def test_n_samples_through_step_match_generate(engine):
  sampling = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, n=3, seed=5)
  reference = {out.id: out for out in engine.generate(_requests(sampling))}
  for r in _requests(sampling):
    engine.add_request(r)
  final, seen, _ = _drive(engine, abort="r1")
  assert sorted(final) == ["r0", "r2"]
  for rid, out in final.items():
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in reference[rid].outputs]
  assert all(len(out.outputs) == 3 for outs in seen for out in outs)  # every sample, finished or not
  assert engine.stats()["kv_pages_in_use"] == 0


def test_add_request_refuses_a_bad_request_and_a_duplicate_id(engine):
  with pytest.raises(InputError, match="outside the vocabulary"):
    engine.add_request([5, 10_000])
  rid = engine.add_request("hello")
  assert rid.startswith("req-")
  with pytest.raises(InputError, match=f"request id {rid!r} is already running"):
    engine.add_request(Request(prompt="again", id=rid))
  assert engine.abort(rid) and not engine.has_unfinished()


def test_decoding_goes_on_while_a_long_prompt_prefills(tiny):
  """A request that is decoding gets a token in every step while a 100-token prompt prefills in 16-token chunks
  (the step's budget): seven steps, each advancing the first request by one token, and both end with generate()'s
  tokens."""
  model, tok = tiny
  engine = Engine(model, tok, max_seq_len=160, max_batch_size=2, max_prefill_chunk=16, decode_steps=4,
                  eos_token_ids=(), prefix_caching=False)  # the second run computes the whole prompt again
  short = Request(prompt=list(range(5, 12)), id="short", sampling=SamplingParams(max_tokens=40))
  long = Request(prompt=[(7 * i) % 600 for i in range(100)], id="long", sampling=SamplingParams(max_tokens=6))
  reference = {out.id: out.token_ids for out in engine.generate([short, long])}
  engine.add_request(short)
  [first] = engine.step()  # its prompt and its first token in one step
  assert len(first.outputs[0].token_ids) == 1
  engine.add_request(long)
  counts = []
  for _ in range(7):  # ceil(100 / 16) steps of the long prompt's chunks, the last with its first token
    outs = {out.id: out for out in engine.step()}
    counts.append(len(outs["short"].outputs[0].token_ids))
    assert ("long" in outs) == (len(counts) == 7)
  assert counts == list(range(2, 9))
  final, _, _ = _drive(engine)
  assert final["short"].token_ids == reference["short"] and final["long"].token_ids == reference["long"]
  assert engine.stats()["kv_pages_in_use"] == 0
