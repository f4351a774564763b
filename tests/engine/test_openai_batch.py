"""OpenAI Batch lines in and out, checked with the `openai` package's own types.

Input bodies are validated as openai's request params (so the test lines are real API requests); output bodies are
parsed with `openai.types.chat.ChatCompletion` / `openai.types.Completion`. The openai package has no type for a
batch file's lines, so `_BatchOutputLine` spells the documented envelope (BatchRequestOutput in OpenAI's API
reference) with extra fields forbidden except ours ("metadata"). Two rows go through a real engine on a tiny model.
"""

import json
from typing import Any, Literal

import numpy as np
import openai.types as oai
import openai.types.chat as oai_chat
import pydantic
import pytest
import transformers
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qwenjax._errors import InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine import openai_batch
from qwenjax.engine.engine import Engine
from qwenjax.engine.requests import Completion, Request, RequestOutput
from qwenjax.engine.sampling import SamplingParams
from qwenjax.text.tokenizer import Tokenizer

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir


class _Response(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")
  status_code: int
  request_id: str
  body: dict[str, Any] | None


class _Error(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")
  code: str
  message: str


class _BatchOutputLine(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")
  id: str
  custom_id: str
  response: _Response | None
  error: _Error | None
  metadata: Any = None


class _BatchInputLine(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")
  custom_id: str
  method: Literal["POST"]
  url: Literal["/v1/chat/completions", "/v1/completions"]
  body: dict[str, Any]


def _consume(value):
  """openai's params types validate iterables lazily: walk them so that every item is checked."""
  if isinstance(value, dict):
    return {k: _consume(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)) or type(value).__name__ == "ValidatorIterator":
    return [_consume(v) for v in value]
  return value


_CHAT_PARAMS = pydantic.TypeAdapter(chat_create_params.CompletionCreateParamsNonStreaming)
_COMPLETION_PARAMS = pydantic.TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)


def _line(custom_id, body, url="/v1/chat/completions"):
  """A batch input line whose envelope and body openai's types accept."""
  line = {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "qwen", **body}}
  _BatchInputLine.model_validate(line)
  adapter = _CHAT_PARAMS if url == "/v1/chat/completions" else _COMPLETION_PARAMS
  typed = {k: v for k, v in line["body"].items() if v is not None}  # the params types are written without nulls
  if isinstance(typed.get("prompt"), list) and isinstance(typed["prompt"][0], list):
    # pydantic validates Iterable[int] | Iterable[Iterable[int]] lazily, committing to the first member.
    assert all(isinstance(t, int) for p in typed["prompt"] for t in p)
    typed["prompt"] = "(checked above)"
  _consume(adapter.validate_python(typed))
  return line


def _output(line, **kw):
  """An output line, checked as the documented envelope; returns (line, parsed body)."""
  out = openai_batch.result_line(line, model="qwen2.5-tiny", created=1_700_000_000, **kw)
  assert json.loads(json.dumps(out)) == out  # plain JSON
  envelope = _BatchOutputLine.model_validate(out)
  assert envelope.custom_id == line["custom_id"] and envelope.error is None
  assert envelope.response.status_code == 200 and envelope.id.startswith("batch_req_")
  assert openai_batch.is_result(out) and openai_batch.result_key(out) == line["custom_id"]
  kind = oai_chat.ChatCompletion if line["url"] == "/v1/chat/completions" else oai.Completion
  return out, kind.model_validate(envelope.response.body)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def _completion(tok, text, index=0, finish="stop", logprobs=False):
  ids = tok.encode(text, add_special_tokens=False)
  return Completion(text, ids, finish, index, [-0.25 * (i + 1) for i in range(len(ids))] if logprobs else None)


# --- Input lines ---------------------------------------------------------------------------------------------


def test_chat_line_maps_onto_the_request():
  body = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
          "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "n": 2, "stop": "x", "seed": 3,
          "presence_penalty": 0.1, "frequency_penalty": -0.2, "logprobs": True, "top_logprobs": 0, "user": "u",
          "metadata": {"k": "v"}, "stream": False, "tools": [WEATHER, CLOCK], "tool_choice": "auto",
          "parallel_tool_calls": True, "store": False,
          "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}}
  line = _line("req-1", body)
  assert openai_batch.is_batch_line(line) and not openai_batch.is_batch_line({"id": 1, "prompt": "x"})
  request = openai_batch.to_request(line, SamplingParams(max_tokens=99, top_k=5, min_p=0.1))
  assert request.id == "req-1" and request.prompt is None
  assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  assert request.tools == [WEATHER, CLOCK] and request.tool_choice == "auto"
  assert request.response_format == body["response_format"]
  assert request.sampling == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop=("x",), seed=3,
                                            presence_penalty=0.1, frequency_penalty=-0.2, logprobs=True, top_k=5,
                                            min_p=0.1)


def test_nulls_keep_the_defaults_and_vllm_extras_apply():
  line = _line("r", {"messages": [{"role": "user", "content": "Hi"}], "temperature": None, "max_tokens": None,
                     "stop": None, "logprobs": None, "tools": None, "tool_choice": None, "response_format": None})
  default = SamplingParams(max_tokens=11, temperature=0.7, seed=5)
  request = openai_batch.to_request(line, default)
  assert request.sampling == default and request.tools is None and request.tool_choice is None
  assert openai_batch.to_request(line, SamplingParams(logprobs=True)).sampling.logprobs  # unset: the default's
  line["body"].update(top_k=4, min_p=0.05, repetition_penalty=1.1, stop_token_ids=[3], ignore_eos=True)
  assert openai_batch.to_request(line, default).sampling == SamplingParams(
      max_tokens=11, temperature=0.7, seed=5, top_k=4, min_p=0.05, repetition_penalty=1.1, stop_token_ids=(3,),
      ignore_eos=True)


@pytest.mark.parametrize("prompt, expected", [
    ("def f(x):", "def f(x):"), (["def f(x):"], "def f(x):"), ([5, 6, 7], [5, 6, 7]), ([[5, 6, 7]], [5, 6, 7]),
])
def test_completion_line_takes_one_prompt(prompt, expected):
  line = _line("c", {"prompt": prompt, "max_tokens": 3, "logprobs": 0, "echo": False, "best_of": 1,
                     "response_format": {"type": "json_object"}}, url="/v1/completions")
  request = openai_batch.to_request(line, SamplingParams())
  assert request.prompt == expected and request.messages is None
  assert request.sampling == SamplingParams(max_tokens=3, logprobs=True)
  assert request.response_format == {"type": "json_object"}


def test_our_response_formats_pass_through():
  for fmt in ({"type": "regex", "regex": "[a-z]+"}, {"type": "grammar", "grammar": "start: \"yes\" | \"no\""},
              {"type": "text"}):
    line = {"custom_id": "g", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "?"}], "response_format": fmt}}
    assert openai_batch.to_request(line, SamplingParams()).response_format == fmt


def test_named_and_required_tool_choice_pass_through():
  named = {"type": "function", "function": {"name": "now"}}
  for choice in ("required", named, "none"):
    line = _line("t", {"messages": [{"role": "user", "content": "?"}], "tools": [WEATHER, CLOCK],
                       "tool_choice": choice})
    assert openai_batch.to_request(line, SamplingParams()).tool_choice == choice


_CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("change, message", [
    ({"method": "GET"}, 'method must be "POST"'),
    ({"url": "/v1/embeddings"}, "url '/v1/embeddings' is not supported"),
    ({"body": "hi"}, "body must be an object"),
    ({"custom_id": 7}, "custom_id must be a non-empty string, got 7"),
    ({"custom_id": ""}, "custom_id must be a non-empty string"),
    ({"priority": 1}, "unknown batch line field 'priority'"),
    ({"body": {**_CHAT, "foo": 1}}, "body.foo is not a /v1/chat/completions parameter"),
    ({"body": {**_CHAT, "functions": []}}, "body.functions is not a"),
    ({"body": {"prompt": "hi"}}, "body.prompt is not a /v1/chat/completions parameter"),
    ({"body": {"messages": []}}, "body.messages must be a non-empty list"),
    ({"body": {**_CHAT, "stream": True}}, "body.stream must be false"),
    ({"body": {**_CHAT, "stream": 0}}, "body.stream must be false"),
    ({"body": {**_CHAT, "parallel_tool_calls": False, "tools": [WEATHER]}}, "body.parallel_tool_calls must be true"),
    ({"body": {**_CHAT, "logit_bias": {"5": 10}}}, "body.logit_bias must be {}"),
    ({"body": {**_CHAT, "top_logprobs": 3}}, "body.top_logprobs needs body.logprobs: true"),
    ({"body": {**_CHAT, "top_logprobs": 50}}, r"body.top_logprobs must be an integer in \[0, 20\]"),
    ({"body": {**_CHAT, "logprobs": 1}}, "body.logprobs must be true or false"),
    ({"body": {**_CHAT, "max_tokens": 5, "max_completion_tokens": 6}}, "disagree"),
    ({"body": {**_CHAT, "max_tokens": 0}}, "body.max_tokens must be an integer >= 1"),
    ({"body": {**_CHAT, "max_completion_tokens": [5]}}, "body.max_completion_tokens must be an integer >= 1"),
    ({"body": {**_CHAT, "temperature": -1}}, "body.temperature must be"),
    ({"body": {**_CHAT, "n": 0}}, "body.n must be"),
    ({"body": {**_CHAT, "seed": -1}}, "body.seed must be"),
    ({"body": {**_CHAT, "stop": [""]}}, "body.stop must not contain an empty string"),
    ({"body": {**_CHAT, "tools": [{"type": "custom", "custom": {"name": "x"}}]}}, r"body.tools\[0\] must be a "
     "function tool"),
    ({"body": {**_CHAT, "tools": [{"type": "function", "function": {}}]}}, r"body.tools\[0\].function needs a"),
    ({"body": {**_CHAT, "tools": {"a": 1}}}, "body.tools must be a list"),
    ({"body": {**_CHAT, "tool_choice": "required"}}, "body.tool_choice \"required\" needs body.tools"),
    ({"body": {**_CHAT, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "now"}}}},
     "names 'now', which is not among body.tools"),
    ({"body": {**_CHAT, "tools": [WEATHER], "tool_choice": "sometimes"}}, "body.tool_choice must be"),
    ({"body": {**_CHAT, "response_format": {"type": "xml"}}}, "body.response_format.type must be one of"),
    ({"body": {**_CHAT, "response_format": {"type": ["text"]}}}, "body.response_format.type must be one of"),
    ({"body": {**_CHAT, "response_format": "json"}}, "body.response_format.type must be one of"),
    ({"body": {**_CHAT, "response_format": {"type": "json_schema"}}}, "needs 'json_schema'"),
    ({"body": {**_CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}},
     "json_schema needs 'schema'"),
    ({"body": {**_CHAT, "response_format": {"type": "regex", "regex": ""}}}, "response_format.regex must be"),
    ({"url": "/v1/completions", "body": {"prompt": ["a", "b"]}}, "body.prompt holds 2 prompts"),
    ({"url": "/v1/completions", "body": {"prompt": {"text": "a"}}}, "body.prompt must be a string"),
    ({"url": "/v1/completions", "body": {"prompt": "a", "logprobs": 6}},
     r"body.logprobs must be an integer in \[0, 5\]"),
    ({"url": "/v1/completions", "body": {"prompt": "a", "echo": True}}, "body.echo must be false"),
    ({"url": "/v1/completions", "body": {"prompt": "a", "suffix": "b"}}, "body.suffix is not supported"),
    ({"url": "/v1/completions", "body": {"prompt": "a", "tools": [WEATHER]}}, "body.tools is not a /v1/completions"),
])
def test_bad_lines_raise_one_error_naming_the_field(change, message):
  line = {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": _CHAT, **change}
  with pytest.raises(InputError, match=message) as e:
    openai_batch.to_request(line, SamplingParams())
  assert "\n" not in str(e.value)


# --- Output lines (synthetic outputs) -----------------------------------------------------------------------


def test_chat_result_with_n_choices_usage_and_metadata(tokenizer):
  line = _line("n2", {"messages": [{"role": "user", "content": "Hi"}], "n": 2})
  line["metadata"] = {"shard": 3, "tags": ["a"]}
  choices = [_completion(tokenizer, "Hello there.", 0), _completion(tokenizer, "Hi!", 1, "length")]
  output = RequestOutput("n2", 17, choices, cached_tokens=16)
  out, body = _output(line, output=output, tokenizer=tokenizer)
  assert out["metadata"] == {"shard": 3, "tags": ["a"]}
  assert body.object == "chat.completion" and body.model == "qwen2.5-tiny" and body.created == 1_700_000_000
  assert [(c.index, c.message.role, c.message.content, c.finish_reason, c.logprobs) for c in body.choices] == [
      (0, "assistant", "Hello there.", "stop", None), (1, "assistant", "Hi!", "length", None)]
  generated = len(output.outputs[0].token_ids) + len(output.outputs[1].token_ids)
  assert (body.usage.prompt_tokens, body.usage.completion_tokens, body.usage.total_tokens) == (17, generated,
                                                                                                17 + generated)
  assert body.usage.prompt_tokens_details.cached_tokens == 16
  again = openai_batch.result_line(line, output, model="qwen2.5-tiny", tokenizer=tokenizer, created=1_700_000_000)
  assert again == out  # ids derive from the custom_id: a rerun writes the same line
  other = openai_batch.result_line(dict(line, custom_id="n3"), output, model="m", tokenizer=tokenizer)
  assert other["id"] != out["id"] and other["response"]["body"]["id"] != body.id


def test_tool_calls_become_openai_tool_calls(tokenizer):
  line = _line("tools", {"messages": [{"role": "user", "content": "Weather in Paris and the time?"}],
                         "tools": [WEATHER, CLOCK], "n": 3})
  calls = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
  bad = '<tool_call>\n{"name": "now", "arguments": {]}\n</tool_call>'
  output = RequestOutput("tools", 40, [
      _completion(tokenizer, "Checking.\n" + calls, 0),
      _completion(tokenizer, f"{bad}\nSorry.", 1),
      _completion(tokenizer, calls[:110], 2, "length"),  # cut inside the second call by max_tokens
  ])
  out, body = _output(line, output=output, tokenizer=tokenizer)
  first, second, third = body.choices
  assert first.finish_reason == "tool_calls" and first.message.content == "Checking."
  assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in first.message.tool_calls] == [
      ("function", "get_weather", {"city": "Paris"}), ("function", "now", {})]
  assert len({c.id for c in first.message.tool_calls}) == 2 and "tool_call_errors" not in out["response"]["body"][
      "choices"][0]
  # A malformed block is neither dropped nor fatal: it stays in the content and the choice says what is wrong.
  assert second.finish_reason == "stop" and second.message.tool_calls is None
  assert second.message.content == f"{bad}\nSorry."
  errors = out["response"]["body"]["choices"][1]["tool_call_errors"]
  assert len(errors) == 1 and errors[0].startswith("tool call block 1: invalid JSON")
  # The first call is complete, the second was cut: "length" stays, the cut block is reported.
  assert third.finish_reason == "length" and [c.function.name for c in third.message.tool_calls] == ["get_weather"]
  assert out["response"]["body"]["choices"][2]["tool_call_errors"] == [
      "tool call block 2: the text ends inside the block (cut short?)"]


def test_without_tools_or_with_tool_choice_none_the_text_is_content(tokenizer):
  text = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
  output = RequestOutput("x", 5, [_completion(tokenizer, text)])
  for body in ({}, {"tools": [CLOCK], "tool_choice": "none"}):
    line = _line("x", {"messages": [{"role": "user", "content": "?"}], **body})
    _, parsed = _output(line, output=output, tokenizer=tokenizer)
    assert parsed.choices[0].message.content == text and parsed.choices[0].message.tool_calls is None
    assert parsed.choices[0].finish_reason == "stop"


def _reference_bytes(hf, ids):
  """Each token's bytes by transformers: its byte-level spelling mapped back through GPT-2's alphabet."""
  byte_of = {c: b for b, c in bytes_to_unicode().items()}
  return [bytes(byte_of[c] for c in piece) for piece in hf.convert_ids_to_tokens(ids)]


def test_chat_logprobs_report_each_chosen_token(tokenizer, hf_tokenizer):
  line = _line("lp", {"messages": [{"role": "user", "content": "?"}], "logprobs": True, "top_logprobs": 0})
  completion = _completion(tokenizer, "Café naïve 😀 done", logprobs=True)
  _, body = _output(line, output=RequestOutput("lp", 3, [completion]), tokenizer=tokenizer)
  content = body.choices[0].logprobs.content
  assert [t.logprob for t in content] == completion.logprobs
  want = _reference_bytes(hf_tokenizer, completion.token_ids)
  assert [bytes(t.bytes) for t in content] == want
  assert [t.token for t in content] == [b.decode("utf-8", errors="replace") for b in want]
  assert b"".join(want).decode() == completion.text and all(t.top_logprobs == [] for t in content)


def test_completion_logprobs_and_text_offsets(tokenizer, hf_tokenizer):
  line = _line("cl", {"prompt": "x", "logprobs": 0, "n": 2}, url="/v1/completions")
  texts = ["print(x.sum())  # 你好", "12345"]
  output = RequestOutput("cl", 1, [_completion(tokenizer, t, i, logprobs=True) for i, t in enumerate(texts)])
  out, body = _output(line, output=output, tokenizer=tokenizer)
  assert body.object == "text_completion" and [c.text for c in body.choices] == texts
  for choice, completion in zip(body.choices, output.outputs):
    ids = completion.token_ids
    assert choice.logprobs.token_logprobs == completion.logprobs
    want = _reference_bytes(hf_tokenizer, ids)
    assert choice.logprobs.tokens == [b.decode("utf-8", errors="replace") for b in want]
    # Offsets: the characters fully decoded before each token (a partial character is not yet text).
    assert choice.logprobs.text_offset == [len(hf_tokenizer.decode(ids[:k]).rstrip("\ufffd")) for k in range(len(ids))]
  assert body.usage.completion_tokens == sum(len(c.token_ids) for c in output.outputs)


def test_top_logprobs_in_both_formats(tokenizer, hf_tokenizer):
  """Each position's alternatives: chat's [{"token", "bytes", "logprob"}], completions' {token text: logprob}
  (the tokens spelled as transformers spells them); the request side maps onto SamplingParams.top_logprobs."""
  chat = _line("t", {"messages": [{"role": "user", "content": "?"}], "logprobs": True, "top_logprobs": 2})
  text = _line("u", {"prompt": "x", "logprobs": 2}, url="/v1/completions")
  for line in (chat, text):
    params = openai_batch.to_request(line, SamplingParams()).sampling
    assert params.logprobs and params.top_logprobs == 2
  completion = _completion(tokenizer, "ab cd", logprobs=True)
  alt = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("x", "y")]
  completion.top_logprobs = [[(alt[0], -0.1 * (i + 1)), (alt[1], -0.2 * (i + 1))]
                             for i in range(len(completion.token_ids))]
  names = [b.decode() for b in _reference_bytes(hf_tokenizer, alt)]
  _, body = _output(chat, output=RequestOutput("t", 3, [completion]), tokenizer=tokenizer)
  for i, t in enumerate(body.choices[0].logprobs.content):
    assert [(a.token, bytes(a.bytes).decode(), a.logprob) for a in t.top_logprobs] == [
        (names[0], names[0], -0.1 * (i + 1)), (names[1], names[1], -0.2 * (i + 1))]
  _, body = _output(text, output=RequestOutput("u", 1, [completion]), tokenizer=tokenizer)
  assert body.choices[0].logprobs.top_logprobs == [{names[0]: -0.1 * (i + 1), names[1]: -0.2 * (i + 1)}
                                                   for i in range(len(completion.token_ids))]


def test_error_lines_carry_status_code_and_message():
  line = openai_batch.error_line("line-9", "invalid_request", "body.temperature must be a finite number >= 0.")
  envelope = _BatchOutputLine.model_validate(line)
  assert envelope.response.status_code == 400 and envelope.custom_id == "line-9"
  assert envelope.error == _Error(code="invalid_request", message="body.temperature must be a finite number >= 0.")
  body = envelope.response.body["error"]
  assert body == {"message": envelope.error.message, "type": "invalid_request_error", "param": None,
                  "code": "invalid_request"}
  assert openai_batch.is_result(line) and openai_batch.result_key(line) == "line-9"
  server = openai_batch.error_line("x", "internal_error", "the engine failed.", status_code=500)
  assert server["response"]["status_code"] == 500 and server["response"]["body"]["error"]["type"] == "server_error"
  assert not openai_batch.is_result({"id": "x", "text": "hi"}) and not openai_batch.is_result(
      {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}})


def test_a_choice_whose_grammar_failed_makes_the_line_a_server_error(tokenizer):
  """finish_reason "grammar_error" (a matcher refused a token) has no API value: the line becomes a 500 error
  rather than a 200 whose content breaks its response_format."""
  line = _line("g", {"messages": [{"role": "user", "content": "Hi"}], "n": 2,
                     "response_format": {"type": "json_object"}})
  output = RequestOutput("g", 9, [_completion(tokenizer, "{}", 0), _completion(tokenizer, "{\"a", 1, "grammar_error")])
  out = openai_batch.result_line(line, output, model="m", tokenizer=tokenizer)
  envelope = _BatchOutputLine.model_validate(out)
  assert envelope.response.status_code == 500 and envelope.error.code == "grammar_error"
  assert envelope.error.message.startswith("choice 1: ")


# --- Through a real engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("openai_batch"))
  build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  return d, load_model(d), Tokenizer.from_directory(d)


def test_lines_through_the_engine(tiny):
  """A chat line (n=2, sampled, logprobs) and a completion line (token ids) served by the engine: the same
  outputs as requests built by hand, the prompt as transformers renders it, and lines openai's types accept."""
  d, model, tok = tiny
  messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku"}]
  chat = _line("chat-1", {"messages": messages, "max_tokens": 6, "temperature": 0.8, "top_p": 0.95, "n": 2,
                          "seed": 7, "logprobs": True})
  prompt_ids = np.random.default_rng(0).integers(0, 600, size=12).tolist()
  text = _line("text-1", {"prompt": [prompt_ids], "max_tokens": 5, "logprobs": 0}, url="/v1/completions")
  default = SamplingParams(max_tokens=32)
  engine = Engine(model, tok, eos_token_ids=(), max_seq_len=256, max_batch_size=2)
  served = engine.generate([openai_batch.to_request(line, default) for line in (chat, text)])
  by_hand = engine.generate([
      Request(messages=messages, sampling=SamplingParams(max_tokens=6, temperature=0.8, top_p=0.95, n=2, seed=7,
                                                         logprobs=True)),
      Request(prompt=prompt_ids, sampling=SamplingParams(max_tokens=5, logprobs=True))])
  for got, want in zip(served, by_hand):
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
  hf_ids = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(
      messages, add_generation_prompt=True, tokenize=True, return_dict=False)
  assert served[0].prompt_tokens == len(hf_ids) and served[1].prompt_tokens == len(prompt_ids)

  _, chat_body = _output(chat, output=served[0], tokenizer=tok)
  assert [c.message.content for c in chat_body.choices] == [c.text for c in served[0].outputs]
  assert [c.finish_reason for c in chat_body.choices] == ["length", "length"]
  assert chat_body.usage.completion_tokens == 12 and chat_body.usage.prompt_tokens == len(hf_ids)
  assert [len(c.logprobs.content) for c in chat_body.choices] == [6, 6]
  _, text_body = _output(text, output=served[1], tokenizer=tok)
  assert text_body.choices[0].text == served[1].text and len(text_body.choices[0].logprobs.tokens) == 5
  assert text_body.choices[0].logprobs.token_logprobs == served[1].outputs[0].logprobs


def test_a_tool_history_line_renders_as_transformers_renders_it(tiny):
  """An OpenAI-typed history (tool_calls with string arguments, tool messages with tool_call_id) through
  to_request and Engine.prepare: the prompt ids transformers makes from the same history with dict arguments."""
  d, model, tok = tiny
  args = [{"city": "Zürich"}, {}]
  messages = [
      {"role": "user", "content": "Weather in Zürich, and the time?"},
      {"role": "assistant", "content": None, "tool_calls": [
          {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args[0])}},
          {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "3 °C"},
      {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
  ]
  line = _line("hist", {"messages": messages, "tools": [WEATHER, CLOCK]})
  engine = Engine(model, tok, eos_token_ids=(), max_seq_len=1024)
  ids = engine.prepare(openai_batch.to_request(line, SamplingParams()))
  with_dicts = [*messages[:1], {"role": "assistant", "tool_calls": [
      {"type": "function", "function": {"name": "get_weather", "arguments": args[0]}},
      {"type": "function", "function": {"name": "now", "arguments": args[1]}}]}, *messages[2:]]
  want = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(
      with_dicts, tools=[WEATHER, CLOCK], add_generation_prompt=True, tokenize=True, return_dict=False)
  assert ids == list(want)


def test_chat_template_kwargs_reach_the_template_as_transformers_passes_them(tiny, tmp_path):
  """A template with a variable of its own (Qwen3's enable_thinking, say): a line's chat_template_kwargs render the
  prompt transformers renders with the same keyword; a reserved name or a non-object is that line's error."""
  d, model, _ = tiny
  template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
              "<think>\n\n</think>\n\n{% endif %}")
  save_tiny_tokenizer_dir(tmp_path, chat_template=template)
  engine = Engine(model, Tokenizer.from_directory(tmp_path), eos_token_ids=(), max_seq_len=256)
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
  messages = [{"role": "user", "content": "Hi"}]
  for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
    line = _line("t", {"messages": messages, "chat_template_kwargs": kwargs})
    ids = engine.prepare(openai_batch.to_request(line, SamplingParams()))
    assert ids == list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False, **kwargs))
  assert engine.prepare(openai_batch.to_request(_line("t", {"messages": messages, "chat_template_kwargs": {
      "enable_thinking": False}}), SamplingParams())) != engine.prepare(Request(messages=messages))
  with pytest.raises(InputError, match="chat_template_kwargs must be an object"):
    openai_batch.to_request(_line("t", {"messages": messages, "chat_template_kwargs": ["x"]}), SamplingParams())
  with pytest.raises(InputError, match="'messages'"):
    engine.prepare(openai_batch.to_request(_line("t", {"messages": messages, "chat_template_kwargs": {
        "messages": []}}), SamplingParams()))


def test_a_thinking_reply_becomes_reasoning_content_and_its_tool_calls_are_read_after_it(tokenizer):
  """With reasoning (a model whose template thinks): the block is message.reasoning_content (None without one or
  when it is empty, all of it when max_tokens cut it), the rest the content; tool calls after the block parse."""
  line = _line("think", {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
                         "n": 4})
  call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
  output = RequestOutput("think", 30, [
      _completion(tokenizer, f"<think>\nThe user wants Paris.\n</think>\n\n{call}", 0),
      _completion(tokenizer, "<think>\n\n</think>\n\nIt is sunny.", 1),
      _completion(tokenizer, "<think>\nHmm, Paris is", 2, "length"),
      _completion(tokenizer, "No block here.", 3),
  ])
  out, body = _output(line, output=output, tokenizer=tokenizer, reasoning=True)
  messages = [c["message"] for c in out["response"]["body"]["choices"]]
  assert [m["reasoning_content"] for m in messages] == ["The user wants Paris.", None, "Hmm, Paris is", None]
  assert [m["content"] for m in messages] == [None, "It is sunny.", None, "No block here."]
  assert body.choices[0].finish_reason == "tool_calls"
  assert json.loads(body.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
  assert [c.finish_reason for c in body.choices[1:]] == ["stop", "length", "stop"]
  raw, _ = _output(line, output=output, tokenizer=tokenizer)  # reasoning off: the text as generated
  assert "reasoning_content" not in raw["response"]["body"]["choices"][1]["message"]
  assert raw["response"]["body"]["choices"][1]["message"]["content"] == "<think>\n\n</think>\n\nIt is sunny."
