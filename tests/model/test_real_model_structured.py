"""Structured outputs on the embedded Qwen2.5-Coder-0.5B-Instruct at temperature 1: every output valid under its
JSON schema (`jsonschema`), and a tool_choice="required" call that parses (json) to a listed tool with valid
arguments. Checks that the mask spans the model's 151,936 logits, not the tokenizer's 151,665 tokens."""

import json
import re

import jsonschema
import pytest

from qwenjax.engine.engine import Engine
from qwenjax.engine.requests import Request
from qwenjax.engine.sampling import SamplingParams
from qwenjax.text import tool_calls

pytestmark = pytest.mark.real_model

SCHEMAS = {
    "a person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]}}, "required": ["name", "age", "role"],
        "additionalProperties": False},
    "a shopping list": {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 4,
        "items": {"type": "object", "properties": {"item": {"type": "string", "maxLength": 16},
                                                   "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                  "required": ["item", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "a Python package": {"type": "object", "properties": {
        "package": {"type": "string", "pattern": "^[a-z][a-z0-9_]{1,15}$"},
        "version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$"},
        "license": {"enum": ["MIT", "Apache-2.0", "BSD-3-Clause"]}, "typed": {"type": "boolean"}},
        "required": ["package", "version", "license", "typed"], "additionalProperties": False},
    "a point in 3D": {"type": "array", "items": {"type": "number", "minimum": -100, "maximum": 100},
                      "minItems": 3, "maxItems": 3},
    "any JSON object describing a cat": None,  # response_format json_object
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                      "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Adds two integers.",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def engine(real_float32):
  loaded = real_float32
  return Engine(loaded.model, loaded.tokenizer, max_batch_size=8, max_seq_len=1024, decode_steps=4)


def _format(schema):
  if schema is None:
    return {"type": "json_object"}
  return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schemas_at_temperature_one_are_all_valid(engine):
  assert engine.cfg.vocab_size == 151936 and engine.grammars.vocab_size == 151936
  requests = [Request(messages=[{"role": "user", "content": f"Reply with JSON: {what}."}],
                      response_format=_format(schema),
                      sampling=SamplingParams(max_tokens=120, temperature=1.0, seed=i, n=2))
              for i, (what, schema) in enumerate(SCHEMAS.items())]
  outs = engine.generate(requests)
  for schema, out in zip(SCHEMAS.values(), outs):
    for c in out.outputs:
      assert c.finish_reason == "stop", c.text
      assert max(c.token_ids) < 151665  # nothing past the tokenizer's ids
      value = json.loads(c.text)
      jsonschema.validate(value, schema if schema is not None else {"type": "object"})


def test_tool_choice_required_calls_a_listed_tool(engine):
  """Greedy: one call of the weather tool, then the end of the turn. At temperature 1 the 0.5B model may chain
  more calls until max_tokens (the grammar allows parallel calls): every complete block is still a valid call."""
  schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
  messages = [{"role": "user", "content": "What's the weather like in Lisbon?"}]
  greedy, sampled = engine.generate([
      Request(messages=messages, tools=TOOLS, tool_choice="required", sampling=SamplingParams(max_tokens=160)),
      Request(messages=messages, tools=TOOLS, tool_choice="required",
              sampling=SamplingParams(max_tokens=160, temperature=1.0, seed=3, n=3))])
  assert greedy.finish_reason == "stop", greedy.text
  parsed = tool_calls.parse(greedy.text)
  assert not parsed.errors and parsed.content in ("", None) and len(parsed.calls) == 1, parsed
  assert parsed.calls[0]["function"]["name"] == "get_weather"
  for c in [*greedy.outputs, *sampled.outputs]:
    blocks = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", c.text, flags=re.S)
    assert blocks and c.text.startswith("<tool_call>\n"), c.text
    for body in blocks:
      call = json.loads(body)
      assert set(call) == {"name", "arguments"} and call["name"] in schemas, call
      jsonschema.validate(call["arguments"], schemas[call["name"]])
