"""Chat templates rendered the way transformers renders them, in a sandbox with a time and output budget.

    template = ChatTemplate(source, where="model/tokenizer_config.json (chat_template)")
    prompt = template.render(messages, tools, add_generation_prompt=True, variables={"eos_token": "<|im_end|>"},
                             seconds=10.0, max_chars=10_000_000)

The environment is transformers' (a sandboxed jinja2 environment with trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now` and a `tojson` that does not escape HTML or non-ASCII), so a prompt is
byte-identical to `AutoTokenizer.apply_chat_template`. A template comes with the checkpoint and is not trusted:
it cannot reach Python internals (no underscore attributes, not even through `namespace()`), and a rendering that
runs past its budget, by output, by loop steps over `range` or by building a huge value with `*` or `**`, stops.

Every failure is one sentence naming where the template came from: ConfigError for a broken template (syntax,
sandbox violation, budget), InputError for messages it rejects or cannot handle.
"""

from __future__ import annotations

import collections.abc
import datetime
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils
import numpy as np

from qwenjax import _files
from qwenjax._errors import ConfigError, InputError

# Default bounds on one rendering (`qwenjax.text.tokenizer.Tokenizer.render_seconds` / `render_max_chars`); the
# sandbox refuses to build, with `*` or `**`, a value longer than RENDER_MAX_CHARS.
RENDER_SECONDS = 10.0
RENDER_MAX_CHARS = 10_000_000

# Names a message's reasoning arrives under; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate:
  """One chat template, compiled in the sandbox.

  Args:
    source: the template's jinja2 source.
    where: where it came from, for messages ("<dir>/tokenizer_config.json (chat_template)").

  Raises:
    ConfigError: the template has a syntax error.
  """

  def __init__(self, source: str, where: str):
    self.where = where
    try:
      self._template = _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise ConfigError(f"The chat template of {where} has a syntax error at line {e.lineno}: "
                        f"{_sentence(e.message)}") from None

  def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None, *,
             add_generation_prompt: bool, variables: Mapping[str, Any], seconds: float, max_chars: int) -> str:
    """The template's text for a conversation.

    Args:
      messages: [{"role": ..., "content": ...}, ...]; keys set to None are dropped. An assistant message's
        tool_calls may carry their arguments as a JSON string, as OpenAI clients send them: it is parsed to the
        object templates expect (InputError if it is not a JSON object).
      tools: JSON schemas of the callable functions, or None.
      add_generation_prompt: end with the header of an assistant turn.
      variables: the other template variables (special tokens, `enable_thinking`, ...), passed as plain data.
      seconds, max_chars: the budget of this rendering.

    Raises:
      ConfigError: the rendering ran past its budget, or did something the sandbox forbids.
      InputError: the messages or tools are malformed, or the template rejects them (`raise_exception`) or
        cannot handle them.
    """
    variables = dict(_plain(variables))
    variables.setdefault("documents", None)
    budget = _RenderBudget(seconds, max_chars)
    variables["range"] = budget.range
    chunks = []
    try:
      for chunk in self._template.generate(messages=_template_messages(messages), tools=_template_tools(tools),
                                           add_generation_prompt=add_generation_prompt, **variables):
        budget.spend(len(chunk))
        chunks.append(chunk)
    except _RenderLimitExceeded:
      raise ConfigError(f"The chat template of {self.where} exceeded the render limit "
                        f"({max_chars:,} characters / {seconds:g} s).") from None
    except _TemplateRaised as e:
      raise InputError(f"The chat template of {self.where} rejects these messages: {_sentence(e.message)}") from None
    except jinja2.exceptions.SecurityError as e:
      raise ConfigError(f"The chat template of {self.where} does something the sandbox forbids"
                        f"{_at_line(e)}: {_sentence(e)}") from None
    except InputError:
      raise
    except Exception as e:  # UndefinedError, TypeError, ...: the template met data it cannot handle.
      raise InputError(f"The chat template of {self.where} failed on these messages{_at_line(e)} "
                       f"({type(e).__name__}: {_clause(e)}).") from None
    return "".join(chunks)


# --- The sandbox ---------------------------------------------------------------------------------------------


class _TemplateRaised(jinja2.exceptions.TemplateError):
  """What a template's `raise_exception(message)` raises."""


def _raise_exception(message: str):
  raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
  return datetime.datetime.now().strftime(format_string)


def _check_namespace_key(name: Any) -> None:
  if isinstance(name, str) and name.startswith("_"):
    raise jinja2.exceptions.SecurityError(f"a chat template may not set the private namespace attribute {name!r}")


class _Namespace(jinja2.utils.Namespace):
  """jinja2's `namespace()`, refusing underscore names so a template cannot reach Python internals."""

  def __init__(*args: Any, **kwargs: Any):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _check_namespace_key(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _check_namespace_key(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)


class _RenderLimitExceeded(Exception):
  """A chat template rendering ran past its time or output budget."""


class _RenderBudget:
  """The time and output one chat template rendering may take: checked at every output chunk and, through
  `range` (the template's), at every loop step over a range, so that nested loops cannot run for ever."""

  def __init__(self, seconds: float, max_chars: int):
    self._deadline, self._chars_left = time.monotonic() + seconds, max_chars

  def spend(self, chars: int = 0) -> None:
    self._chars_left -= chars
    if self._chars_left < 0 or time.monotonic() > self._deadline:
      raise _RenderLimitExceeded

  def range(self, *args: int) -> _BoundedRange:
    return _BoundedRange(jinja2.sandbox.safe_range(*args), self)


class _BoundedRange(collections.abc.Sequence):
  """jinja2's sandboxed range (at most MAX_RANGE items) that spends its rendering's budget at every item."""

  def __init__(self, items: range, budget: _RenderBudget):
    self._items, self._budget = items, budget

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index):
    item = self._items[index]
    return _BoundedRange(item, self._budget) if isinstance(item, range) else item

  def __iter__(self):
    for item in self._items:
      self._budget.spend()
      yield item

  def __reversed__(self):
    return iter(_BoundedRange(self._items[::-1], self._budget))


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
  """transformers' sandbox, where `*` and `**` cannot build a value larger than a rendering may output
  ('x' * 10**10 would otherwise exhaust memory before any chunk is checked)."""

  intercepted_binops = frozenset(["*", "**"])

  def call_binop(self, context, operator, left, right):
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(right) > 64:
      raise _RenderLimitExceeded
    if operator == "*":
      for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_MAX_CHARS:
          raise _RenderLimitExceeded
    return super().call_binop(context, operator, left, right)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
  return env


# --- What a template sees ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
  """`value` rebuilt from plain JSON-like types, so the template sees no methods of rich objects.

  Anything else (an image, an array) becomes a placeholder naming its type, e.g. "<ndarray>":
  templates test whether such keys exist but never read them.
  """
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, np.generic):
    return _plain(value.item())
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):  # bool was handled above by exact type; subclasses like IntEnum land here.
    return int(value)
  if isinstance(value, float):
    return float(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  return f"<{type(value).__name__}>"


def _template_messages(messages: Any) -> list[dict[str, Any]]:
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise InputError(f"messages must be a list of dicts with 'role' and 'content', not a {type(messages).__name__}.")
  if not messages:
    raise InputError("messages is empty; a chat needs at least one message.")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise InputError(f"messages[{i}] is a {type(message).__name__}, not a dict with 'role' and 'content'.")
    message = _plain({k: v for k, v in message.items() if v is not None})
    if message.get("role") == "assistant" and isinstance(message.get("tool_calls"), list):
      message["tool_calls"] = [_tool_call_with_object_arguments(call, f"messages[{i}].tool_calls[{j}]")
                               for j, call in enumerate(message["tool_calls"])]
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is not None:  # Offer it under the names templates read, as transformers does.
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def _tool_call_with_object_arguments(call: Any, where: str) -> Any:
  """An assistant tool call whose arguments are a JSON string (as OpenAI clients send them) with those arguments
  parsed, as vLLM does: templates render `arguments | tojson`, which is only right for an object. Both OpenAI's
  {"function": {"name", "arguments"}} and the bare {"name", "arguments"} are accepted."""
  if not isinstance(call, dict):
    return call
  function = call.get("function")
  holder = function if isinstance(function, dict) else call
  arguments = holder.get("arguments")
  if not isinstance(arguments, str):
    return call
  field = "function.arguments" if holder is function else "arguments"
  try:
    parsed = _files.loads(arguments)  # depth-bounded: a history's arguments are input too
  except json.JSONDecodeError as e:
    raise InputError(f"{where}: {field} is not valid JSON ({e.msg} at character {e.pos}).") from None
  if not isinstance(parsed, dict):
    raise InputError(f"{where}: {field} must be a JSON object, got {type(parsed).__name__}.")
  fixed = {**holder, "arguments": parsed}
  return {**call, "function": fixed} if holder is function else fixed


def _template_tools(tools: Any) -> list[Any] | None:
  if tools is None:
    return None
  if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
    raise InputError(f"tools must be a list of JSON schema dicts, not a {type(tools).__name__}.")
  for i, tool in enumerate(tools):
    if not isinstance(tool, Mapping):
      raise InputError(f"tools[{i}] is a {type(tool).__name__}, not a JSON schema dict.")
  return _plain(list(tools))


# --- Messages ------------------------------------------------------------------------------------------------


def _clause(error: BaseException | str) -> str:
  """An error's text on one line, without a final period."""
  text = " ".join(str(error).split()) or (type(error).__name__ if isinstance(error, BaseException) else "")
  return text.removesuffix(".")


def _sentence(error: BaseException | str) -> str:
  """An error's text as the end of a one-line sentence."""
  text = _clause(error)
  return text if text.endswith(("!", "?")) else text + "."


def _at_line(error: BaseException) -> str:
  """" at line N" for the innermost template frame of `error`'s traceback, else ""."""
  line = None
  tb = error.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code.co_filename == "<template>":
      line = tb.tb_lineno
    tb = tb.tb_next
  return "" if line is None else f" at line {line}"
