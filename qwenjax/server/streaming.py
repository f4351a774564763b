"""Streamed responses: a request's cumulative outputs in, OpenAI's chunk objects out (host only, no I/O).

    stream = ResponseStream(CHAT_URL, body, response_id, model=..., tokenizer=..., created=...)
    for output in outputs_so_far:              # RequestOutputs, each holding every choice's text and tokens so far
      for chunk in stream.update(output):      # chat.completion.chunk / text_completion objects
        send(chunk)
    if stream.include_usage:
      send(stream.usage_chunk(last_output))

Chat: each choice's first chunk carries the role, then content deltas; with tools, a tool call is sent whole as one
tool-call delta (index, id, type, name and arguments) once its block has closed, and the content holds the text
outside the blocks, as the unstreamed message's content would (a block still open and trailing whitespace wait
until they settle). With `reasoning` (a model that thinks), the `<think>` block streams as reasoning_content deltas
and only the rest is content. Logprobs ride with the tokens they belong to. A choice's last chunk has its finish_reason.
What the deltas of a choice add up to equals the unstreamed response's choice: the same content, tool calls (ids
included), logprobs and finish_reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qwenjax.engine import openai_batch
from qwenjax.engine.requests import Completion, RequestOutput
from qwenjax.text import reasoning as reasoning_lib
from qwenjax.text import tool_calls as tool_calls_lib


class _Choice:
  """What one choice has sent so far."""

  def __init__(self, tokenizer):
    self.started = False
    self.done = False
    self.text = 0  # characters of the completion's text sent (no tools) / of the content (tools)
    self.reasoning = ""  # the reasoning_content sent
    self.content = ""  # tools: the content sent
    self.tokens = 0  # tokens whose logprobs were sent
    self.calls = 0  # tool calls sent
    self.offsets = tokenizer.stream(skip_special_tokens=True) if tokenizer is not None else None
    self.at = 0  # characters the offset stream has decoded


class ResponseStream:
  """The chunks of one streamed /v1/chat/completions or /v1/completions response."""

  def __init__(self, url: str, body: Mapping[str, Any], response_id: str, *, model: str, tokenizer, created: int,
               reasoning: bool = False, opened: bool = False):
    self.chat = url == openai_batch.CHAT_URL
    self.reasoning, self.opened = reasoning and self.chat, opened
    self.response_id, self.model, self.created, self.tokenizer = response_id, model, created, tokenizer
    self.parse_tools = openai_batch.parses_tools(url, body)
    options = body.get("stream_options") or {}
    self.include_usage = bool(options.get("include_usage"))
    self.object = "chat.completion.chunk" if self.chat else "text_completion"
    self._choices: dict[int, _Choice] = {}

  def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk = {"id": self.response_id, "object": self.object, "created": self.created, "model": self.model,
             "choices": choices}
    if self.include_usage:
      chunk["usage"] = None
    return chunk

  def update(self, output: RequestOutput) -> list[dict[str, Any]]:
    """The chunks that bring every choice up to `output` (one per choice that has something new)."""
    chunks = []
    for c in output.outputs:
      state = self._choices.setdefault(c.index, _Choice(self.tokenizer))
      if state.done:
        continue
      choice = self._chat_delta(c, state) if self.chat else self._text_delta(c, state)
      if choice is not None:
        chunks.append(self._chunk([choice]))
    return chunks

  def usage_chunk(self, output: RequestOutput) -> dict[str, Any]:
    """The last chunk of a stream with include_usage: no choices, the whole request's usage."""
    return dict(self._chunk([]), usage=openai_batch.usage(output))

  # ---- one choice --------------------------------------------------------------------------------------

  def _new_logprobs(self, c: Completion, state: _Choice) -> tuple[list[int], list[float], list | None]:
    n = len(c.token_ids) if c.logprobs is not None else state.tokens
    ids, lps = c.token_ids[state.tokens:n], (c.logprobs or [])[state.tokens:n]
    tops = None if c.top_logprobs is None else c.top_logprobs[state.tokens:n]
    state.tokens = n
    return ids, lps, tops

  def _finish_reason(self, c: Completion, calls: bool) -> str | None:
    if c.finish_reason == "stop" and calls:  # as the unstreamed choice says it (a call cut by length stays)
      return "tool_calls"
    return c.finish_reason

  def _chat_delta(self, c: Completion, state: _Choice) -> dict[str, Any] | None:
    delta: dict[str, Any] = {}
    if not state.started:
      delta["role"] = "assistant"
      state.started = True
    finished = c.finish_reason is not None
    text = c.text
    if self.reasoning:  # the thinking block first, as reasoning_content deltas; the rest is the content
      if finished:
        thought, text = reasoning_lib.split(c.text, self.opened)
        thought = thought or ""
      else:
        thought, text = reasoning_lib.split_partial(c.text, self.opened)
      if len(thought) > len(state.reasoning) and thought.startswith(state.reasoning):
        delta["reasoning_content"] = thought[len(state.reasoning):]
        state.reasoning = thought
    if not self.parse_tools:
      if len(text) > state.text:
        delta["content"] = text[state.text:]
        state.text = len(text)
    else:
      key = f"{self.response_id}\0{c.index}"
      if finished:
        parsed = tool_calls_lib.parse(text, key=key)
        content, calls = parsed.content or "", parsed.calls
      else:
        raw, calls = tool_calls_lib.parse_partial(text, key=key)
        settled = raw.lstrip()
        content = settled[:len(settled.rstrip())]  # trailing whitespace waits: the final content is stripped
      if len(content) > len(state.content) and content.startswith(state.content):
        delta["content"] = content[len(state.content):]
        state.content = content
      if len(calls) > state.calls:
        delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(calls) if i >= state.calls]
        state.calls = len(calls)
    logprobs = None
    if c.logprobs is not None:
      ids, lps, tops = self._new_logprobs(c, state)
      if ids:
        logprobs = {"content": openai_batch.chat_logprobs(self.tokenizer, ids, lps, tops), "refusal": None}
    if "role" in delta and "content" not in delta:
      delta["content"] = ""
    if not delta and logprobs is None and not finished:
      return None
    state.done = finished
    return {"index": c.index, "delta": delta, "logprobs": logprobs,
            "finish_reason": self._finish_reason(c, state.calls > 0) if finished else None}

  def _text_delta(self, c: Completion, state: _Choice) -> dict[str, Any] | None:
    text = c.text[state.text:]
    state.text = len(c.text)
    logprobs = None
    if c.logprobs is not None:
      ids, lps, tops = self._new_logprobs(c, state)
      if ids:
        offsets = []
        for i in ids:
          offsets.append(state.at)
          if state.offsets is not None:
            state.at += len(state.offsets.add(i))
        logprobs = openai_batch.text_logprobs(self.tokenizer, ids, lps, tops, offsets)
    finished = c.finish_reason is not None
    if not text and logprobs is None and not finished:
      return None
    state.done = finished
    return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
