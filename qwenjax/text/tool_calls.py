"""Qwen's (hermes-style) tool calls in generated text, as OpenAI `tool_calls`.

    parsed = tool_calls.parse('Checking.\\n<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n'
                              '</tool_call>')
    parsed.content  # 'Checking.'
    parsed.calls    # [{'id': 'call_…', 'type': 'function',
                    #   'function': {'name': 'get_weather', 'arguments': '{"city": "Paris"}'}}]
    parsed.errors   # [] (one line per malformed block)

Qwen2.5's chat template asks for `<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n
</tool_call>`, one block per call; several blocks are parallel calls. Each block's JSON is read with a JSON decoder
from its first "{", so a "</tool_call>" inside a string argument does not end the call (vLLM's regex over the blocks
cuts it there), and the text before, between and after the blocks is kept as content. A block whose JSON is
complete but whose closing tag is missing at the very end of the text (generation stopped just before it) is a
call. A malformed block (invalid JSON, no name, arguments that are not an object, cut short) is not a call: it stays
in the content as written, and `errors` says what is wrong with it, so nothing the model wrote is lost silently.
A call without "arguments" takes {} (a function without parameters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from typing import Any

from qwenjax import _files

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclasses.dataclass
class ToolCallParse:
  """What `parse` found: the text outside the calls, the calls, and one message per malformed block."""

  content: str | None  # the text outside the well-formed blocks, stripped; None when nothing is left
  calls: list[dict[str, Any]]  # OpenAI tool calls: {"id", "type": "function", "function": {"name", "arguments"}}
  errors: list[str]  # "tool call block 2: ..." for each malformed block (kept in `content`)


def _reject_constant(name: str):
  raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # NaN / Infinity would not survive json.dumps as JSON


def parse(text: str, *, key: str | None = None) -> ToolCallParse:
  """Splits generated `text` into content and tool calls.

  key: makes the call ids deterministic ("call_" + a hash of key and the call's position), so that serving the
    same request again writes the same ids; without it the ids are random.
  """
  content, calls, errors = _split(text, key, partial=False)
  return ToolCallParse(content=content.strip() or None, calls=calls, errors=errors)


def parse_partial(text: str, *, key: str) -> tuple[str, list[dict[str, Any]]]:
  """What of a text still being generated is settled: (its content so far, unstripped, and its calls so far). A
  block that runs to the end of the text unclosed, and a trailing part of an opening tag, are not settled yet: they
  are neither content nor a call. What this returns for a text is a prefix of what it returns for any longer text,
  and of `parse(text, key=key)`'s content and calls (ids included), once stripped."""
  content, calls, _ = _split(text, key, partial=True)
  return content, calls


def _split(text: str, key: str | None, partial: bool) -> tuple[str, list[dict[str, Any]], list[str]]:
  pieces, calls, errors = [], [], []
  pos = block = 0
  while (start := text.find(OPEN, pos)) >= 0:
    pieces.append(text[pos:start])
    block += 1
    call, end, problem = _read_block(text, start + len(OPEN))
    if partial and end == len(text) and not text.endswith(CLOSE):  # may yet close, or go on
      return "".join(pieces), calls, errors
    if problem is None:
      calls.append(_openai_call(call, _call_id(key, len(calls))))
    else:
      errors.append(f"tool call block {block}: {problem}")
      pieces.append(text[start:end])
    pos = end
  tail = text[pos:]
  if partial:  # a trailing "<tool_c" may be the start of a block
    tail = tail[:len(tail) - partial_tag(tail, (OPEN,))]
  pieces.append(tail)
  return "".join(pieces), calls, errors


def partial_tag(text: str, tags: tuple[str, ...]) -> int:
  """How many trailing characters of `text` may begin one of `tags` (and wait, in a stream, for what follows)."""
  for n in range(min(max(len(t) for t in tags) - 1, len(text)), 0, -1):
    if any(text.endswith(t[:n]) for t in tags):
      return n
  return 0


def _skip_space(text: str, i: int) -> int:
  while i < len(text) and text[i].isspace():
    i += 1
  return i


def _block_end(text: str, i: int) -> int:
  """Where a malformed block that opened before i ends: just past the next CLOSE if it comes before the next
  OPEN, else at the next OPEN (which starts a block of its own), else at the end of the text."""
  close, reopen = text.find(CLOSE, i), text.find(OPEN, i)
  if close >= 0 and (reopen < 0 or close < reopen):
    return close + len(CLOSE)
  return reopen if reopen >= 0 else len(text)


def _read_block(text: str, i: int) -> tuple[dict | None, int, str | None]:
  """The block whose OPEN tag ends at i: (its JSON object, where the block ends, None) or (None, end, problem)."""
  j = _skip_space(text, i)
  if j == len(text):
    return None, j, "the text ends inside the block (cut short?)"
  if text[j] != "{":
    end = _block_end(text, i)
    return None, end, f"expected a JSON object after {OPEN}, got {text[j:min(j + 20, end)]!r}"
  try:
    obj, k = _files.raw_decode(text, j, decoder=_DECODER)  # depth-bounded: a model's output is input too
  except (json.JSONDecodeError, ValueError) as e:
    end = _block_end(text, i)
    closed = text.rfind(CLOSE, i, end) >= 0
    if not closed and end == len(text):
      return None, end, "the text ends inside the block (cut short?)"
    if isinstance(e, json.JSONDecodeError):
      return None, end, f"invalid JSON: {e.msg} at character {e.pos - j} of the object"
    return None, end, f"invalid JSON: {e}"
  k = _skip_space(text, k)
  if text.startswith(CLOSE, k):
    end = k + len(CLOSE)
  elif k == len(text):  # complete JSON, stopped before the closing tag
    end = k
  else:
    end = _block_end(text, k)
    return None, end, f"expected {CLOSE} after the JSON object, got {text[k:min(k + 20, end)]!r}"
  name, arguments = obj.get("name"), obj.get("arguments", {})
  if name is None:
    return None, end, "the call has no \"name\""
  if not isinstance(name, str) or not name:
    return None, end, f"the call's \"name\" must be a non-empty string, got {json.dumps(name, ensure_ascii=False)}"
  if not isinstance(arguments, dict):
    kind = type(arguments).__name__ if arguments is not None else "null"
    return None, end, f"the arguments of {name!r} must be a JSON object, got {kind}"
  return {"name": name, "arguments": arguments}, end, None


def _call_id(key: str | None, index: int) -> str:
  if key is None:
    return "call_" + secrets.token_hex(12)
  return "call_" + hashlib.sha256(f"{key}\0{index}".encode()).hexdigest()[:24]


def _openai_call(call: dict, call_id: str) -> dict[str, Any]:
  return {"id": call_id, "type": "function",
          "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
