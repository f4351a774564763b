"""Constrained decoding: a request's `response_format` / `tool_choice` as a token bitmask, one row per slot.

    grammars = Grammars(tokenizer, vocab_size=cfg.vocab_size, eos_token_ids=engine.eos_token_ids)
    spec = grammars.spec(request)        # None (free), or what constrains it; InputError if malformed
    constraint = grammars.constraint(spec)   # one per sequence: its own matcher
    constraint.fill(mask[row])           # int32 [W] bits of the tokens allowed next
    constraint.advance(token)            # False: the matcher refused it (finish_reason "grammar_error", which
                                         # batch_generate records as an error, code "grammar_error")

What constrains a request:
  response_format {"type": "json_object"}: any JSON object; {"type": "json_schema", "json_schema": {"schema":
    ...}}: JSON valid under the schema; {"type": "regex", "regex": r}: text matching r; {"type": "grammar",
    "grammar": lark}: text in the Lark grammar (llguidance's dialect); {"type": "text"} or None: nothing.
  tool_choice "required" (with `tools`): one or more Qwen (hermes) tool-call blocks, `<tool_call>\\n{"name": <a
    listed tool>, "arguments": <an object valid under that tool's parameters>}\\n</tool_call>`, separated by
    newlines, then an optional newline (Qwen2.5 ends its turn so); a named function {"type": "function",
    "function": {"name": f}}: exactly one block calling f; "none": the `<tool_call>` token is never sampled;
    "auto" or None: nothing.

Grammars are llguidance's (no torch): a spec's grammar is compiled and checked against the vocabulary once per
`Grammars` (one per engine; keyed by the spec's canonical JSON), and each sequence gets a fresh `LLMatcher` over
it (~1 ms at a 152K vocabulary; a deep copy would not be cheaper for a sequence that starts at the beginning).
JSON is generated with fixed separators (", " and ": ") and no free whitespace, unless a schema's
"x-guidance" says otherwise: free whitespace lets a model at temperature 1 wander off into blanks.

Masks are [rows, W] int32, W = ceil(V / 32) words of the model's logit width V (bit j of word i: token
32 i + j), as llguidance fills them. Ids the tokenizer does not have (V can exceed it: 151,936 logits for
151,665 tokens) and a GGUF vocabulary's "[PAD<id>]" fillers are never allowed in a constrained row.
`qwenjax.engine.sampling.sample` unpacks a mask on the device (shifts and & 1) and sets the forbidden logits
to -inf. A grammar row allows its sequence's stop ids (end-of-sequence included) exactly where the grammar
accepts, and once the grammar is complete only them.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from qwenjax._errors import InputError

_MAX_COMPILED = 1024  # grammars kept compiled: a job's or a server's distinct schemas, tools and regexes

TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# The finish_reason of a constrained sequence whose matcher refused a token (a grammar resource limit; the mask
# never allows one).
GRAMMAR_ERROR = "grammar_error"
# JSON's layout: compact separators with one space, as json.dumps writes them, and no other whitespace.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_PAD_TOKEN = re.compile(r"\[PAD\d+\]")  # llama.cpp's fillers of a vocabulary padded to the logit width


def words(vocab_size: int) -> int:
  """W: int32 words of a mask over vocab_size tokens."""
  return -(-vocab_size // 32)


def pack_ids(ids: Iterable[int], vocab_size: int) -> np.ndarray:
  """[W] int32 with the bits of `ids` set (ids outside [0, vocab_size) ignored)."""
  bits = np.zeros(words(vocab_size) * 32, bool)
  ids = np.asarray([i for i in ids if 0 <= i < vocab_size], np.int64)
  bits[ids] = True
  return np.packbits(bits.reshape(-1, 32), axis=-1, bitorder="little").view(np.int32)[:, 0].copy()


class Constraint:
  """One sequence's constraint: a grammar matcher (None: none) and token ids it must never sample.

  `per_token`: the mask changes after every token (a grammar), so a decode block may sample only one token of
  this sequence before the host advances the matcher; a constraint of forbidden ids alone holds for any number
  of steps."""

  def __init__(self, matcher: llguidance.LLMatcher | None, allowed: np.ndarray, stop_ids: np.ndarray):
    self.matcher = matcher
    self._allowed = allowed  # [W] int32: every id the constraint may ever allow
    self._stop = stop_ids  # [W] int32: the sequence's stop ids, allowed once the grammar accepts
    self.error: str | None = None

  @property
  def per_token(self) -> bool:
    return self.matcher is not None

  def fill(self, row: np.ndarray) -> None:
    """Writes the tokens allowed next into row [W] int32 (a C-contiguous row of a mask)."""
    self._fill(self.matcher, row)

  def _fill(self, matcher: llguidance.LLMatcher | None, row: np.ndarray) -> None:
    if matcher is None:
      row[:] = self._allowed
      return
    llg_numpy.fill_next_token_bitmask(matcher, row[None])
    if matcher.is_accepting():  # a stop id ends the sequence: allowed once the grammar is complete, and
      row |= self._stop  # not before, even where it is also text the grammar takes (a model's eos "ĠC", say)
    else:
      row &= ~self._stop
    row &= self._allowed

  def fill_along(self, tokens: list[int], rows: np.ndarray) -> int:
    """The masks of a verify step's positions (`qwenjax.engine.speculative`): rows[0] the tokens allowed next,
    rows[j] those allowed after tokens[:j], for as many of `tokens` (a proposal) as the constraint allows one after
    another, up to a stop id. Returns that count m: rows[0..m] are filled, the rest untouched. The sequence's own
    matcher does not move (a copy walks the proposal)."""
    self.fill(rows[0])
    matcher = None if self.matcher is None else self.matcher.deep_copy()
    m = 0
    while m < len(tokens):
      token = int(tokens[m])
      if not (rows[m][token >> 5] >> (token & 31)) & 1:
        break
      if matcher is not None and (not matcher.consume_token(token) or matcher.is_error()):
        break
      m += 1
      self._fill(matcher, rows[m])
      if (self._stop[token >> 5] >> (token & 31)) & 1:  # the sequence ends there
        break
    return m

  def admits(self, tokens: list[int]) -> int:
    """How many of `tokens`, from the first, the constraint allows one after another (`fill_along`)."""
    return self.fill_along(tokens, np.zeros((len(tokens) + 1, self._allowed.size), np.int32))

  def advance(self, token: int) -> bool:
    """Consumes a sampled token; False (and `error` set) if the grammar refuses it or its matcher has failed (a
    failed matcher's mask allows every token, and it may still "accept" one)."""
    if self.matcher is None or (self.matcher.consume_token(int(token)) and not self.matcher.is_error()):
      return True
    error = self.matcher.get_error()
    self.error = _first_line(error, 1) if error else f"token {token} is not allowed here"
    return False


class Grammars:
  """Compiles requests' constraints for one tokenizer and logit width, each distinct spec once."""

  def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int]):
    backend = tokenizer.backend
    self.vocab_size = vocab_size
    self.eos_token_ids = sorted(int(i) for i in eos_token_ids if 0 <= i < vocab_size)
    self._tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size,
                                             eos_token=self.eos_token_ids or None)
    real = [i for i in range(min(backend.get_vocab_size(with_added_tokens=True), vocab_size))
            if not _PAD_TOKEN.fullmatch(backend.id_to_token(i) or "")]
    self._real = pack_ids(real, vocab_size)  # [W]: ids a constrained row may ever sample
    self.tool_call_id = backend.token_to_id(TOOL_CALL)
    self.tool_call_end_id = backend.token_to_id(TOOL_CALL_END)
    # canonical spec -> llguidance grammar, or its error; the most recently used _MAX_COMPILED (a server meets
    # new schemas for as long as it runs)
    self._compiled: collections.OrderedDict[str, str | InputError] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.compiled = 0  # grammars compiled (distinct specs seen)

  # --- Specs --------------------------------------------------------------------------------------------

  def spec(self, request) -> dict[str, Any] | None:
    """What constrains `request` (its response_format, tools and tool_choice): None for nothing, else a
    JSON-able dict {"grammar": ..., "forbid": [ids]} whose grammar is compiled (cached); InputError naming
    the field at fault for a malformed or uncompilable one."""
    grammar = _response_grammar(request.response_format)
    forbid = []
    choice = request.tool_choice
    if choice is None or choice == "auto":
      pass
    elif choice == "none":
      if self.tool_call_id is not None:
        forbid.append(self.tool_call_id)
    elif choice == "required" or isinstance(choice, Mapping):
      if grammar is not None:
        raise InputError("response_format and tool_choice cannot both constrain a request; tool calls are "
                         "already JSON.")
      grammar = ("lark", self._tool_grammar(request.tools, _named_function(choice)))
    else:
      raise InputError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                       f"{{'name': ...}}}}, got {choice!r}.")
    if grammar is None and not forbid:
      return None
    spec = {"grammar": grammar, "forbid": forbid}
    if grammar is not None:
      self._grammar(grammar)
    return spec

  def constraint(self, spec: Mapping[str, Any], stop_ids: Iterable[int]) -> Constraint:
    """A fresh constraint for one sequence of a request whose `spec` is given, with its stop ids."""
    allowed = self._real.copy()
    if spec["forbid"]:
      allowed &= ~pack_ids(spec["forbid"], self.vocab_size)
    matcher = None
    if spec["grammar"] is not None:
      # A matcher that fails here (checked when compiled, so only a resource limit) fails its sequence's first
      # token: finish_reason GRAMMAR_ERROR, that request's error record, never an exception mid-job.
      matcher = llguidance.LLMatcher(self._tokenizer, self._grammar(spec["grammar"]), log_level=0)
    return Constraint(matcher, allowed, pack_ids(stop_ids, self.vocab_size))

  def _grammar(self, grammar: tuple[str, Any]) -> str:
    """The llguidance grammar of (kind, source), compiled and checked once; InputError if it is invalid. Safe from
    several threads (a server prepares requests off the thread that steps)."""
    key = json.dumps(grammar, sort_keys=True)
    with self._lock:
      if key not in self._compiled:
        self.compiled += 1
        self._compiled[key] = self._compile(*grammar)
        while len(self._compiled) > _MAX_COMPILED:
          self._compiled.popitem(last=False)
      self._compiled.move_to_end(key)
      found = self._compiled[key]
    if isinstance(found, InputError):
      raise found
    return found

  def _compile(self, kind: str, source: Any) -> str | InputError:
    try:
      if kind == "json_schema":
        text = llguidance.LLMatcher.grammar_from_json_schema(source, defaults=_JSON_LAYOUT)
      elif kind == "regex":
        text = llguidance.LLMatcher.grammar_from_regex(source)
      else:
        text = llguidance.LLMatcher.grammar_from_lark(source)
      problem = llguidance.LLMatcher.validate_grammar(text, self._tokenizer) or self._first_mask_problem(text)
    except (ValueError, TypeError) as e:
      problem = str(e)
    return InputError(f"invalid {_WHAT[kind]}: {_first_line(problem)}") if problem else text

  def _first_mask_problem(self, text: str) -> str | None:
    """Why a grammar that validates still cannot be used, found by computing its first mask once (a recursive
    $ref, say: its matcher fails there, and a mask of a failed matcher allows every token); None if it can. A
    grammar that fails only later (a lexer limit met after some tokens) ends its sequence with GRAMMAR_ERROR."""
    matcher = llguidance.LLMatcher(self._tokenizer, text, log_level=0)
    if not matcher.is_error():
      llg_numpy.fill_next_token_bitmask(matcher, np.zeros((1, words(self.vocab_size)), np.int32))
    return f"it cannot be used ({_first_line(matcher.get_error(), 1)})" if matcher.is_error() else None

  def _tool_grammar(self, tools: Any, name: str | None) -> str:
    """Lark text of tool-call blocks: one call of `name`, or (None) one or more calls of any listed tool."""
    if not tools:
      raise InputError("tool_choice 'required' or a named function needs a non-empty 'tools' list.")
    if self.tool_call_id is None or self.tool_call_end_id is None:
      raise InputError(f"this tokenizer has no {TOOL_CALL} / {TOOL_CALL_END} tokens to enforce tool calls with.")
    functions = {}
    for i, tool in enumerate(tools):
      fn = tool.get("function") if isinstance(tool, Mapping) else None
      if not (isinstance(fn, Mapping) and isinstance(fn.get("name"), str) and fn["name"]):
        raise InputError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                         "{...}}}}.")
      params = fn.get("parameters") or {"type": "object"}
      if not isinstance(params, Mapping):
        raise InputError(f"tools[{i}] ({fn['name']}): parameters must be a JSON schema object.")
      functions[fn["name"]] = params
    if name is not None:
      if name not in functions:
        raise InputError(f"tool_choice names function {name!r}, which is not in tools ({', '.join(functions)}).")
      functions = {name: functions[name]}
    calls = [{"type": "object", "properties": {"name": {"const": f}, "arguments": p},
              "required": ["name", "arguments"], "additionalProperties": False} for f, p in functions.items()]
    body = dict(calls[0] if len(calls) == 1 else {"anyOf": calls}, **{"x-guidance": _JSON_LAYOUT})
    repeat = "" if name is not None else ' ("\\n" call)*'
    # A trailing newline may end the turn: Qwen2.5 models write "</tool_call>\n" and then end-of-sequence.
    return (f'start: call{repeat} "\\n"?\n'
            f'call: <[{self.tool_call_id}]> "\\n" body "\\n" <[{self.tool_call_end_id}]>\n'
            f"body: %json {json.dumps(body)}\n")


_WHAT = {"json_schema": "JSON schema", "regex": "regex", "lark": "Lark grammar"}


def _first_line(text: str, count: int = 2) -> str:
  """The first `count` non-blank lines of a matcher's or compiler's message, joined (llguidance appends the whole
  grammar to some)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return "; ".join(lines[:count]) if lines else "unknown error"


def _named_function(choice) -> str | None:
  """None for "required"; the function name of {"type": "function", "function": {"name": ...}}."""
  if choice == "required":
    return None
  fn = choice.get("function")
  if choice.get("type") != "function" or not (isinstance(fn, Mapping) and isinstance(fn.get("name"), str)):
    raise InputError(f"a named tool_choice must be {{'type': 'function', 'function': {{'name': ...}}}}, got "
                     f"{dict(choice)!r}.")
  return fn["name"]


def _response_grammar(fmt: Any) -> tuple[str, Any] | None:
  """(kind, source) of a response_format: ("json_schema", schema) | ("regex", r) | ("lark", text) | None."""
  if fmt is None:
    return None
  if not isinstance(fmt, Mapping):
    raise InputError(f"response_format must be an object with a 'type', got {type(fmt).__name__}.")
  kind = fmt.get("type")
  if kind == "text":
    return None
  if kind == "json_object":
    return "json_schema", {"type": "object"}
  if kind == "json_schema":
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if schema is None and isinstance(spec, Mapping) and "name" in spec:
      schema = {}  # OpenAI: a json_schema without a schema is any JSON
    if not isinstance(schema, (Mapping, bool)):
      raise InputError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}.")
    return "json_schema", schema
  if kind in ("regex", "grammar"):
    source = fmt.get(kind)
    if not isinstance(source, str) or not source:
      raise InputError(f"response_format type {kind!r} needs a non-empty string {kind!r}.")
    return ("regex" if kind == "regex" else "lark"), source
  raise InputError(f"response_format type {kind!r} is not one of text, json_object, json_schema, regex, grammar.")
