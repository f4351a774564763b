"""Tool calls: Qwen's <tool_call> blocks parsed out of crafted generations, and histories with OpenAI-style tool
calls (arguments as JSON strings) rendered exactly as transformers renders them with dict arguments."""

import copy
import json

import openai.types.chat as oai
import pytest

from qwenjax._errors import InputError
from qwenjax.engine.requests import checked_message
from qwenjax.text import tool_calls

_CALL = oai.ChatCompletionMessageFunctionToolCall


def _block(name, arguments, raw=None):
  """A block as Qwen2.5's template teaches it: <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>."""
  body = raw if raw is not None else json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
  return f"<tool_call>\n{body}\n</tool_call>"


def _calls(parsed):
  """(name, arguments as objects) of each call, after checking each is a valid OpenAI tool call."""
  out = []
  for call in parsed.calls:
    model = _CALL.model_validate(call)
    assert model.type == "function" and model.id.startswith("call_") and len(model.id) > len("call_")
    out.append((model.function.name, json.loads(model.function.arguments)))
  return out


# --- Parsing crafted outputs ---------------------------------------------------------------------------------


def test_parallel_calls_and_the_text_around_them():
  text = ("Let me look both up.\n" + _block("get_weather", {"city": "Zürich"}) + "\n"
          + _block("get_weather", {"city": "Paris", "unit": "celsius"}) + "\nOne moment.")
  parsed = tool_calls.parse(text)
  assert _calls(parsed) == [("get_weather", {"city": "Zürich"}), ("get_weather", {"city": "Paris", "unit": "celsius"})]
  assert parsed.content == "Let me look both up.\n\n\nOne moment."
  assert parsed.errors == []
  assert len({c["id"] for c in parsed.calls}) == 2


def test_text_between_blocks_is_kept():
  text = "A " + _block("f", {"x": 1}) + " B " + _block("g", {"y": [1, 2]}) + " C"
  parsed = tool_calls.parse(text)
  assert _calls(parsed) == [("f", {"x": 1}), ("g", {"y": [1, 2]})]
  assert parsed.content == "A  B  C"


def test_only_calls_leaves_no_content():
  parsed = tool_calls.parse(_block("f", {"a": True}) + "\n")
  assert parsed.content is None and _calls(parsed) == [("f", {"a": True})]


def test_no_blocks_is_all_content():
  parsed = tool_calls.parse("  Just text, no <tool call here.  ")
  assert parsed.content == "Just text, no <tool call here." and parsed.calls == [] and parsed.errors == []


def test_close_tag_inside_a_string_argument_does_not_cut_the_call():
  args = {"html": "<b>x</b></tool_call> and <tool_call> too", "n": 2}
  parsed = tool_calls.parse(_block("render", args) + " done")
  assert _calls(parsed) == [("render", args)]
  assert parsed.content == "done" and parsed.errors == []


def test_parameterless_calls_keep_empty_arguments():
  parsed = tool_calls.parse(_block("now", {}) + _block("later", None, raw='{"name": "later"}'))
  assert _calls(parsed) == [("now", {}), ("later", {})]
  assert [c["function"]["arguments"] for c in parsed.calls] == ["{}", "{}"]


def test_unicode_arguments_stay_unescaped():
  args = {"city": "東京", "note": "naïve 😀", "quote": "\"a\\b\""}
  parsed = tool_calls.parse(_block("get_weather", args))
  assert _calls(parsed) == [("get_weather", args)]
  assert "東京" in parsed.calls[0]["function"]["arguments"] and "😀" in parsed.calls[0]["function"]["arguments"]


@pytest.mark.parametrize("raw, problem", [
    ('{"name": "f", "arguments": {"x": 1}', "invalid JSON"),  # a brace short
    ('{"name": "f", "arguments": {x: 1}}', "invalid JSON"),
    ('{"name": "f", "arguments": NaN}', "invalid JSON"),
    ('{"arguments": {"x": 1}}', 'no "name"'),
    ('{"name": "", "arguments": {}}', "non-empty string"),
    ('{"name": 3, "arguments": {}}', "non-empty string"),
    ('{"name": "f", "arguments": [1, 2]}', "must be a JSON object, got list"),
    ('{"name": "f", "arguments": "{\\"x\\": 1}"}', "must be a JSON object, got str"),
    ('get_weather(city="Paris")', "expected a JSON object"),
    ('{"name": "f", "arguments": {}} trailing', "expected </tool_call>"),
])
def test_a_malformed_block_is_reported_and_kept_in_the_content(raw, problem):
  good = _block("ok", {"k": "v"})
  bad = f"<tool_call>\n{raw}\n</tool_call>"
  parsed = tool_calls.parse(f"Before. {bad} {good} After.")
  assert _calls(parsed) == [("ok", {"k": "v"})]  # the well-formed block after it is still a call
  assert len(parsed.errors) == 1 and parsed.errors[0].startswith("tool call block 1: ") and problem in parsed.errors[0]
  assert "\n" not in parsed.errors[0]
  assert parsed.content == f"Before. {bad}  After."


def test_a_malformed_block_without_closing_tag_ends_at_the_next_block():
  text = '<tool_call>\n{"name": "f", "arguments": {\n' + _block("g", {})
  parsed = tool_calls.parse(text)
  assert _calls(parsed) == [("g", {})]
  assert parsed.content == '<tool_call>\n{"name": "f", "arguments": {' and "block 1" in parsed.errors[0]


def test_a_block_cut_by_max_tokens_is_reported():
  text = _block("a", {"x": 1}) + '\n<tool_call>\n{"name": "b", "arguments": {"q": "unfinish'
  parsed = tool_calls.parse(text)
  assert _calls(parsed) == [("a", {"x": 1})]
  assert parsed.errors == ["tool call block 2: the text ends inside the block (cut short?)"]
  assert parsed.content == '<tool_call>\n{"name": "b", "arguments": {"q": "unfinish'
  assert tool_calls.parse("<tool_call>\n").errors == ["tool call block 1: the text ends inside the block (cut short?)"]


def test_complete_json_without_the_closing_tag_at_the_end_is_a_call():
  parsed = tool_calls.parse('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n')
  assert _calls(parsed) == [("a", {"x": 1})] and parsed.errors == [] and parsed.content is None


def test_ids_are_deterministic_with_a_key():
  text = _block("a", {}) + _block("b", {})
  first, again, other = (tool_calls.parse(text, key=k) for k in ("line-1", "line-1", "line-2"))
  assert [c["id"] for c in first.calls] == [c["id"] for c in again.calls]
  assert len({c["id"] for c in first.calls + other.calls}) == 4
  assert tool_calls.parse(text).calls[0]["id"] != tool_calls.parse(text).calls[0]["id"]  # random without a key


# --- Rendering histories with OpenAI-style tool calls -------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time.",
                                          "parameters": {"type": "object", "properties": {}}}}


def _call(call_id, name, arguments):
  """An assistant tool call as OpenAI clients send it: arguments as a compact JSON string."""
  return {"id": call_id, "type": "function",
          "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))}}


HISTORIES = {
    "one_call": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 12}"},
    ],
    "parallel_calls_consecutive_tools": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Zürich and 東京, and the time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            _call("call_a", "get_weather", {"city": "Zürich", "unit": "celsius"}),
            _call("call_b", "get_weather", {"city": "東京"}),
            _call("call_c", "now", {})]},
        {"role": "tool", "tool_call_id": "call_a", "content": "3 °C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "<b>晴れ</b> & 20 °C"},
        {"role": "tool", "tool_call_id": "call_c", "name": "now", "content": "12:00"},
        {"role": "assistant", "content": "Zürich 3 °C, 東京 20 °C, noon."},
        {"role": "user", "content": "Thanks!"},
    ],
    "two_rounds": [
        {"role": "user", "content": "Paris, then London."},
        {"role": "assistant", "content": "", "tool_calls": [
            _call("c1", "get_weather", {"city": "Paris", "nested": {"a": [1, 2.5, None, True]}})]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "assistant", "tool_calls": [_call("c2", "get_weather", {"city": "London"})]},
        {"role": "tool", "tool_call_id": "c2", "content": "fog"},
    ],
    "dict_and_string_mixed": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "now", "arguments": {}}},
            {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}]},
        {"role": "tool", "content": "12:00"},
        {"role": "tool", "content": "sun"},
    ],
}


def _with_dict_arguments(messages):
  """The same history with every string arguments parsed: what transformers' template needs."""
  messages = copy.deepcopy(messages)
  for m in messages:
    for call in m.get("tool_calls") or ():
      holder = call.get("function", call)
      if isinstance(holder["arguments"], str):
        holder["arguments"] = json.loads(holder["arguments"])
  return messages


@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("history", sorted(HISTORIES))
def test_string_arguments_render_as_transformers_renders_dicts(tokenizer, hf_tokenizer, history, with_tools):
  messages = HISTORIES[history]
  tools = [WEATHER, CLOCK] if with_tools else None
  expected = hf_tokenizer.apply_chat_template(_with_dict_arguments(messages), tools=tools, add_generation_prompt=True,
                                        tokenize=False)
  before = copy.deepcopy(messages)
  got = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
  assert got.encode("utf-8") == expected.encode("utf-8")
  assert messages == before  # the caller's messages are not modified
  for m in messages:  # every message is one checked_message accepts
    checked_message(0, m, [], join_text=True)


def test_rendered_calls_parse_back(tokenizer):
  """The template's own rendering of an assistant turn is what the model is taught to write: parse it back."""
  messages = HISTORIES["parallel_calls_consecutive_tools"][:3]
  prompt = tokenizer.apply_chat_template(messages, tools=[WEATHER, CLOCK], add_generation_prompt=False)
  turn = prompt.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
  parsed = tool_calls.parse(turn)
  sent = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in messages[2]["tool_calls"]]
  assert _calls(parsed) == sent and parsed.content == "Checking." and parsed.errors == []


@pytest.mark.parametrize("arguments, message", [
    ("[1, 2]", r"messages\[1\].tool_calls\[0\]: function.arguments must be a JSON object, got list"),
    ("\"text\"", r"messages\[1\].tool_calls\[0\]: function.arguments must be a JSON object, got str"),
    ("{\"city\": ", r"messages\[1\].tool_calls\[0\]: function.arguments is not valid JSON"),
])
def test_string_arguments_that_are_not_an_object_are_an_input_error(tokenizer, arguments, message):
  messages = [{"role": "user", "content": "hi"},
              {"role": "assistant", "tool_calls": [{"type": "function",
                                                    "function": {"name": "f", "arguments": arguments}}]}]
  with pytest.raises(InputError, match=message):
    tokenizer.apply_chat_template(messages, tools=[WEATHER])


@pytest.mark.parametrize("message, error", [
    ({"role": "assistant", "tool_calls": ["f()"]}, r"tool_calls\[0\]: expected an object"),
    ({"role": "assistant", "tool_calls": [{"type": "custom", "custom": {}}]}, "unsupported tool call type 'custom'"),
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "needs a 'name'"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}, "'arguments' must be"),
    ({"role": "tool", "content": "x", "tool_call_id": 7}, "tool_call_id must be a string"),
])
def test_checked_message_names_a_malformed_tool_call(message, error):
  with pytest.raises(InputError, match=error):
    checked_message(2, message, [], join_text=True)
