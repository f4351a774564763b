"""What goes into the engine and what comes out: requests, their chat messages, completions and stream events.

    as_request({"messages": [{"role": "user", "content": "Hi"}], "sampling": {"max_tokens": 8}})  # -> Request
    checked_message(0, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}, visuals, join_text=True)

Everything here is host-side parsing and checking, independent of any model: a malformed request raises one
InputError naming the field, message or content part at fault. What needs the model (its tokenizer, vocabulary,
vision config) is checked by `Engine.prepare`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwenjax._errors import InputError
from qwenjax.engine.sampling_params import SamplingParams

_ROLES = ("system", "user", "assistant", "tool")  # the roles a message may have


@dataclasses.dataclass
class Request:
  """One prompt: raw text or token ids (`prompt`), or chat `messages` rendered with the chat template.

  A message's content may be a list of OpenAI-style parts: {"type": "text", "text": ...}, {"type": "image_url",
  "image_url": {"url": ...}} (a path, file:// or data: URL), {"type": "image", "image": path | PIL image},
  {"type": "video", "video": video file | [frames] | frame directory} (with qwen-vl-utils' options beside "video":
  fps, nframes, max_pixels, ...), {"type": "video_url", "video_url": {"url": path, file:// or data:video/ URL}}.
  A raw prompt places its own `<|image_pad|>` / `<|video_pad|>` tokens (one each, between `<|vision_start|>` and
  `<|vision_end|>`) and passes `images` and `videos` in the order their pads appear. Images and videos need a
  Qwen2.5-VL model.
  """

  prompt: str | Sequence[int] | None = None
  messages: list[dict[str, Any]] | None = None
  tools: list[dict[str, Any]] | None = None
  sampling: SamplingParams | None = None
  id: Any = None
  images: list[Any] | None = None
  videos: list[Any] | None = None
  # Constrained decoding (`qwenjax.engine.constraints`). response_format, OpenAI's: {"type": "text"},
  # {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, and ours:
  # {"type": "regex", "regex": ...}, {"type": "grammar", "grammar": <Lark>}. tool_choice, OpenAI's: "none",
  # "auto" (the default with tools), "required", or {"type": "function", "function": {"name": ...}}.
  response_format: dict[str, Any] | None = None
  tool_choice: str | dict[str, Any] | None = None
  lora: str | None = None  # the name of the engine's LoRA adapter to generate with (None: the base model)
  # More variables for the chat template (vLLM's chat_template_kwargs), e.g. {"enable_thinking": False}.
  chat_template_kwargs: dict[str, Any] | None = None


@dataclasses.dataclass
class Completion:
  """One generated sequence (one of a request's n samples)."""

  text: str
  token_ids: list[int]
  # "stop": an end-of-sequence/stop token or stop string; "length": max_tokens or context; "grammar_error": the
  # constraint's matcher failed mid-decode (a resource limit), so the text would not conform: not an answer
  finish_reason: str
  index: int = 0  # which of the request's n samples
  logprobs: list[float] | None = None
  # sampling.top_logprobs > 0: per generated token, the (token id, log-probability) of the most likely tokens there
  top_logprobs: list[list[tuple[int, float]]] | None = None
  error: str | None = None  # finish_reason "grammar_error": what the constraint's matcher said


@dataclasses.dataclass
class RequestOutput:
  """A request's completions (n of them) and its token usage. prompt_logprobs (when its sampling asks): one entry
  per prompt token, the log-probability of that token given those before it under the model's raw distribution,
  None for the first; shared by the n completions (the logprobs of their own tokens are in `outputs`)."""

  id: Any
  prompt_tokens: int
  outputs: list[Completion]
  prompt_logprobs: list[float | None] | None = None
  cached_tokens: int = 0  # prompt tokens read from shared prefix pages instead of computed (first sample's)
  # False while `Engine.step` reports a request still generating: its completions so far (finish_reason None
  # where a sample goes on; text without what may yet begin a stop string).
  finished: bool = True

  @property
  def text(self) -> str:
    return self.outputs[0].text

  @property
  def token_ids(self) -> list[int]:
    return self.outputs[0].token_ids

  @property
  def finish_reason(self) -> str:
    return self.outputs[0].finish_reason

  @property
  def usage(self) -> dict[str, int]:
    return {"prompt_tokens": self.prompt_tokens,
            "completion_tokens": sum(len(o.token_ids) for o in self.outputs)}


@dataclasses.dataclass
class StreamEvent:
  """Text and tokens a sequence produced since its last event; `finish_reason` set on its last event."""

  request_index: int
  sample_index: int
  token_ids: list[int]
  text: str
  finish_reason: str | None = None


def as_request(r: Request | str | Sequence[int] | dict) -> Request:
  """Accepts a Request, raw text, token ids, or a dict with 'prompt' / 'messages' (and optional 'sampling')."""
  if isinstance(r, Request):
    return r
  if isinstance(r, str):
    return Request(prompt=r)
  if isinstance(r, dict):
    unknown = set(r) - {"prompt", "messages", "tools", "sampling", "id", "images", "videos", "response_format",
                        "tool_choice", "lora", "chat_template_kwargs"}
    if unknown:
      raise InputError(f"unknown request field {sorted(unknown)[0]!r} (expected prompt, messages, tools, "
                       "sampling, id, images, videos, response_format, tool_choice, lora, chat_template_kwargs).")
    if r.get("lora") is not None and not isinstance(r["lora"], str):
      raise InputError(f"'lora' must be the name of a LoRA adapter (a string), got {type(r['lora']).__name__}.")
    for key in ("images", "videos"):
      if r.get(key) is not None and not isinstance(r[key], list):
        raise InputError(f"'{key}' must be a list.")
    sampling = r.get("sampling")
    if isinstance(sampling, dict):
      sampling = SamplingParams.from_dict(sampling)
    messages = r.get("messages")
    if messages is not None and not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
      raise InputError("'messages' must be a list of {'role': ..., 'content': ...} objects.")
    if r.get("prompt") is not None and not isinstance(r["prompt"], (str, list)):
      raise InputError("'prompt' must be a string or a list of token ids.")
    return Request(prompt=r.get("prompt"), messages=messages, tools=r.get("tools"), sampling=sampling,
                   id=r.get("id"), images=r.get("images"), videos=r.get("videos"),
                   response_format=r.get("response_format"), tool_choice=r.get("tool_choice"), lora=r.get("lora"),
                   chat_template_kwargs=r.get("chat_template_kwargs"))
  if isinstance(r, (list, tuple, np.ndarray)):
    return Request(prompt=list(r))
  raise InputError(f"a request must be text, token ids or a dict, got {type(r).__name__}.")


def checked_message(index: int, message: Any, visuals: list[tuple[str, Any, str]], *, join_text: bool) -> dict:
  """Checks message `index` (its role and content) and appends its image and video parts to `visuals` as
  (kind, source, field), in order; field: where the request holds it, `messages[0].content[1].image_url`.
  join_text (a text model): a content list of text parts only becomes one string."""
  where = f"message {index}"
  if not isinstance(message, dict):
    raise InputError(f"{where}: expected an object with 'role' and 'content', got {type(message).__name__}.")
  role, content, tool_calls = message.get("role"), message.get("content"), message.get("tool_calls")
  if role not in _ROLES:
    problem = "no role" if role is None else f"unknown role {role!r}"
    raise InputError(f"{where}: {problem} (expected system, user, assistant or tool).")
  if tool_calls is not None and not (role == "assistant" and isinstance(tool_calls, list)):
    raise InputError(f"{where}: tool_calls must be a list, in an assistant message.")
  for j, call in enumerate(tool_calls or ()):
    _check_tool_call(call, f"{where}: tool_calls[{j}]")
  if role == "tool" and not isinstance(message.get("tool_call_id", ""), (str, type(None))):
    raise InputError(f"{where}: tool_call_id must be a string, got {type(message['tool_call_id']).__name__}.")
  if content is None and not (role == "assistant" and tool_calls):
    raise InputError(f"{where}: {role} messages need content (a string or a list of content parts)"
                     f"{' or tool_calls' if role == 'assistant' else ''}.")
  if content is None or isinstance(content, str):
    return message
  if not isinstance(content, list):
    raise InputError(f"{where}: content must be a string or a list of content parts, got "
                     f"{type(content).__name__}.")
  texts = []
  for j, part in enumerate(content):
    kind, source, key = _content_part(part, where)
    if kind == "text":
      texts.append(source)
    else:
      visuals.append((kind, source, f"messages[{index}].content[{j}].{key}"))
  if any(part.get("type") == "video_url" for part in content):  # chat templates render {"type": "video"} parts
    message = dict(message, content=[{"type": "video", "video": _content_part(part, where)[1]}
                                     if part.get("type") == "video_url" else part for part in content])
  if join_text and len(texts) == len(content):
    return dict(message, content="".join(texts))
  return message


def _check_tool_call(call: Any, where: str) -> None:
  """An assistant message's tool call: OpenAI's {"type": "function", "function": {"name", "arguments"}} or the bare
  {"name", "arguments"}; arguments an object or a JSON string of one (the chat template parses the string)."""
  if not isinstance(call, dict):
    raise InputError(f"{where}: expected an object with 'function', got {type(call).__name__}.")
  if call.get("type") not in (None, "function"):
    raise InputError(f"{where}: unsupported tool call type {call['type']!r} (expected function).")
  function = call["function"] if call.get("function") is not None else call
  if not isinstance(function, dict):
    raise InputError(f"{where}: 'function' must be an object with 'name' and 'arguments'.")
  if not (isinstance(function.get("name"), str) and function["name"]):
    raise InputError(f"{where}: the function needs a 'name' (a non-empty string).")
  if not isinstance(function.get("arguments"), (str, dict)):
    raise InputError(f"{where}: the function's 'arguments' must be a JSON object or a string holding one.")


def _content_part(part: Any, where: str) -> tuple[str, Any, str]:
  """One OpenAI-style content part of message `where` -> ("text", text) | ("image", source) | ("video", frames),
  and the part's key that holds it."""
  if not isinstance(part, dict):
    raise InputError(f"{where}: a content part must be an object, got {type(part).__name__}.")
  kind = part.get("type")
  if kind == "text" or (kind is None and "text" in part):
    if not isinstance(part.get("text"), str):
      raise InputError(f"{where}: a text part needs {{'text': string}}.")
    return "text", part["text"], "text"
  if kind == "image_url" or (kind is None and "image_url" in part):
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not url:
      raise InputError(f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}.")
    return "image", url, "image_url"
  if kind == "image" or (kind is None and "image" in part):
    if part.get("image") is None:
      raise InputError(f"{where}: an image part needs {{'image': path or URL}}.")
    return "image", part["image"], "image"
  if kind == "video" or (kind is None and "video" in part):
    if part.get("video") is None:
      raise InputError(f"{where}: a video part needs {{'video': video file, [frames] or a frame directory}}.")
    options = set(part) - {"type", "video"}  # fps, max_pixels, ...: preprocess_video takes the whole part
    return "video", dict(part) if options else part["video"], "video"
  if kind == "video_url":  # vLLM's OpenAI-style video part
    url = part.get("video_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not url:
      raise InputError(f"{where}: a video_url part needs {{'video_url': {{'url': ...}}}}.")
    return "video", url, "video_url"
  raise InputError(f"{where}: unsupported content part type {kind!r} (expected text, image_url, image, video or "
                   "video_url).")
