"""Constrained decoding (`qwenjax.engine.constraints`) on a tiny Qwen2 with a real (tiny) BPE tokenizer.

Every output is checked with independent tools: `jsonschema` / `re` / `json` for what it must be, and a fresh
llguidance matcher built here from the tokenizer's JSON, which re-runs each output token by token and asserts
that every emitted token was allowed where it was emitted (so a decode block never let a row run past its mask).
"""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import pytest
import torch

from qwenjax import InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine import constraints, sampling
from qwenjax.engine.engine import Engine
from qwenjax.engine.profiling import count_compilations
from qwenjax.engine.requests import Request
from qwenjax.engine.sampling import SamplingParams
from qwenjax.model.kv_cache import page_bytes
from qwenjax.text.tokenizer import Tokenizer

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir

V = 640  # the model's logit width; the tiny tokenizer has ~500 tokens, so ids past it must never be sampled
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

SCHEMAS = [
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer",
     "minimum": 0, "maximum": 99}}, "required": ["color", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
     "minItems": 1, "maxItems": 3}}, "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"ok": {"type": "boolean"}},
     "required": ["ok"], "additionalProperties": False}, "id": {"type": "string", "pattern": "^[a-f]{2,4}$"}},
     "required": ["inner", "id"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
MESSAGES = [{"role": "user", "content": "What is the weather?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny model whose <tool_call> logit is 1.5x its first greedy token's after the chat prompt: unconstrained
  greedy decoding then opens a tool call, so forbidding it (tool_choice "none") is seen to bite."""
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("constraints"))
  hf = build_tiny_qwen2(d, vocab_size=V, num_key_value_heads=2)
  tok = Tokenizer.from_directory(d)
  prompt = tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=True)
  with torch.no_grad():
    first = int(hf(torch.tensor([prompt])).logits[0, -1].argmax())
    hf.lm_head.weight[tok.token_to_id("<tool_call>")] = 1.5 * hf.lm_head.weight[first]
  hf.save_pretrained(d)
  return load_model(d), tok, llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=V, eos_token=tok.eos_token_ids)


def _engine(tiny, **kw):
  model, tok, _ = tiny
  kw.setdefault("max_seq_len", 256)
  return Engine(model, tok, **kw)


def _check_tokens(tiny, grammar: str, token_ids: list[int], stop_ids, complete: bool = True):
  """Re-runs llguidance over an output: each token allowed by the mask where it came, ids inside the tokenizer,
  and (complete) the output finished: it ends with a stop id where the grammar accepts."""
  _, tok, lltok = tiny
  matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
  assert not matcher.is_error(), matcher.get_error()
  mask = llg_numpy.allocate_token_bitmask(1, V)
  for i, t in enumerate(token_ids):
    assert t < tok.vocab_size, (i, t)
    llg_numpy.fill_next_token_bitmask(matcher, mask)
    allowed = (mask[0, t // 32] >> (t % 32)) & 1
    if t in stop_ids:
      assert i == len(token_ids) - 1 and matcher.is_accepting(), (i, t)
      return
    assert allowed, f"token {i} ({t}, {tok.decode([t])!r}) was not allowed after {tok.decode(token_ids[:i])!r}"
    assert matcher.consume_token(t), matcher.get_error()
  assert not complete, f"the output did not end with a stop id: {tok.decode(token_ids)!r}"


def _schema_request(schema, seed, n=1, max_tokens=80, prompt="Answer in JSON:"):
  return Request(prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, n=n),
                 response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})


def test_masked_sampling_never_picks_a_forbidden_token():
  """`sample` with a bitmask: greedy is the argmax over allowed tokens (numpy), sampling with filters and
  penalties draws only allowed ones, and the reported log-probability is the raw distribution's."""
  rng = np.random.default_rng(0)
  b, v = 4, 300
  logits = rng.normal(size=(b, v)).astype(np.float32) * 3
  allowed = rng.random((b, v)) < 0.05
  allowed[:, 7] = True
  bits = np.zeros((b, -(-v // 32) * 32), bool)
  bits[:, :v] = allowed
  mask = np.packbits(bits.reshape(b, -1, 32), axis=-1, bitorder="little").view(np.int32)[..., 0]
  raw_lp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  for params, needs in [(SamplingParams(), sampling.SamplingNeeds(masked=True)),
                        (SamplingParams(temperature=1.5, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=3),
                         sampling.SamplingNeeds(True, True, True, True, True, masked=True))]:
    arrays = sampling.pack([params] * b, sample_indices=list(range(b)))
    prompt_mask, counts = jnp.asarray(rng.random((b, v)) < 0.1), jnp.zeros((b, v), jnp.int32)
    for step in range(20):
      tokens, lp = jax.jit(sampling.sample, static_argnames="needs")(logits, arrays, jnp.full(b, step), prompt_mask,
                                                                      counts, needs=needs, mask=mask)
      tokens = np.asarray(tokens)
      assert allowed[np.arange(b), tokens].all()
      np.testing.assert_allclose(np.asarray(lp), np.asarray(raw_lp)[np.arange(b), tokens], rtol=1e-5, atol=1e-5)
      if params.greedy:
        assert (tokens == np.where(allowed, logits, -np.inf).argmax(-1)).all()
        break


def test_json_schemas_at_temperature_one_are_valid_and_share_batches_with_free_rows(tiny):
  """Four schemas, two samples each, at temperature 1 with decode_steps=4, in a batch with free requests: every
  constrained output is schema-valid and allowed token by token; the free rows equal their run alone."""
  engine = _engine(tiny, max_batch_size=6, decode_steps=4)
  free = [Request(prompt=f"def f{i}(", sampling=SamplingParams(max_tokens=24, temperature=1.0, seed=50 + i))
          for i in range(2)]
  constrained = [_schema_request(s, seed=i, n=2) for i, s in enumerate(SCHEMAS)]
  outs = engine.generate([free[0], *constrained, free[1]])
  for schema, out in zip(SCHEMAS, outs[1:-1]):
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=LAYOUT)
    assert [c.index for c in out.outputs] == [0, 1]
    for c in out.outputs:
      assert c.finish_reason == "stop", c.text
      jsonschema.validate(json.loads(c.text), schema)
      _check_tokens(tiny, grammar, c.token_ids, engine.eos_token_ids)
  assert outs[0].outputs[0].text != outs[1].outputs[0].text  # samples differ
  alone = _engine(tiny, max_batch_size=2, decode_steps=4).generate(free)
  assert [o.token_ids for o in alone] == [outs[0].token_ids, outs[-1].token_ids]
  assert engine.grammars.compiled == len(SCHEMAS)  # each distinct schema once, whatever n is


def test_json_object_regex_and_lark(tiny):
  engine = _engine(tiny, max_batch_size=4, decode_steps=3)
  regex = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
  lark = 'start: greeting " " NAME "!"\ngreeting: "hi" | "hello"\nNAME: /[A-Z][a-z]{1,6}/\n'
  formats = [{"type": "json_object"}, {"type": "regex", "regex": regex}, {"type": "grammar", "grammar": lark}]
  outs = engine.generate([Request(prompt="x", response_format=f, sampling=SamplingParams(
      max_tokens=60, temperature=1.0, seed=i, n=2)) for i, f in enumerate(formats)])
  grammars = [llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=LAYOUT),
              llguidance.LLMatcher.grammar_from_regex(regex), llguidance.LLMatcher.grammar_from_lark(lark)]
  checks = [lambda t: isinstance(json.loads(t), dict), lambda t: re.fullmatch(regex, t),
            lambda t: re.fullmatch(r"(hi|hello) [A-Z][a-z]{1,6}!", t)]
  for out, grammar, check in zip(outs, grammars, checks):
    for c in out.outputs:
      # A random model's free-form JSON object can run on in a string past max_tokens: then a valid prefix.
      finished = c.finish_reason == "stop"
      assert (finished and check(c.text)) or (out is outs[0] and len(c.token_ids) == 60), c.text
      _check_tokens(tiny, grammar, c.token_ids, engine.eos_token_ids, complete=finished)


def _calls(text: str) -> list[dict]:
  """Hermes tool-call blocks of a whole output (nothing else allowed around them), parsed with json."""
  blocks = text.split("\n")
  assert re.fullmatch(r"(<tool_call>\n[^\n]*\n</tool_call>)(\n<tool_call>\n[^\n]*\n</tool_call>)*", text), text
  return [json.loads(b) for b in blocks if b.startswith("{")]


def test_tool_choice_required_named_and_none(tiny):
  _, tok, _ = tiny
  engine = _engine(tiny, max_batch_size=4, decode_steps=4, max_seq_len=1024)  # the tools prompt: ~650 tokens
  schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
  sampled = SamplingParams(max_tokens=120, temperature=1.0, seed=4, n=3)
  requests = [Request(messages=MESSAGES, tools=TOOLS, tool_choice="required", sampling=sampled),
              Request(messages=MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                      sampling=sampled),
              Request(messages=MESSAGES, tools=TOOLS, tool_choice="none", sampling=SamplingParams(max_tokens=30)),
              Request(messages=MESSAGES, tools=TOOLS, tool_choice="auto", sampling=SamplingParams(max_tokens=30))]
  required, named, none, auto = engine.generate(requests)
  tool_call = tok.token_to_id("<tool_call>")
  for out in (required, named):
    for c in out.outputs:
      assert c.finish_reason == "stop" and c.token_ids[0] == tool_call, c.text
      calls = _calls(c.text)
      assert calls and (len(calls) == 1 or out is required)
      for call in calls:
        assert set(call) == {"name", "arguments"} and call["name"] in schemas
        assert out is required or call["name"] == "add"
        jsonschema.validate(call["arguments"], schemas[call["name"]])
  assert auto.token_ids[0] == tool_call  # this model opens a tool call when free to ...
  assert tool_call not in none.token_ids and len(none.token_ids) == 30  # ... and never does under "none"


def test_invalid_constraints_are_that_requests_error(tiny):
  """Each malformed or uncompilable constraint is an InputError from prepare naming the problem (a batch job
  records it for that line); the other requests are served."""
  engine = _engine(tiny, max_batch_size=2)
  bad = {
      "invalid JSON schema": {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
      "invalid regex": {"response_format": {"type": "regex", "regex": "a(b"}},
      "invalid Lark grammar": {"response_format": {"type": "grammar", "grammar": "start: undefined_rule"}},
      "response_format type 'xml'": {"response_format": {"type": "xml"}},
      "not in tools": {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
      "needs a non-empty 'tools'": {"tool_choice": "required"},
      "cannot both constrain": {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
  }
  good = [_schema_request(SCHEMAS[0], seed=1), Request(prompt="hi", sampling=SamplingParams(max_tokens=3))]
  items, errors = [], []
  requests = [Request(prompt="x", **fields) for fields in bad.values()]
  for i, r in enumerate([good[0], *requests, good[1]]):
    try:
      items.append((i, r, engine.prepare(r)))
    except InputError as e:
      errors.append(str(e))
  assert len(errors) == len(bad)
  for expected, message in zip(bad, errors):
    assert expected in message and "\n" not in message, message
  outs = dict(engine.serve(items))
  assert sorted(outs) == [0, len(bad) + 1]
  jsonschema.validate(json.loads(outs[0].text), SCHEMAS[0])
  with pytest.raises(InputError, match="invalid regex"):  # an invalid spec is remembered, not compiled again
    engine.prepare(Request(prompt="x", **bad["invalid regex"]))
  assert engine.grammars.compiled == 4  # schema 0, the bad schema, regex and Lark grammar


def test_grammar_rows_pause_one_token_per_block_and_survive_preemption(tiny):
  """A grammar-constrained row samples one token per decode block (a pause, not "length"), in one-step blocks
  when every row is constrained; through preemption (recompute) its matcher keeps its place: outputs equal an
  ample pool's."""
  requests = [_schema_request(SCHEMAS[i % 4], seed=i, max_tokens=48, prompt="Answer in JSON: " * 3)
              for i in range(6)]
  model = tiny[0]
  small = _engine(tiny, max_batch_size=4, decode_steps=4, page_size=16,
                  kv_cache_memory=8 * page_bytes(model.cfg, 16, model.dtype) / 2**30)  # 128 tokens for 4 of ~70
  assert small.pool.num_pages == 8
  outs = small.generate(requests)
  assert small.stats()["preemptions"] > 0, small.stats
  ample = _engine(tiny, max_batch_size=4, decode_steps=4).generate(requests)
  assert [o.token_ids for o in outs] == [o.token_ids for o in ample]
  for r, out in zip(requests, outs):
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), r.response_format["json_schema"]["schema"])
  one = _engine(tiny, max_batch_size=2, decode_steps=4)
  [out] = one.generate([requests[0]])
  assert one.stats()["decode_calls"] == len(out.token_ids) - 1  # the first token comes with the prefill


def test_no_recompilation_after_warm_up_as_constrained_rows_come_and_go(tiny):
  """warm_up(constrained=True) adds the masked sampler and decode (k and 1 steps) variants; then a mix of free,
  grammar-constrained and tool_choice "none" requests through two slots compiles nothing."""
  engine = _engine(tiny, max_batch_size=2, max_seq_len=16, max_prefill_chunk=16, page_size=16, decode_steps=4)
  shapes = engine.program_shapes(constrained=True)  # one shape of each kind
  assert shapes == {"step": [16], "sample": [2], "decode": [4], "restore_slot": [16], "copy_pages": [2],
                    "masked_sample": [2], "masked_decode": [1, 4]}
  with count_compilations() as warm:
    ran = engine.warm_up(constrained=True)
  # The step; per variant a sampler and a block, masked a sampler and two blocks; restore_slot, copy_pages.
  assert ran == 1 + 3 * (1 + 1) + 3 * (1 + 2) + 1 + 1
  assert sum(warm.values()) <= ran, warm
  rng = np.random.default_rng(3)
  workload = []
  for i in range(9):
    params = SamplingParams(max_tokens=int(rng.integers(2, 9)), temperature=float(rng.choice([0.0, 1.0])), seed=i,
                            repetition_penalty=float(rng.choice([1.0, 1.2])))
    constraint = [{}, {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMAS[i % 4]}}},
                  {"tools": TOOLS, "tool_choice": "none"}][i % 3]
    workload.append(Request(prompt=rng.integers(0, 400, size=int(rng.integers(1, 8))).tolist(), sampling=params,
                            **constraint))
  with count_compilations() as compiled:
    outs = engine.generate(workload)
  assert sum(compiled.values()) == 0, compiled
  assert all(o.finish_reason == "length" or o.token_ids[-1] in engine.eos_token_ids for o in outs)


def test_a_speculative_engine_compiles_nothing_after_warm_up_as_constrained_rows_speculate(tiny):
  """warm_up(constrained=True) on an n-gram engine also compiles the masked verify programs (a mask per position);
  then free, schema, regex and tool_choice "none" rows with repeats to look up, greedy and sampled, verify
  proposals and compile nothing."""
  engine = _engine(tiny, max_batch_size=2, max_seq_len=64, max_prefill_chunk=16, page_size=16, decode_steps=4,
                   speculative=dict(num_speculative_tokens=3, prompt_lookup_min=1, adaptive=False))
  assert engine.program_shapes(constrained=True)["masked_verify"] == [2, 4]
  engine.warm_up(sampling=[SamplingParams(), SamplingParams(temperature=0.8, seed=0)], constrained=True)
  constraints_ = [{}, {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMAS[0]}}},
                  {"response_format": {"type": "regex", "regex": r"(ab|cd)( (ab|cd)){3,9}"}},
                  {"tools": TOOLS, "tool_choice": "none"}]
  workload = [Request(prompt="ab cd ab cd ab" if i % 2 else "x = 1\nx = 1\nx =",
                      sampling=SamplingParams(max_tokens=12, temperature=[0.0, 0.8][i % 2], seed=i),
                      **constraints_[i % 4])
              for i in range(8)]
  with count_compilations() as compiled:
    engine.generate(workload)
  assert sum(compiled.values()) == 0, compiled
  assert engine.stats()["spec_verify_rows"] > 0


def test_constrained_rows_speculate_under_their_masks_and_decode_as_without_speculation(tiny):
  """On an n-gram speculative engine, grammar-constrained rows (JSON schemas, a regex whose text repeats) propose
  what their grammar takes, cut at the first token it would refuse, and each verified position samples under the
  mask that holds after the proposals before it: beside free rows, greedy and sampled, every output equals the
  plain engine's, proposals of the constrained rows are kept, and a fresh matcher finds every token allowed where
  it came."""
  regex = r"(ab|cd)( (ab|cd)){5,12}"
  free = [Request(prompt="x = 1\ny = 2\nx = 1\ny = 2\nx =", sampling=SamplingParams(max_tokens=30)),
          Request(prompt="def f(a):\n    return a\ndef f(", sampling=SamplingParams(max_tokens=30, temperature=0.9,
                                                                                  seed=8))]
  constrained = [*[_schema_request(s, seed=i) for i, s in enumerate(SCHEMAS[:2])],
                 *[Request(prompt="ab cd ab cd ab", sampling=SamplingParams(max_tokens=40, temperature=t, seed=3),
                           response_format={"type": "regex", "regex": regex}) for t in (0.0, 0.7)]]
  requests = [free[0], *constrained, free[1]]
  plain = _engine(tiny, max_batch_size=6).generate(requests)
  engine = _engine(tiny, max_batch_size=6, speculative=dict(num_speculative_tokens=3, prompt_lookup_min=1,
                                                             adaptive=False))
  spec = engine.generate(requests)
  assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
  assert engine.stats()["spec_verify_rows"] > 0
  only = _engine(tiny, max_batch_size=6, speculative=dict(num_speculative_tokens=3, prompt_lookup_min=1,
                                                           adaptive=False))
  outs = only.generate(constrained)
  assert [o.token_ids for o in outs] == [o.token_ids for o in plain[1:-1]]
  stats = only.stats()
  assert 0 < stats["spec_accepted_tokens"] <= stats["spec_proposed_tokens"], stats
  grammars = [llguidance.LLMatcher.grammar_from_json_schema(s, defaults=LAYOUT) for s in SCHEMAS[:2]]
  grammars += [llguidance.LLMatcher.grammar_from_regex(regex)] * 2
  for grammar, out in zip(grammars, outs):
    _check_tokens(tiny, grammar, out.token_ids, engine.eos_token_ids, complete=out.finish_reason == "stop")


def test_the_compiled_grammars_kept_are_bounded_and_the_least_recent_goes_first(tiny, monkeypatch):
  """A server meets new schemas for as long as it runs: only the most recently used _MAX_COMPILED stay compiled;
  one dropped is compiled again when it comes back, one kept is not."""
  engine = _engine(tiny)
  monkeypatch.setattr(constraints, "_MAX_COMPILED", 2)
  regex = lambda r: Request(prompt="x", response_format={"type": "regex", "regex": r})
  for r in ("a+", "b+", "a+", "c+"):  # a+ used again after b+: b+ is the least recent when c+ comes
    engine.prepare(regex(r))
  assert engine.grammars.compiled == 3
  engine.prepare(regex("a+"))
  assert engine.grammars.compiled == 3  # kept
  engine.prepare(regex("b+"))
  assert engine.grammars.compiled == 4  # dropped, compiled again
