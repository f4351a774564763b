"""The simple batch format's output lines: a served line's record, a failed line's error record, and how a results
file's records of this format are recognised. (OpenAI Batch lines are `openai_batch`'s; `launch.batch_generate`
answers each input line in its own format.)

    record = simple_batch.result_line(line, request, output)   # {"id", "text", "token_ids", "finish_reason", "usage"}
    record = simple_batch.error_line("a", "context_length_exceeded", "in.jsonl:3: the prompt has ...", obj=line.obj)
    if simple_batch.is_result(obj):
      key = simple_batch.result_key(obj)                        # the id it answers

Record: {"id", "text", "token_ids", "finish_reason", "usage"} (usage's "cached_tokens" when prompt tokens came
from shared prefix pages), with n > 1 "choices" (every sample), "logprobs", "top_logprobs" ([{"token_id",
"logprob"}] per generated token) and "prompt_logprobs" when the line's sampling asks, "tool_calls" and
"tool_call_errors" when the line has tools. Error record: {"id", "error", "code"}. Both end with the input line's
"metadata", copied untouched, when it has one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from qwenjax.engine import openai_batch
from qwenjax.engine.constraints import GRAMMAR_ERROR
from qwenjax.engine.requests import Request, RequestOutput
from qwenjax.text import reasoning as reasoning_lib
from qwenjax.text import tool_calls


def result_line(line, request: Request, output: RequestOutput, reasoning: bool = False) -> dict[str, Any]:
  """The record of input `line` (a `job_input.InputLine`, untyped: job_input imports jobs, which imports this
  module), accepted as `request` and served as `output`; an error record (code "grammar_error") if a sample's
  constraint failed mid-decode (`openai_batch.grammar_failure`). reasoning (a chat line of a model that thinks):
  "text" stays what was generated, and "reasoning_content" and "content" split it (`qwenjax.text.reasoning`);
  tool calls are read from the content."""
  broken = openai_batch.grammar_failure(output)
  if broken is not None:  # not an answer: the output would not conform to the line's constraint
    return error_line(line.key, GRAMMAR_ERROR, f"{line.where}: {broken}", obj=line.obj)
  usage = dict(output.usage)
  if output.cached_tokens:
    usage["cached_tokens"] = output.cached_tokens
  record = {"id": line.key, "text": output.text, "token_ids": output.token_ids,
            "finish_reason": output.finish_reason, "usage": usage}
  if len(output.outputs) > 1:
    record["choices"] = [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                          "finish_reason": c.finish_reason} for c in output.outputs]
  if output.outputs[0].logprobs is not None:
    record["logprobs"] = output.outputs[0].logprobs
  if output.outputs[0].top_logprobs is not None:
    record["top_logprobs"] = [[{"token_id": i, "logprob": lp} for i, lp in top]
                              for top in output.outputs[0].top_logprobs]
  if output.prompt_logprobs is not None:
    record["prompt_logprobs"] = output.prompt_logprobs
  text = output.text
  if reasoning and request.messages is not None:
    record["reasoning_content"], text = reasoning_lib.split(text)
    record["content"] = text
  if request.tools and request.tool_choice != "none":
    # Call ids hash the id as the job compares ids (`jobs.record_key`): a rerun writes the same ones.
    parsed = tool_calls.parse(text, key=json.dumps(line.key))
    record["tool_calls"] = parsed.calls
    if parsed.errors:
      record["tool_call_errors"] = parsed.errors
  if "metadata" in line.obj:
    record["metadata"] = line.obj["metadata"]
  return record


def error_line(key: Any, code: str, message: str, *, obj: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The record of a line that cannot be served, keyed by its id (or line); `obj`, the parsed input line if it
  parsed, gives its "metadata"."""
  record = {"id": key, "error": message, "code": code}
  if obj is not None and "metadata" in obj:
    record["metadata"] = obj["metadata"]
  return record


def is_result(obj: Any) -> bool:
  """Whether a parsed output line is a record of this format (from `result_line` or `error_line`): an object with
  an "id" (a string or an integer) and either an "error" string or "text", "token_ids", "finish_reason" and
  "usage"."""
  if not isinstance(obj, dict) or not isinstance(obj.get("id"), (str, int)) or isinstance(obj["id"], bool):
    return False
  return isinstance(obj.get("error"), str) or (
      isinstance(obj.get("text"), str) and isinstance(obj.get("token_ids"), list)
      and isinstance(obj.get("finish_reason"), str) and isinstance(obj.get("usage"), dict))


def result_key(obj: Mapping[str, Any]) -> Any:
  """The id a record answers."""
  return obj["id"]
