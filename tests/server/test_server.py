"""The OpenAI-compatible server over loopback, driven by the official `openai` client (sync and async) and, for what
that client cannot send (malformed JSON, an oversized body, a client that hangs up), by raw HTTP.

Greedy outputs are checked against transformers (and peft for an adapter, transformers' Qwen2.5-VL for an image);
the streamed deltas against the unstreamed response; log-probabilities against transformers' log-softmax.
"""

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jsonschema
import numpy as np
import openai
import peft
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qwenjax import SamplingParams
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.engine import Engine
from qwenjax.engine.requests import Completion, RequestOutput
from qwenjax.server.streaming import ResponseStream
from qwenjax.text.tokenizer import Tokenizer

from conftest import (
  REPO,
  Server,
  build_tiny_qwen2,
  hf_vl_chat_greedy,
  httpx,
  peft_greedy,
  random_peft,
  save_png,
  save_tiny_tokenizer_dir,
)
from conftest import (
  SERVER_KEY as KEY,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku about rain"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny Qwen2 whose vocabulary is the tiny tokenizer's (every generated token has text), a PEFT adapter "sql",
  the peft reference holding it, the HF tokenizer, and an engine serving both."""
  root = tmp_path_factory.mktemp("server")
  d = save_tiny_tokenizer_dir(root / "base")
  base = build_tiny_qwen2(d, vocab_size=512, num_key_value_heads=2, max_position_embeddings=1024)
  base = random_peft(base, root / "sql", 3, 4, 8, ["q_proj", "v_proj", "down_proj"])
  ref = peft.PeftModel.from_pretrained(base, root / "sql", adapter_name="sql").eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(d)
  engine = Engine(load_model(d), Tokenizer.from_directory(d), eos_token_ids=(), max_seq_len=1024, max_batch_size=4,
                  lora={"sql": root / "sql"})
  return d, ref, hf_tok, engine


@pytest.fixture(scope="module")
def server(tiny):
  with Server(tiny[3], api_key=KEY, default_sampling=SamplingParams(max_tokens=16),
              max_request_bytes=256 << 10) as s:
    s.im_end = tiny[2].convert_tokens_to_ids("<|im_end|>")
    yield s


_BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}


def _assert_answer(choice, hf_tok, want):
  """A chat choice (asked with logprobs) is transformers' tokens `want`: the same bytes token by token, and the
  text they decode to (less an incomplete character at the very end, which qwenjax's text leaves out)."""
  added = hf_tok.added_tokens_decoder
  pieces = hf_tok.convert_ids_to_tokens(want)
  assert [t.bytes for t in choice.logprobs.content] == [
      list(p.encode()) if i in added else [_BYTE_OF[c] for c in p] for i, p in zip(want, pieces)]
  assert choice.message.content == hf_tok.decode(want, skip_special_tokens=True).rstrip("\ufffd")


def _chat_ids(hf_tok, messages, **kw):
  return list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                         **kw))


def test_models_lists_the_base_model_and_each_adapter(server):
  models = server.client().models.list()
  assert [(m.id, m.owned_by) for m in models.data] == [("tiny", "qwenjax"), ("sql", "qwenjax")]
  assert models.data[1].model_extra["parent"] == "tiny"


def test_greedy_chat_and_completion_equal_transformers(tiny, server):
  """Chat (base model and adapter by name) and completion text: transformers' (peft's) greedy tokens, decoded."""
  d, ref, hf_tok, _ = tiny
  client = server.client()
  ids = _chat_ids(hf_tok, MESSAGES)
  chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
  want = peft_greedy(ref, None, ids, 12)
  assert chat.choices[0].message.content == hf_tok.decode(want, skip_special_tokens=True)
  assert chat.choices[0].finish_reason == "length" and chat.object == "chat.completion" and chat.model == "tiny"
  assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), 12)

  tuned = client.chat.completions.create(model="sql", messages=MESSAGES, max_completion_tokens=12, temperature=0,
                                         logprobs=True)
  tuned_want = peft_greedy(ref, "sql", ids, 12)
  assert tuned_want != want  # the adapter changes the answer: the comparison tells them apart
  _assert_answer(tuned.choices[0], hf_tok, tuned_want)
  assert tuned.model == "sql"

  prompt = "def fibonacci(n):\n"
  text = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
  prompt_ids = hf_tok(prompt)["input_ids"]
  assert text.choices[0].text == hf_tok.decode(peft_greedy(ref, None, prompt_ids, 10), skip_special_tokens=True)
  assert text.object == "text_completion" and text.usage.prompt_tokens == len(prompt_ids)


def test_concurrent_async_clients_share_batches_and_each_gets_its_own_answer(tiny, server):
  d, ref, hf_tok, engine = tiny
  prompts = [f"Question {i}: " + "why " * i for i in range(6)]
  peak = engine.stats()["peak_sequences"]

  async def ask(client, i):
    return await client.chat.completions.create(model="sql" if i % 3 == 0 else "tiny", max_tokens=10,
                                                messages=[{"role": "user", "content": prompts[i]}], logprobs=True)

  async def all_of_them():
    async with server.async_client() as client:
      return await asyncio.gather(*(ask(client, i) for i in range(6)))

  answers = asyncio.run(all_of_them())
  for i, answer in enumerate(answers):
    ids = _chat_ids(hf_tok, [{"role": "user", "content": prompts[i]}])
    want = peft_greedy(ref, "sql" if i % 3 == 0 else None, ids, 10)
    _assert_answer(answer.choices[0], hf_tok, want)
  assert engine.stats()["peak_sequences"] >= max(peak, 2)  # requests decoded side by side in one batch


def _collect_chat_stream(stream):
  """(chunks, per-choice content, tool calls, logprob tokens, finish reasons, usage) of a streamed chat."""
  chunks = list(stream)
  content, calls, tokens, finish, usage = {}, {}, {}, {}, None
  for chunk in chunks:
    assert chunk.object == "chat.completion.chunk"
    if chunk.usage is not None:
      assert not chunk.choices
      usage = chunk.usage
    for c in chunk.choices:
      assert c.index not in finish, "a chunk after the choice's finish_reason"
      if c.index not in content:
        assert c.delta.role == "assistant"  # the role comes first
      content[c.index] = content.get(c.index, "") + (c.delta.content or "")
      for call in c.delta.tool_calls or []:
        calls.setdefault(c.index, []).append(call)
      if c.logprobs is not None:
        tokens.setdefault(c.index, []).extend(c.logprobs.content)
      if c.finish_reason is not None:
        finish[c.index] = c.finish_reason
  return chunks, content, calls, tokens, finish, usage


def test_streamed_chat_adds_up_to_the_unstreamed_response(server):
  """n = 2 sampled with a seed, logprobs with alternatives: streamed content, logprobs and finish reasons per
  choice equal the unstreamed response's; usage comes last with include_usage."""
  client = server.client()
  kw = dict(model="tiny", messages=MESSAGES, max_tokens=14, temperature=0.9, top_p=0.95, n=2, seed=11,
            logprobs=True, top_logprobs=2, stop=["e r"])
  whole = client.chat.completions.create(**kw)
  chunks, content, _, tokens, finish, usage = _collect_chat_stream(
      client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
  assert len(chunks) > 4 and chunks[-1].usage is not None  # deltas, not the whole completion at once
  for choice in whole.choices:
    assert content[choice.index] == choice.message.content
    assert finish[choice.index] == choice.finish_reason
    assert [(t.token, t.logprob) for t in tokens[choice.index]] == [(t.token, t.logprob)
                                                                    for t in choice.logprobs.content]
    assert all(len(t.top_logprobs) == 2 for t in tokens[choice.index])
  assert whole.choices[0].message.content != whole.choices[1].message.content  # two samples, not one twice
  assert usage.model_dump() == whole.usage.model_dump()


def test_streamed_completion_adds_up_to_the_unstreamed_response(server):
  client = server.client()
  kw = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=2)
  whole = client.completions.create(**kw)
  chunks = list(client.completions.create(**kw, stream=True))
  assert len(chunks) > 2
  assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
  streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
  assert streamed == whole.choices[0].logprobs.token_logprobs
  assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


def test_logprobs_equal_transformers_log_softmax(tiny, server):
  d, ref, hf_tok, _ = tiny
  ids = _chat_ids(hf_tok, MESSAGES)
  chat = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3)
  generated = peft_greedy(ref, None, ids, 6)
  with torch.no_grad(), ref.disable_adapter():
    logits = ref(torch.tensor([ids + generated])).logits[0, len(ids) - 1:-1].double()
  want = torch.log_softmax(logits, -1).numpy()
  got = chat.choices[0].logprobs.content
  np.testing.assert_allclose([t.logprob for t in got], want[np.arange(6), generated], atol=1e-4)
  for t, row in zip(got, want):
    np.testing.assert_allclose([a.logprob for a in t.top_logprobs], np.sort(row)[::-1][:3], atol=1e-4)
    assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token


def test_tool_calls_required_named_and_streamed(server):
  """tool_choice "required" and a named function: the grammar makes the model call; the calls parse into
  message.tool_calls with arguments that satisfy the schema, and stream as tool-call deltas that add up to them."""
  client = server.client()
  ask = [{"role": "user", "content": "What is the weather in Paris?"}]
  for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
    kw = dict(model="tiny", messages=ask, tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=120, temperature=0,
              extra_body={"stop_token_ids": [server.im_end]})  # the engine here stops at no token by itself
    whole = client.chat.completions.create(**kw)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.tool_calls, message
    for call in message.tool_calls:
      assert call.type == "function" and call.id.startswith("call_")
      tool = {"get_weather": WEATHER, "now": CLOCK}[call.function.name]
      jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    if isinstance(choice, dict):
      assert {c.function.name for c in message.tool_calls} == {"get_weather"}
    _, content, calls, _, finish, _ = _collect_chat_stream(client.chat.completions.create(**kw, stream=True))
    assert finish[0] == "tool_calls"
    assert [(c.index, c.function.name, c.function.arguments) for c in calls[0]] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(message.tool_calls)]
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls[0])
    assert (content[0] or None) == message.content


def test_tool_call_deltas_from_a_hand_written_reply():
  """ResponseStream fed a reply character by character (what an auto tool_choice may get): content before the
  block streams as it comes, the call goes out whole once its block closes, trailing whitespace waits and is
  dropped, the finish reason becomes tool_calls; the deltas add up to what the unstreamed response says."""
  reply = ("  Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
           "</tool_call>\n<tool_call>\n{\"name\": \"now\"}\n</tool_call>\n")
  body = {"messages": MESSAGES, "tools": [WEATHER, CLOCK]}
  stream = ResponseStream("/v1/chat/completions", body, "chatcmpl-x", model="tiny", tokenizer=None, created=0)
  deltas = []
  for i in range(1, len(reply) + 1):
    done = i == len(reply)
    out = RequestOutput("r", 5, [Completion(reply[:i], list(range(i)), "stop" if done else None)], finished=done)
    deltas += [chunk["choices"][0] for chunk in stream.update(out)]
  assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
  content = [d["delta"]["content"] for d in deltas if d["delta"].get("content")]
  assert "".join(content) == "Let me check."
  calls = [c for d in deltas for c in d["delta"].get("tool_calls", [])]
  assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
      (0, "get_weather", '{"city": "Paris"}'), (1, "now", "{}")]
  first_call = next(i for i, d in enumerate(deltas) if d["delta"].get("tool_calls"))
  assert reply.index("</tool_call>") < len("".join(content)) + 100  # sanity: the call came before the end
  assert first_call < len(deltas) - 1  # sent when its block closed, not held to the end
  assert deltas[-1]["finish_reason"] == "tool_calls" and all(d["finish_reason"] is None for d in deltas[:-1])
  assert len({c["id"] for c in calls}) == 2


def test_a_json_schema_response_validates(server):
  schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                             "count": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["color", "count"], "additionalProperties": False}
  for stream in (False, True):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "A color and a count, as JSON."}], max_tokens=40,
              response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    if stream:
      text = "".join(c.choices[0].delta.content or "" for c in server.client().chat.completions.create(
          **kw, stream=True) if c.choices)
    else:
      text = server.client().chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(text), schema)


def test_an_image_request_on_the_tiny_vl_model(tiny_vl_chat, tmp_path):
  from PIL import Image

  d, hf = tiny_vl_chat
  png = save_png(tmp_path / "a.png", 56, 84, 0)
  url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
  messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": "Describe this."}]}]
  engine = Engine.load(str(d), max_batch_size=2, max_seq_len=256, page_size=16, media_root=tmp_path)
  with Server(engine) as s:
    reply = s.client().chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError) as broken:
      s.client().chat.completions.create(model="tiny", max_tokens=8, messages=[{"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}])
  hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]}]
  prompt_len, want = hf_vl_chat_greedy(d, hf, hf_messages, [Image.open(png)], 8)
  assert reply.usage.prompt_tokens == prompt_len
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  assert reply.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
  assert "messages[0].content[0].image_url" in broken.value.body["message"]


def _post(server, path, content, headers=None):
  headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
  return httpx.post(server.url + path, content=content, headers=headers, timeout=30)


def _error(response, status):
  assert response.status_code == status, response.text
  body = response.json()
  assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
  assert "Traceback" not in response.text and "\n" not in body["error"]["message"]
  return body["error"]


def test_errors_are_openai_shaped_and_the_server_goes_on(server):
  client = server.client()
  with pytest.raises(openai.AuthenticationError) as wrong:
    server.client(api_key="sk-wrong").models.list()
  assert wrong.value.status_code == 401 and wrong.value.body["code"] == "invalid_api_key"
  assert httpx.get(server.url + "/v1/models").status_code == 401  # no key at all
  assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # /health needs none

  chat = "/v1/chat/completions"
  assert _error(_post(server, chat, b'{"model": "tiny", "messages": [}'), 400)["code"] == "invalid_json"
  assert _error(_post(server, chat, b"\xff\xfe"), 400)["code"] == "invalid_json"
  assert _error(_post(server, chat, b"[1, 2]"), 400)["code"] == "invalid_json"
  error = _error(_post(server, chat, json.dumps({"messages": MESSAGES, "temperature": "hot"})), 400)
  assert error["param"] == "temperature" and "temperature" in error["message"]
  assert _error(_post(server, chat, json.dumps({"messages": MESSAGES, "frobnicate": 1})), 400)["param"] == "frobnicate"
  error = _error(_post(server, chat, json.dumps({"model": "gpt-9", "messages": MESSAGES})), 400)
  assert error["code"] == "model_not_found" and error["param"] == "model"
  error = _error(_post(server, "/v1/completions", json.dumps({"prompt": "rain " * 2000})), 400)
  assert error["code"] == "context_length_exceeded"
  bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
  error = _error(_post(server, chat, json.dumps({"messages": MESSAGES, "response_format": bad_schema})), 400)
  assert "schema" in error["message"]
  with pytest.raises(openai.BadRequestError) as too_many:
    client.chat.completions.create(model="tiny", messages=MESSAGES, top_logprobs=3)  # needs logprobs: true
  assert too_many.value.body["param"] == "top_logprobs"
  big = json.dumps({"messages": [{"role": "user", "content": "x" * (300 << 10)}]})
  assert _error(_post(server, chat, big), 413)["code"] == "request_too_large"
  assert _error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
  # After all of that, the next request is served as ever.
  assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).usage.completion_tokens == 3


def test_a_client_that_hangs_up_mid_stream_has_its_request_aborted(tiny, server):
  """Its request stops decoding between decode blocks: running requests and pages in use go back to 0 after at most
  8 blocks' tokens of the 230 asked for (counted in tokens: CI's other worker shares the cores), the abort is
  counted, and the next request is served normally."""
  before, hung_up, after = server.hang_up_at_first_text({"model": "tiny", "messages": MESSAGES, "max_tokens": 230,
                                                         "ignore_eos": True})
  grown = after["qwenjax_generation_tokens_total"] - hung_up["qwenjax_generation_tokens_total"]
  assert grown <= 8 * server.engine.decode_steps, grown
  assert after["qwenjax_requests_aborted_total"] == before.get("qwenjax_requests_aborted_total", 0) + 1
  assert after["qwenjax_kv_pages_total"] > 0
  reply = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
  assert reply.usage.completion_tokens == 4


def test_metrics_count_tokens_and_latencies(server):
  before = server.metrics()
  reply = server.client().completions.create(model="tiny", prompt="One two three", max_tokens=5)
  after = server.metrics()
  assert after["qwenjax_prompt_tokens_total"] - before.get("qwenjax_prompt_tokens_total", 0) == (
      reply.usage.prompt_tokens)
  assert after["qwenjax_generation_tokens_total"] - before.get("qwenjax_generation_tokens_total", 0) == 5
  for name in ("qwenjax_time_to_first_token_seconds_count", "qwenjax_e2e_request_latency_seconds_count"):
    assert after[name] == before.get(name, 0) + 1
  assert after['qwenjax_requests_total{endpoint="completions",status="200"}'] >= 1


def test_past_the_concurrency_limit_429_and_past_the_timeout_408(tiny):
  d = tiny[0]
  engine = Engine(load_model(d), Tokenizer.from_directory(d), eos_token_ids=(), max_seq_len=1024, max_batch_size=4)
  engine.generate([{"messages": MESSAGES}], SamplingParams(max_tokens=8))  # compiled before anything is timed
  body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 900, "stream": True}
  with Server(engine, max_concurrent_requests=1) as s:
    # A request whose body is still on its way is in flight: it holds the one place, however fast the model is.
    with socket.create_connection(("127.0.0.1", s.port)) as slow:
      slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 100\r\n\r\n{\"messages\": ")
      deadline = time.monotonic() + 10
      while True:
        try:
          s.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        except openai.RateLimitError as e:
          limited = e
          break
        assert time.monotonic() < deadline, "the half-sent request never counted"
        time.sleep(0.01)
      assert limited.response.headers["retry-after"] == "1" and limited.body["type"] == "rate_limit_error"
    assert s.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices  # its place freed
  with Server(engine, request_timeout=0.05) as s:
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as late:
      events = [line for line in late.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1][6:])["error"]["code"] == "request_timeout"  # 900 tokens take longer
    with pytest.raises(openai.APIStatusError) as late:
      s.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=900)
    assert late.value.status_code == 408 and late.value.body["code"] == "request_timeout"
    assert s.metrics()["qwenjax_requests_running"] == 0


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_sigterm_finishes_running_requests_and_exits_0(tiny, tmp_path):
  """launch.serve as users run it (with batch_generate's speculative flags): the key from $QWENJAX_API_KEY; on
  SIGTERM a running stream still ends with [DONE], new connections are refused, the process exits 0, and the empty
  private media directory it made (no --media_root) is gone."""
  d = tiny[0]
  port = _free_port()
  env = dict(os.environ, QWENJAX_API_KEY=KEY, TMPDIR=str(tmp_path))
  proc = subprocess.Popen([sys.executable, "-m", "launch.serve", f"--model={d}", f"--port={port}", "--nowarm_up",
                           "--max_seq_len=256", "--max_batch_size=2", "--shutdown_grace=60",
                           "--speculative_method=ngram", "--prompt_lookup_min=1"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None, proc.stdout.read()
      assert time.monotonic() < deadline, "the server did not come up"
      with contextlib.suppress(httpx.TransportError):
        if httpx.get(url + "/health").status_code == 200:
          break
      time.sleep(0.2)
    assert httpx.get(url + "/v1/models").status_code == 401
    assert len(list(tmp_path.glob("qwenjax-serve-no-media-*"))) == 1
    body = {"model": d.name, "messages": MESSAGES, "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
      lines = response.iter_lines()
      first = next(lines)
      proc.send_signal(signal.SIGTERM)
      rest = [line for line in lines if line]
    chunks = [json.loads(line[6:]) for line in [first, *rest] if line.startswith("data: {")]
    assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert proc.wait(60) == 0
    assert not list(tmp_path.glob("qwenjax-serve-no-media-*"))
    with pytest.raises(httpx.TransportError):
      httpx.get(url + "/health")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_a_thinking_model_answers_with_reasoning_content_streamed_or_not(tiny, tmp_path, qwen_template):
  """A model whose chat template thinks (Qwen3's switch added to the tiny template), made to write a thinking
  block by a regex: the block is message.reasoning_content and the rest the content, streamed as
  reasoning_content deltas then content deltas that add up to the same; enable_thinking: false renders the empty
  block into the prompt, as transformers does."""
  switch = ("{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking "
            "is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif "
            "%}\n{%- endif %}")
  template = qwen_template.replace("{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
                                   "{%- endif %}", switch)
  assert template != qwen_template
  d = save_tiny_tokenizer_dir(tmp_path / "thinking", chat_template=template)
  build_tiny_qwen2(d, vocab_size=512, num_key_value_heads=2, max_position_embeddings=1024)
  engine = Engine(load_model(d), Tokenizer.from_directory(d), eos_token_ids=(), max_seq_len=1024, max_batch_size=2)
  fmt = {"type": "regex", "regex": "<think>\n[a-z]{2,8}\n</think>\n\n[a-z]{2,8}"}
  kw = dict(model="tiny", messages=MESSAGES, max_tokens=40, extra_body={"response_format": fmt,
                                                                        "stop_token_ids": [tiny[2].eos_token_id]})
  with Server(engine) as s:
    whole = s.client().chat.completions.create(**kw).choices[0].message
    chunks = [c for c in s.client().chat.completions.create(**kw, stream=True) if c.choices]
    plain = s.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                               extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    default = s.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
  thought = whole.model_extra["reasoning_content"]
  assert thought and thought.isalpha() and whole.content.isalpha(), whole
  deltas = [c.choices[0].delta for c in chunks]
  assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == thought
  assert "".join(d.content or "" for d in deltas) == whole.content
  first_content = next(i for i, d in enumerate(deltas) if d.content)
  assert all(not d.model_extra.get("reasoning_content") for d in deltas[first_content:])  # reasoning comes first
  hf = transformers.AutoTokenizer.from_pretrained(d)
  off = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=False, return_dict=False)
  assert plain.usage.prompt_tokens == len(off) > default.usage.prompt_tokens
