"""Qwen2.5 tokenization and chat templating, with the Hugging Face `tokenizers` library underneath.

    tok = Tokenizer.from_directory("Qwen2.5-0.5B-Instruct")   # or Tokenizer.from_gguf("model.gguf")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    stream = tok.stream()
    text = "".join(stream.add(i) for i in generated_ids) + stream.flush()

Chat templates are rendered the way transformers renders them (a sandboxed jinja2 environment with
trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a `tojson` that does
not escape HTML or non-ASCII), so a prompt is byte-identical to `AutoTokenizer.apply_chat_template`.

A GGUF carries no tokenizer.json, only llama.cpp's description of one; `from_gguf` rebuilds Qwen2's
byte-level BPE from it: NFC normalization, Qwen2's split regex, byte-to-unicode mapping, BPE merges,
and the control tokens (`<|im_start|>`, `<|endoftext|>`, ...) matched whole before any of that.
"""

from __future__ import annotations

import collections.abc
import datetime
import json
import os
import pathlib
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from qwenjax._errors import CheckpointError, ConfigError, InputError

if TYPE_CHECKING:
  from qwenjax.checkpoints.gguf_file import GGUFCheckpoint

# Qwen2's pre-tokenizer split, as in its tokenizer.json and transformers' Qwen2Tokenizer: English
# contractions, letter runs with one optional leading non-letter, single digits, punctuation runs
# with trailing newlines, newline runs, and whitespace (keeping the last space for the next word).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values (llama.cpp's names) whose vocabularies were learned with that split.
_GGUF_SPLITS = {"qwen2": QWEN2_SPLIT_REGEX, "deepseek-r1-qwen": QWEN2_SPLIT_REGEX}

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Named special tokens a chat template can read, as transformers passes them.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Variables `apply_chat_template` sets itself.
_RESERVED_TEMPLATE_NAMES = frozenset({"messages", "tools", "add_generation_prompt"})
# Names a message's reasoning arrives under; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
  """A byte-level BPE tokenizer with its chat template, special tokens and end-of-sequence ids."""

  # Bounds on one rendering of the chat template, which comes with the checkpoint and is not trusted to end.
  render_seconds: float = 10.0
  render_max_chars: int = 10_000_000

  def __init__(
      self,
      backend: tokenizers.Tokenizer,
      chat_template: str | None,
      special_tokens: Mapping[str, str | None],
      eos_token_ids: Sequence[int],
      source: str,
      *,
      template_source: str | None = None,
  ):
    """Wraps a built `tokenizers.Tokenizer`; most callers want `from_directory` or `from_gguf`.

    Args:
      backend: the tokenizer proper.
      chat_template: jinja2 source of the chat template, or None.
      special_tokens: bos_token / eos_token / pad_token / unk_token strings (None where absent),
        passed to the chat template as variables.
      eos_token_ids: every id that ends generation, in order of preference.
      source: what the tokenizer came from, for messages.
      template_source: where the chat template came from, for messages (default: `source`).
    """
    self._backend = backend
    self._chat_template = chat_template
    self._special_tokens = dict(special_tokens)
    self._eos_token_ids = list(dict.fromkeys(int(i) for i in eos_token_ids))
    self.source = source
    self._template_source = template_source or source
    self._compiled: jinja2.Template | None = None

  def __repr__(self) -> str:
    return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

  # --- Construction ------------------------------------------------------------------------------

  @classmethod
  def from_directory(cls, path: str | os.PathLike[str]) -> Tokenizer:
    """Loads a Hugging Face checkpoint directory's tokenizer.

    Reads `tokenizer.json` (required); the chat template from `chat_template.jinja`, else
    `tokenizer_config.json`'s "chat_template" (a string, or a list of {name, template} of which
    "default" is used), else a processor's `chat_template.json`; the special tokens from
    `tokenizer_config.json`; and the end-of-sequence ids from `generation_config.json`,
    `config.json` and the eos token, in that order.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
      raise CheckpointError(f"Tokenizer directory {directory} does not exist.")
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
      raise CheckpointError(f"{tokenizer_file} is missing; qwenjax builds the tokenizer from it.")
    try:
      backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # The Rust side raises plain Exception subclasses.
      raise CheckpointError(f"{tokenizer_file} is not a valid tokenizers file ({_first_line(e)}).") from None

    config = _read_json(directory / "tokenizer_config.json") or {}
    special_tokens = {}
    for name in _SPECIAL_TOKEN_NAMES:
      value = config.get(name)
      if isinstance(value, Mapping):  # A serialized AddedToken.
        value = value.get("content")
      if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{directory / 'tokenizer_config.json'} has {name} = {value!r}; expected a string.")
      special_tokens[name] = value

    chat_template, template_source = _directory_chat_template(directory, config)

    eos_ids: list[int] = []
    for file_name in ("generation_config.json", "config.json"):
      value = (_read_json(directory / file_name) or {}).get("eos_token_id")
      values = value if isinstance(value, list) else [value]
      if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
        raise CheckpointError(
            f"{directory / file_name} has eos_token_id = {value!r}; expected an int or a list of ints.")
      eos_ids.extend(v for v in values if v is not None)
    if special_tokens["eos_token"] is not None:
      eos_id = backend.token_to_id(special_tokens["eos_token"])
      if eos_id is None:
        raise CheckpointError(
            f"{directory / 'tokenizer_config.json'} names eos_token {special_tokens['eos_token']!r}, "
            f"which {tokenizer_file.name} does not know."
        )
      eos_ids.append(eos_id)
    return cls(backend, chat_template, special_tokens, eos_ids, str(directory), template_source=template_source)

  @classmethod
  def from_gguf(cls, source: str | os.PathLike[str] | GGUFCheckpoint) -> Tokenizer:
    """Rebuilds the tokenizer described by a GGUF file's `tokenizer.*` metadata.

    Args:
      source: a GGUF path, or an open `qwenjax.checkpoints.gguf_file.GGUFCheckpoint`.
    """
    from qwenjax.checkpoints.gguf_file import GGUFCheckpoint  # pylint: disable=g-import-not-at-top

    if isinstance(source, GGUFCheckpoint):
      return _tokenizer_from_gguf_metadata(cls, source.metadata, str(source.path))
    with GGUFCheckpoint(source) as checkpoint:
      return _tokenizer_from_gguf_metadata(cls, checkpoint.metadata, str(checkpoint.path))

  def save(self, directory: str | os.PathLike[str], generation_config: Mapping[str, Any] | None = None) -> None:
    """Writes what `from_directory` reads back into an equal tokenizer: tokenizer.json, tokenizer_config.json
    (special tokens, chat template) and generation_config.json (every end-of-sequence id, in order).

    Args:
      directory: where to write (created if missing); existing files of those names are replaced.
      generation_config: other generation_config.json fields to keep (a checkpoint's sampling defaults).
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self._backend.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = dict(self._special_tokens)
    if self._chat_template is not None:
      config["chat_template"] = self._chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
    generation = {**(generation_config or {}), "eos_token_id": self.eos_token_ids}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

  # --- Vocabulary --------------------------------------------------------------------------------

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer`."""
    return self._backend

  @property
  def vocab_size(self) -> int:
    """How many ids the tokenizer knows, added tokens included (may be below the model's vocab)."""
    return self._backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._backend.token_to_id(token)

  @property
  def eos_token_ids(self) -> list[int]:
    """Every id that ends generation, e.g. [<|im_end|>, <|endoftext|>] for Qwen2.5 instruct models."""
    return list(self._eos_token_ids)

  @property
  def pad_token_id(self) -> int | None:
    pad = self._special_tokens.get("pad_token")
    return None if pad is None else self._backend.token_to_id(pad)

  @property
  def special_tokens(self) -> dict[str, str | None]:
    return dict(self._special_tokens)

  @property
  def chat_template(self) -> str | None:
    return self._chat_template

  # --- Text <-> ids -------------------------------------------------------------------------------

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; special tokens written in the text (like `<|im_start|>`) stay whole."""
    if not isinstance(text, str):
      raise InputError(f"Tokenizer.encode takes a str, not {type(text).__name__}.")
    return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
    """The text of `ids`; ids the tokenizer does not know decode to nothing, as in transformers."""
    ids = [int(i) for i in ids]
    try:
      return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
    except OverflowError:
      bad = next(i for i in ids if not 0 <= i < 2**32)
      raise InputError(f"Tokenizer.decode got {bad}, which is not a token id.") from None

  def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
    """An incremental decoder for ids arriving one at a time (see `StreamDecoder`)."""
    return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

  # --- Chat ---------------------------------------------------------------------------------------

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, Any]],
      tools: Sequence[Mapping[str, Any]] | None = None,
      add_generation_prompt: bool = True,
      tokenize: bool = False,
      **extra: Any,
  ) -> str | list[int]:
    """Renders a conversation into the prompt text (or its ids) with the chat template.

    Args:
      messages: [{"role": ..., "content": ..., "tool_calls": ...}, ...]; keys set to None are dropped.
      tools: JSON schemas of the callable functions ({"type": "function", "function": {...}}).
      add_generation_prompt: end with the header of an assistant turn, for the model to continue.
      tokenize: return ids (encoded without adding special tokens) instead of text.
      **extra: more template variables, e.g. `documents` or `enable_thinking`.

    Raises:
      ConfigError: there is no chat template, or it is broken (syntax, sandbox violation).
      InputError: the messages are malformed, or the template rejects them (`raise_exception`).
    """
    template = self._template()
    clash = _RESERVED_TEMPLATE_NAMES & extra.keys()
    if clash:
      raise InputError(f"apply_chat_template sets {sorted(clash)[0]!r} itself; pass it as its own argument.")
    variables = {name: value for name, value in self._special_tokens.items() if value is not None}
    variables.update(_plain(extra))
    variables.setdefault("documents", None)
    budget = _RenderBudget(self.render_seconds, self.render_max_chars)
    variables["range"] = budget.range
    chunks = []
    try:
      for chunk in template.generate(messages=_template_messages(messages), tools=_template_tools(tools),
                                     add_generation_prompt=add_generation_prompt, **variables):
        budget.spend(len(chunk))
        chunks.append(chunk)
    except _RenderLimitExceeded:
      raise ConfigError(f"The chat template of {self._template_source} exceeded the render limit "
                        f"({self.render_max_chars:,} characters / {self.render_seconds:g} s).") from None
    except _TemplateRaised as e:
      raise InputError(f"The chat template of {self._template_source} rejects these messages: "
                       f"{_sentence(e.message)}") from None
    except jinja2.exceptions.SecurityError as e:
      raise ConfigError(f"The chat template of {self._template_source} does something the sandbox forbids"
                        f"{_at_line(e)}: {_sentence(e)}") from None
    except InputError:
      raise
    except Exception as e:  # UndefinedError, TypeError, ...: the template met data it cannot handle.
      raise InputError(f"The chat template of {self._template_source} failed on these messages{_at_line(e)} "
                       f"({type(e).__name__}: {_clause(e)}).") from None
    text = "".join(chunks)
    return self.encode(text, add_special_tokens=False) if tokenize else text

  def _template(self) -> jinja2.Template:
    if self._chat_template is None:
      raise ConfigError(f"{self.source} has no chat template, so apply_chat_template cannot build a prompt.")
    if self._compiled is None:
      try:
        self._compiled = _template_environment().from_string(self._chat_template)
      except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"The chat template of {self._template_source} has a syntax error at line "
                          f"{e.lineno}: {_sentence(e.message)}") from None
    return self._compiled


class StreamDecoder:
  """Turns ids arriving one at a time into text, never splitting a UTF-8 character.

  Byte-level BPE can spread one character over several tokens (an emoji is often 2-4), and decoding
  such a prefix yields U+FFFD. `add` therefore decodes a small window of recent ids and returns only
  the new text once it no longer ends in U+FFFD; `flush` returns whatever is still held back.
  """

  def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
    self._tokenizer = tokenizer
    self._skip = skip_special_tokens
    self._ids: list[int] = []  # Ids since the last emitted character boundary.
    self._emitted = 0  # How many of `_ids` have been emitted as text.

  def add(self, token_id: int) -> str:
    """Takes the next id; returns the text it completes ("" while a character is still partial)."""
    self._ids.append(int(token_id))
    done = self._decode(self._ids[:self._emitted])
    text = self._decode(self._ids)
    if len(text) <= len(done) or text.endswith("\ufffd"):
      return ""
    # Every id so far is now text; the emitted ones drop out of the window, the rest stay as context.
    self._ids = self._ids[self._emitted:]
    self._emitted = len(self._ids)
    return text[len(done):]

  def flush(self) -> str:
    """Returns the held-back text (a truly incomplete character as U+FFFD) and resets."""
    done = self._decode(self._ids[:self._emitted])
    text = self._decode(self._ids)
    self._ids, self._emitted = [], 0
    return text[len(done):]

  def _decode(self, ids: list[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""


# --- GGUF --------------------------------------------------------------------------------------------


def _tokenizer_from_gguf_metadata(cls: type[Tokenizer], meta: Mapping[str, Any], where: str) -> Tokenizer:
  """Builds Qwen2's byte-level BPE tokenizer from llama.cpp's tokenizer.* metadata."""
  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ConfigError(
        f"{where} has tokenizer.ggml.model {model!r}; qwenjax reads only byte-level BPE ('gpt2') GGUF tokenizers.")
  pre = meta.get("tokenizer.ggml.pre")
  if pre not in _GGUF_SPLITS:
    raise ConfigError(
        f"{where} has tokenizer.ggml.pre {pre!r}; qwenjax knows the pre-tokenizers {sorted(_GGUF_SPLITS)}.")
  tokens = meta.get("tokenizer.ggml.tokens")
  merges = meta.get("tokenizer.ggml.merges")
  if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or not tokens:
    raise ConfigError(f"{where} has no tokenizer.ggml.tokens list of strings.")
  if not isinstance(merges, list):
    raise ConfigError(f"{where} has no tokenizer.ggml.merges list, which a BPE tokenizer needs.")
  token_types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
  if not isinstance(token_types, list) or len(token_types) != len(tokens):
    raise ConfigError(f"{where} has a tokenizer.ggml.token_type list that does not match its {len(tokens)} tokens.")

  vocab: dict[str, int] = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)
  pairs = []
  for i, merge in enumerate(merges):
    pair = merge.split(" ") if isinstance(merge, str) else ()
    if len(pair) != 2:
      raise ConfigError(f"{where} has tokenizer.ggml.merges[{i}] = {merge!r}, not two tokens joined by one space.")
    pairs.append(tuple(pair))
  try:
    bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False, dropout=None)
  except Exception as e:  # e.g. a merge of tokens missing from the vocabulary.
    raise ConfigError(
        f"{where}'s tokenizer.ggml.tokens and merges do not form a BPE vocabulary ({_first_line(e)}).") from None
  backend = tokenizers.Tokenizer(bpe)
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_GGUF_SPLITS[pre]), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  backend.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, <|endoftext|>, FIM and vision markers) are special: matched whole,
  # dropped by skip_special_tokens. User-defined ones (<tool_call>, </tool_call>) are matched whole
  # but kept as text, as in Qwen's tokenizer.json, so tool calls survive skip_special_tokens.
  backend.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, token_types) if kind == _CONTROL
  ])
  backend.add_tokens([
      tokenizers.AddedToken(t, special=False, normalized=False)
      for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED
  ])

  special_tokens: dict[str, str | None] = {}
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < len(tokens)):
      raise ConfigError(f"{where} has tokenizer.ggml.{key} {token_id!r}, not an id below {len(tokens)}.")
    special_tokens[name] = None if token_id is None else tokens[token_id]

  edges = []
  for flag, name in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
    if meta.get(f"tokenizer.ggml.{flag}", False) and special_tokens[name] is not None:
      edges.append((name, special_tokens[name]))
  if edges:
    bos = [t for n, t in edges if n == "bos_token"]
    eos = [t for n, t in edges if n == "eos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(bos + ["$A"] + eos),
        pair=" ".join(bos + ["$A"] + eos + bos + ["$B"] + eos),
        special_tokens=[(t, vocab[t]) for _, t in edges],
    )
  else:
    backend.post_processor = processors.ByteLevel(trim_offsets=False)

  # A GGUF records one eos id (<|im_end|> for instruct models), but Qwen's generation_config.json
  # stops on both <|im_end|> (end of a chat turn) and <|endoftext|> (end of a document, which base
  # models and FIM completions emit), and llama.cpp treats both as end-of-generation too.
  eos_ids = [] if meta.get("tokenizer.ggml.eos_token_id") is None else [meta["tokenizer.ggml.eos_token_id"]]
  eos_ids += [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]

  template = meta.get("tokenizer.chat_template")
  if template is not None and not isinstance(template, str):
    raise ConfigError(f"{where} has a tokenizer.chat_template that is not a string.")
  return cls(backend, template, special_tokens, eos_ids, where, template_source=f"{where} (tokenizer.chat_template)")


# --- Hugging Face directories --------------------------------------------------------------------


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  """A JSON object file's contents, or None if the file is absent."""
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError) as e:
    raise CheckpointError(f"Cannot read {path} ({_first_line(e)}).") from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}).") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object.")
  return value


def _directory_chat_template(directory: pathlib.Path, config: Mapping[str, Any]) -> tuple[str | None, str | None]:
  """(template, where it came from) for a Hugging Face directory, or (None, None)."""
  jinja_file = directory / "chat_template.jinja"
  if jinja_file.is_file():
    try:
      return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    except (OSError, UnicodeDecodeError) as e:
      raise CheckpointError(f"Cannot read {jinja_file} ({_first_line(e)}).") from None
  config_file = directory / "tokenizer_config.json"
  template = config.get("chat_template")
  if template is None:
    processor = _read_json(directory / "chat_template.json") or {}
    template, config_file = processor.get("chat_template"), directory / "chat_template.json"
    if template is None:
      return None, None
  if isinstance(template, list):  # Named templates: [{"name": "default", "template": ...}, ...].
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    if not isinstance(named.get("default"), str):
      raise CheckpointError(f"{config_file} lists chat templates {sorted(map(str, named))} but none named 'default'.")
    return named["default"], f"{config_file} (chat_template 'default')"
  if not isinstance(template, str):
    raise CheckpointError(f"{config_file} has a chat_template that is neither a string nor a list of named templates.")
  return template, f"{config_file} (chat_template)"


# --- Template rendering ----------------------------------------------------------------------------


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
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > Tokenizer.render_max_chars:
          raise _RenderLimitExceeded
    return super().call_binop(context, operator, left, right)


def _template_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
  return env


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
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is not None:  # Offer it under the names templates read, as transformers does.
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def _template_tools(tools: Any) -> list[Any] | None:
  if tools is None:
    return None
  if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
    raise InputError(f"tools must be a list of JSON schema dicts, not a {type(tools).__name__}.")
  for i, tool in enumerate(tools):
    if not isinstance(tool, Mapping):
      raise InputError(f"tools[{i}] is a {type(tool).__name__}, not a JSON schema dict.")
  return _plain(list(tools))


# --- Messages --------------------------------------------------------------------------------------


def _first_line(error: BaseException | str) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


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
