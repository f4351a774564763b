"""OpenAI Batch files: their input lines as Requests, RequestOutputs as their output lines.

    if openai_batch.is_batch_line(obj):
      request = openai_batch.to_request(obj, default)  # InputError naming the field at fault
      ...
      line = openai_batch.result_line(obj, output, model="Qwen2.5-7B-Instruct", tokenizer=engine.tokenizer)
    line = openai_batch.error_line("request-7", "invalid_request", "body.temperature must be ...")

Input line: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"} (and our
"metadata", copied to the output line untouched). Output line: {"id": "batch_req_…", "custom_id", "response":
{"status_code": 200, "request_id", "body": a chat.completion or text_completion object}, "error": null}, or for a
line that cannot be served a non-200 status, an error body {"error": {"message", "type", "param", "code"}} as the
API returns it, and "error": {"code", "message"}. Ids derive from the custom_id, so a rerun writes the same ids.

Body fields, with null meaning unset as OpenAI clients send it:
- chat: messages ("developer" is rendered as "system"), tools (functions), tool_choice ("none" | "auto" |
  "required" | {"type": "function", "function": {"name"}}), parallel_tool_calls (true only), response_format
  (text, json_object, json_schema, and ours: {"type": "regex", "regex"}, {"type": "grammar", "grammar": <Lark>}),
  max_tokens / max_completion_tokens, logprobs (bool), top_logprobs (0 to 20, with logprobs true),
  chat_template_kwargs (variables for the chat template, e.g. {"enable_thinking": false}).
- completions: prompt (a string, token ids, or a list holding one of those), logprobs (0 to 5: the chosen
  tokens' and that many alternatives), echo (false), best_of (1), suffix (unset), response_format as above.
- both: temperature, top_p, n, stop, seed, presence_penalty, frequency_penalty, vLLM's top_k, min_p,
  repetition_penalty, stop_token_ids, ignore_eos; model, user, metadata, store, service_tier, ... are accepted
  and ignored; stream must be false in a batch line (`body_request(..., online=True)`, the server's, honours
  stream and stream_options). Anything else is an InputError naming the field.

Logprobs: each chosen token's log-probability and, when asked, its position's most likely tokens, all under the
model's raw distribution (before temperature, filters and constraints), as the API reports them.

Tool calls: with tools (and tool_choice other than "none"), each choice's text is parsed by
`qwenjax.text.tool_calls`: the calls become message.tool_calls (finish_reason "tool_calls" when generation
stopped by itself), the text outside them the content (null if empty). A malformed block stays in the content as
the model wrote it, and the choice lists what is wrong with it under "tool_call_errors" (an extra field).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Collection, Mapping
from typing import Any

from qwenjax._errors import InputError
from qwenjax.engine.constraints import GRAMMAR_ERROR
from qwenjax.engine.requests import Completion, Request, RequestOutput
from qwenjax.engine.sampling_params import SamplingParams
from qwenjax.text import reasoning as reasoning_lib
from qwenjax.text import tool_calls as tool_calls_lib

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
_LINE_KEYS = ("custom_id", "method", "url", "body", "metadata")

# Body fields that map onto SamplingParams under the same name (OpenAI's, then vLLM's extra ones).
_SAMPLING = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
             "repetition_penalty", "stop_token_ids", "ignore_eos")
# Accepted and ignored: they change nothing in what is generated.
_IGNORED = frozenset({"model", "user", "metadata", "store", "service_tier", "prompt_cache_key",
                      "prompt_cache_retention", "safety_identifier", "stream_options"})
# Accepted only with these values (what the engine does anyway), with why anything else is not.
_ONLY = {
    "stream": (False, "results are written whole"),
    "parallel_tool_calls": (True, "the number of calls is not limited"),
    "echo": (False, "the prompt is not repeated"),
    "best_of": (1, "each of the n samples is returned"),
    "logit_bias": ({}, "logit biases are not supported"),
    "modalities": (["text"], "the output is text"),
}
# What an HTTP server honours itself (streaming) and a batch line must leave unset or false.
_ONLINE = frozenset({"stream", "stream_options"})
_CHAT_FIELDS = frozenset({"messages", "tools", "tool_choice", "response_format", "max_tokens", "max_completion_tokens",
                          "logprobs", "top_logprobs", "stream", "parallel_tool_calls", "logit_bias", "modalities",
                          "chat_template_kwargs", *_SAMPLING, *_IGNORED})
_COMPLETION_FIELDS = frozenset({"prompt", "response_format", "max_tokens", "logprobs", "stream", "echo", "best_of",
                                "suffix", "logit_bias", *_SAMPLING, *_IGNORED})
_RESPONSE_FORMATS = {"text": (), "json_object": (), "json_schema": ("json_schema",), "regex": ("regex",),
                     "grammar": ("grammar",)}


# --- Input lines ---------------------------------------------------------------------------------------------


def is_batch_line(obj: Any) -> bool:
  """Whether a parsed input line is in the OpenAI Batch format (it has a custom_id)."""
  return isinstance(obj, dict) and "custom_id" in obj


def to_request(obj: Mapping[str, Any], default: SamplingParams, adapters: Collection[str] = ()) -> Request:
  """The Request of an OpenAI Batch input line; its sampling is `default` updated with the body's fields, its id
  the custom_id; a body.model that names one of the engine's LoRA `adapters` selects it (as the OpenAI API serves
  fine-tuned models by name; any other model name: the base model). InputError, naming the field, for anything
  malformed or unsupported."""
  custom_id = _custom_id(obj)
  unknown = sorted(set(obj) - set(_LINE_KEYS))
  if unknown:
    raise InputError(f"unknown batch line field {unknown[0]!r} (expected {', '.join(_LINE_KEYS)}).")
  if obj.get("method") != "POST":
    raise InputError(f"method must be \"POST\", got {obj.get('method')!r}.")
  url = obj.get("url")
  if url not in (CHAT_URL, COMPLETIONS_URL):
    raise InputError(f"url {url!r} is not supported (expected {CHAT_URL} or {COMPLETIONS_URL}).")
  if not isinstance(obj.get("body"), dict):
    raise InputError(f"body must be an object with the {'chat ' if url == CHAT_URL else ''}completion request.")
  return body_request(url, obj["body"], default, adapters, request_id=custom_id)


def body_request(url: str, body: Mapping[str, Any], default: SamplingParams, adapters: Collection[str] = (), *,
                 request_id: Any = None, online: bool = False) -> Request:
  """The Request of one /v1/chat/completions or /v1/completions body (a batch line's, or an HTTP request's with
  `online`: "stream" and "stream_options" are then the caller's to honour). InputError naming the field."""
  chat = url == CHAT_URL
  body = {k: v for k, v in body.items() if v is not None}
  fields = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
  for key, value in body.items():
    if key not in fields:
      raise InputError(f"body.{key} is not a {url} parameter that qwenjax supports.")
    if online and key in _ONLINE:
      continue
    if key in _ONLY and (type(value) is not type(_ONLY[key][0]) or value != _ONLY[key][0]):  # 0 is not false
      allowed, why = _ONLY[key]
      raise InputError(f"body.{key} must be {_json_repr(allowed)} ({why}), got {_json_repr(value)}.")
  if "suffix" in body:
    raise InputError("body.suffix is not supported (no fill-in-the-middle through /v1/completions).")
  if online and not isinstance(body.get("stream", False), bool):
    raise InputError(f"body.stream must be true or false, got {_json_repr(body['stream'])}.")
  if online and "stream_options" in body:
    options = body["stream_options"]
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"} or not all(
        isinstance(v, bool) for v in options.values()):
      raise InputError("body.stream_options must be {\"include_usage\": true | false}.")
    if not body.get("stream"):
      raise InputError("body.stream_options needs body.stream: true.")

  sampling = {name: body[name] for name in _SAMPLING if name in body}
  limits = [body[k] for k in ("max_tokens", "max_completion_tokens") if k in body]
  if len(limits) == 2 and limits[0] != limits[1]:
    raise InputError("body.max_tokens and body.max_completion_tokens disagree; give one of them.")
  if limits:
    sampling["max_tokens"] = limits[0]
  logprobs, top = _chat_logprobs(body) if chat else _completion_logprobs(body)
  if logprobs is not None:  # unset: the default's
    sampling["logprobs"] = logprobs
    sampling["top_logprobs"] = top
  try:
    params = SamplingParams.from_dict(sampling, base=default)
  except InputError as e:
    problem = str(e)
    if problem.startswith("max_tokens") and "max_tokens" not in body:  # it came as max_completion_tokens
      problem = "max_completion_tokens" + problem.removeprefix("max_tokens")
    raise InputError(f"body.{problem}") from None

  response_format = _response_format(body.get("response_format"))
  lora = body.get("model") if isinstance(body.get("model"), str) and body.get("model") in adapters else None
  if chat:
    tools = _tools(body.get("tools"))
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
      raise InputError(f"body.chat_template_kwargs must be an object, got {_json_repr(kwargs)}.")
    return Request(messages=_messages(body.get("messages")), tools=tools, sampling=params, id=request_id,
                   response_format=response_format, tool_choice=_tool_choice(body.get("tool_choice"), tools),
                   lora=lora, chat_template_kwargs=kwargs)
  return Request(prompt=_prompt(body.get("prompt")), sampling=params, id=request_id,
                 response_format=response_format, lora=lora)


def _custom_id(obj: Mapping[str, Any]) -> str:
  custom_id = obj.get("custom_id")
  if not isinstance(custom_id, str) or not custom_id:
    raise InputError(f"custom_id must be a non-empty string, got {_json_repr(custom_id)}.")
  return custom_id


def _json_repr(value: Any) -> str:
  """A value as JSON spells it (true, null, "text"), for messages about JSON fields."""
  try:
    return json.dumps(value, ensure_ascii=False)
  except (TypeError, ValueError):
    return repr(value)


def _chat_logprobs(body: Mapping[str, Any]) -> tuple[bool | None, int]:
  """(logprobs, top_logprobs) of a chat body: top_logprobs in [0, 20] needs logprobs true, as the API says."""
  logprobs, top = body.get("logprobs"), body.get("top_logprobs", 0)
  if logprobs is not None and not isinstance(logprobs, bool):
    raise InputError(f"body.logprobs must be true or false, got {_json_repr(logprobs)}.")
  if not (isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= 20):
    raise InputError(f"body.top_logprobs must be an integer in [0, 20], got {_json_repr(top)}.")
  if top > 0 and not logprobs:
    raise InputError("body.top_logprobs needs body.logprobs: true.")
  return logprobs, top


def _completion_logprobs(body: Mapping[str, Any]) -> tuple[bool | None, int]:
  """(logprobs, top_logprobs) of a completions body, whose logprobs is the number of alternatives, 0 to 5."""
  if "logprobs" not in body:
    return None, 0
  logprobs = body["logprobs"]
  if not (isinstance(logprobs, int) and not isinstance(logprobs, bool) and 0 <= logprobs <= 5):
    raise InputError(f"body.logprobs must be an integer in [0, 5], got {_json_repr(logprobs)}.")
  return True, logprobs


def _messages(messages: Any) -> list[dict[str, Any]]:
  """The chat messages, "developer" turned into "system" (Qwen's template knows no developer role). The rest is
  checked where the engine renders them (`requests.checked_message`, the chat template)."""
  if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
    raise InputError("body.messages must be a non-empty list of {\"role\", \"content\"} objects.")
  return [dict(m, role="system") if m.get("role") == "developer" else m for m in messages]


def _prompt(prompt: Any) -> str | list[int]:
  """/v1/completions' prompt: one string or one list of token ids (also wrapped in a list of one)."""
  def token_ids(x):
    return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

  if isinstance(prompt, str) or token_ids(prompt):
    return prompt
  if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or token_ids(prompt[0])):
    return prompt[0]
  if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) or token_ids(p) for p in prompt):
    raise InputError(f"body.prompt holds {len(prompt)} prompts; a batch line takes one (give each its own line).")
  raise InputError("body.prompt must be a string or a list of token ids.")


def _tools(tools: Any) -> list[dict[str, Any]] | None:
  """Function tools, as the chat template takes them."""
  if tools is None:
    return None
  if not isinstance(tools, list):
    raise InputError("body.tools must be a list of {\"type\": \"function\", \"function\": {...}} objects.")
  for i, tool in enumerate(tools):
    where = f"body.tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
      kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
      raise InputError(f"{where} must be a function tool ({{\"type\": \"function\", ...}}), got {kind!r}.")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
      raise InputError(f"{where}.function needs a 'name' (a non-empty string).")
    if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
      raise InputError(f"{where}.function.parameters must be a JSON schema object.")
  return tools or None


def _tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any] | None:
  if choice is None or choice in ("none", "auto"):
    return choice
  if choice == "required" or isinstance(choice, dict):
    if not tools:
      raise InputError(f"body.tool_choice {_json_repr(choice)} needs body.tools.")
    if choice == "required":
      return choice
    name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
      raise InputError("body.tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                       "\"function\": {\"name\": ...}}.")
    names = [t["function"]["name"] for t in tools]
    if name not in names:
      raise InputError(f"body.tool_choice names {name!r}, which is not among body.tools ({', '.join(names)}).")
    return choice
  raise InputError(f"body.tool_choice must be \"none\", \"auto\", \"required\" or a named function, got "
                   f"{_json_repr(choice)}.")


def _response_format(fmt: Any) -> dict[str, Any] | None:
  """response_format, checked for shape; the grammar behind it is compiled by the engine."""
  if fmt is None:
    return None
  kind = fmt.get("type") if isinstance(fmt, dict) else None
  if not isinstance(kind, str) or kind not in _RESPONSE_FORMATS:
    raise InputError(f"body.response_format.type must be one of {', '.join(_RESPONSE_FORMATS)}, got "
                     f"{_json_repr(kind)}.")
  for key in _RESPONSE_FORMATS[kind]:
    if key not in fmt:
      raise InputError(f"body.response_format of type {kind} needs '{key}'.")
  if kind == "json_schema":
    spec = fmt["json_schema"]
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
      raise InputError("body.response_format.json_schema needs 'schema', a JSON schema object.")
    if spec.get("name") is not None and not isinstance(spec["name"], str):
      raise InputError("body.response_format.json_schema.name must be a string.")
  if kind in ("regex", "grammar") and not (isinstance(fmt[kind], str) and fmt[kind]):
    raise InputError(f"body.response_format.{kind} must be a non-empty string.")
  return fmt


# --- Output lines --------------------------------------------------------------------------------------------


def _digest(custom_id: Any) -> str:
  return hashlib.sha256(str(custom_id).encode()).hexdigest()[:24]


def grammar_failure(output: RequestOutput) -> str | None:
  """Why a served request is not an answer, if one of its samples ended with finish_reason "grammar_error" (its
  constraint's matcher failed mid-decode, at a resource limit: the output would not conform); else None. Both
  formats record such a line as an error, code "grammar_error"."""
  broken = [c for c in output.outputs if c.finish_reason == GRAMMAR_ERROR]
  if not broken:
    return None
  reason = f" ({broken[0].error})" if broken[0].error else ""
  return (f"choice {broken[0].index}: the grammar of its response_format / tool_choice failed while decoding"
          f"{reason}; the output would not conform.")


def result_line(obj: Mapping[str, Any], output: RequestOutput, *, model: str, tokenizer,
                created: int | None = None, reasoning: bool = False) -> dict[str, Any]:
  """The output line of input line `obj` (already accepted by `to_request`) served as `output`.

  tokenizer: the engine's, for the token strings of logprobs (None: token ids stand in for them).
  created: the body's Unix time (default: now).
  reasoning: split each chat choice's thinking block into message.reasoning_content (`response_body`).
  """
  custom_id, digest = obj["custom_id"], _digest(obj["custom_id"])
  broken = grammar_failure(output)
  if broken is not None:  # no API finish_reason says "the constraint failed"; the line is a server error
    return error_line(custom_id, GRAMMAR_ERROR, broken, 500)
  chat = obj.get("url") == CHAT_URL
  response = response_body(obj["url"], obj.get("body", {}), output, model=model, tokenizer=tokenizer,
                           response_id=f"{'chatcmpl' if chat else 'cmpl'}-{digest}", created=created,
                           call_key=custom_id, reasoning=reasoning)
  line = {"id": f"batch_req_{digest}", "custom_id": custom_id,
          "response": {"status_code": 200, "request_id": f"req_{digest}", "body": response}, "error": None}
  if "metadata" in obj:
    line["metadata"] = obj["metadata"]
  return line


def parses_tools(url: str, body: Mapping[str, Any]) -> bool:
  """Whether a body's choices are read for tool calls: a chat body with tools and tool_choice other than none."""
  return url == CHAT_URL and bool(body.get("tools")) and body.get("tool_choice") != "none"


def usage(output: RequestOutput) -> dict[str, Any]:
  """A response's usage: prompt, completion (all n choices) and total tokens, and the prompt's cached tokens."""
  completion_tokens = sum(len(c.token_ids) for c in output.outputs)
  return {"prompt_tokens": output.prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": output.prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": output.cached_tokens}}


def response_body(url: str, body: Mapping[str, Any], output: RequestOutput, *, model: str, tokenizer,
                  response_id: str, created: int | None = None, call_key: Any = None, reasoning: bool = False,
                  opened: bool = False) -> dict[str, Any]:
  """The chat.completion or text_completion object answering `body` (posted to `url`) with `output`.
  call_key: what tool call ids derive from (with the choice's index); None: fresh random ids.
  reasoning: a chat choice's thinking block becomes message.reasoning_content (`qwenjax.text.reasoning`; None
  without one) and the rest its content, from which tool calls are read; opened: the prompt opened the block."""
  body = {k: v for k, v in body.items() if v is not None}
  chat = url == CHAT_URL
  if chat:
    parse_tools = parses_tools(url, body)
    choices = [_chat_choice(c, tokenizer, parse_tools, None if call_key is None else f"{call_key}\0{c.index}",
                            reasoning, opened) for c in output.outputs]
  else:
    choices = [_text_choice(c, tokenizer) for c in output.outputs]
  return {"id": response_id, "object": "chat.completion" if chat else "text_completion",
          "created": int(time.time()) if created is None else created, "model": model, "choices": choices,
          "usage": usage(output)}


def error_line(custom_id: Any, code: str, message: str, status_code: int = 400, *,
               obj: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The output line of a request that cannot be served: the API's error body under a non-200 status, and the
  same code and message under "error". obj: the input line if it parsed, whose "metadata" is copied."""
  digest = _digest(custom_id)
  kind = "invalid_request_error" if status_code < 500 else "server_error"
  error_body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
  line = {"id": f"batch_req_{digest}", "custom_id": custom_id,
          "response": {"status_code": status_code, "request_id": f"req_{digest}", "body": error_body},
          "error": {"code": code, "message": message}}
  if obj is not None and "metadata" in obj:
    line["metadata"] = obj["metadata"]
  return line


def is_result(obj: Any) -> bool:
  """Whether a parsed output line is an OpenAI Batch output line (from `result_line` or `error_line`)."""
  return (isinstance(obj, dict) and isinstance(obj.get("id"), str) and obj["id"].startswith("batch_req_")
          and "custom_id" in obj and "response" in obj and "error" in obj)


def result_key(obj: Mapping[str, Any]) -> Any:
  """The custom_id an output line answers."""
  return obj["custom_id"]


def _chat_choice(c: Completion, tokenizer, parse_tools: bool, key: str | None, reasoning: bool = False,
                 opened: bool = False) -> dict[str, Any]:
  text = c.text
  message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
  if reasoning:
    message["reasoning_content"], text = reasoning_lib.split(text, opened)
    message["content"] = text
  choice: dict[str, Any] = {"index": c.index, "message": message, "logprobs": None, "finish_reason": c.finish_reason}
  if parse_tools:
    parsed = tool_calls_lib.parse(text, key=key)
    message["content"] = parsed.content
    if parsed.calls:
      message["tool_calls"] = parsed.calls
      if c.finish_reason == "stop":  # a call cut by max_tokens stays "length"
        choice["finish_reason"] = "tool_calls"
    if parsed.errors:
      choice["tool_call_errors"] = parsed.errors
  if c.logprobs is not None:
    choice["logprobs"] = {"content": chat_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs),
                          "refusal": None}
  return choice


def chat_logprobs(tokenizer, ids: list[int], logprobs: list[float],
                  top_logprobs: list[list[tuple[int, float]]] | None) -> list[dict[str, Any]]:
  """A chat choice's logprobs.content for these tokens: each one's text, bytes, log-probability and alternatives."""
  tops = top_logprobs or [[] for _ in ids]
  content = []
  for (text, raw), lp, top in zip(_token_texts(tokenizer, ids), logprobs, tops):
    alternatives = [{"token": t, "bytes": b, "logprob": v}
                    for (t, b), (_, v) in zip(_token_texts(tokenizer, [i for i, _ in top]), top)]
    content.append({"token": text, "bytes": raw, "logprob": lp, "top_logprobs": alternatives})
  return content


def _text_choice(c: Completion, tokenizer) -> dict[str, Any]:
  logprobs = None
  if c.logprobs is not None:
    logprobs = text_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs, _text_offsets(tokenizer, c))
  return {"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}


def text_logprobs(tokenizer, ids: list[int], logprobs: list[float], top_logprobs: list[list[tuple[int, float]]] | None,
                  offsets: list[int]) -> dict[str, Any]:
  """A completion choice's logprobs for these tokens (the legacy format), each beginning at its text offset."""
  top = None
  if top_logprobs is not None:  # {token text: logprob} per position
    top = [{t: v for (t, _), (_, v) in zip(_token_texts(tokenizer, [i for i, _ in pairs]), pairs)}
           for pairs in top_logprobs]
  return {"tokens": [text for text, _ in _token_texts(tokenizer, ids)], "token_logprobs": list(logprobs),
          "text_offset": offsets, "top_logprobs": top}


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet (the characters byte-level BPE spells bytes with) -> byte values."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def _token_texts(tokenizer, ids: list[int]) -> list[tuple[str, list[int] | None]]:
  """(text, UTF-8 bytes) of each token: the bytes exactly, the text with U+FFFD where a token holds part of a
  character. Added tokens (<|im_end|>, <tool_call>) are their own text."""
  if tokenizer is None:
    return [(f"token_id:{i}", None) for i in ids]
  backend = tokenizer.backend
  added = backend.get_added_tokens_decoder()
  byte_of = _byte_decoder()
  out = []
  for i in ids:
    piece = backend.id_to_token(int(i))
    if piece is None:
      out.append((f"token_id:{i}", None))
      continue
    if int(i) not in added and all(ch in byte_of for ch in piece):
      raw = bytes(byte_of[ch] for ch in piece)
    else:
      raw = (piece if int(i) in added else tokenizer.decode([int(i)])).encode("utf-8")
    out.append((raw.decode("utf-8", errors="replace"), list(raw)))
  return out


def _text_offsets(tokenizer, c: Completion) -> list[int]:
  """Where in the completion's text each token begins: the length of the text decoded before it, so a token that
  starts a character which a later token completes begins where that character does. Clipped to the text's
  length, which a stop string may have cut short of the tokens."""
  if tokenizer is None:
    return [0] * len(c.token_ids)
  stream, offsets, at = tokenizer.stream(skip_special_tokens=True), [], 0
  for i in c.token_ids:
    offsets.append(min(at, len(c.text)))
    at += len(stream.add(i))
  return offsets
