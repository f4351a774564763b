"""Qwen2.5 tokenization and chat templating, with the Hugging Face `tokenizers` library underneath.

    tok = Tokenizer.from_directory("Qwen2.5-0.5B-Instruct")   # or GGUFCheckpoint("model.gguf").tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    stream = tok.stream()
    text = "".join(stream.add(i) for i in generated_ids) + stream.flush()

Chat templates are rendered by `qwenjax.text.chat_template` (transformers' sandboxed environment, so a prompt is
byte-identical to `AutoTokenizer.apply_chat_template`, with a time and output budget). A GGUF file's vocabulary
is rebuilt by `qwenjax.text.gguf_vocab` from the file's metadata, which `from_gguf` takes.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

from qwenjax._errors import CheckpointError, ConfigError, InputError, first_line
from qwenjax.config import read_json
from qwenjax.text import gguf_vocab
from qwenjax.text.chat_template import RENDER_MAX_CHARS, RENDER_SECONDS, ChatTemplate

# `Tokenizer.count_tokens` tokenizes a long text in pieces of about this many characters (bounded memory), and takes
# this many tokens off per piece it had to cut inside a word (a cut there may split a token, or an added token
# such as <|im_start|>, into several), so that its count never exceeds the whole text's.
PIECE_CHARS = 1 << 16
_HARD_CUT_SLACK = 32

# Named special tokens a chat template can read, as transformers passes them.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Variables `apply_chat_template` sets itself.
_RESERVED_TEMPLATE_NAMES = frozenset({"messages", "tools", "add_generation_prompt"})


class Tokenizer:
  """A byte-level BPE tokenizer with its chat template, special tokens and end-of-sequence ids."""

  # Bounds on one rendering of the chat template, which comes with the checkpoint and is not trusted to end.
  render_seconds: float = RENDER_SECONDS
  render_max_chars: int = RENDER_MAX_CHARS

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
    self._compiled: ChatTemplate | None = None

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
      raise CheckpointError(f"{tokenizer_file} is not a valid tokenizers file ({first_line(e)}).") from None

    config = read_json(directory / "tokenizer_config.json", error=CheckpointError, optional=True) or {}
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
      value = (read_json(directory / file_name, error=CheckpointError, optional=True) or {}).get("eos_token_id")
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
  def from_gguf(cls, metadata: Mapping[str, Any], source: str) -> Tokenizer:
    """Rebuilds the tokenizer that a GGUF file's `tokenizer.*` metadata describes (`qwenjax.text.gguf_vocab`).

    Args:
      metadata: the file's metadata, e.g. `qwenjax.checkpoints.gguf_file.GGUFCheckpoint.metadata`; from a path,
        `GGUFCheckpoint(path).tokenizer()` does this.
      source: the file, for messages.
    """
    vocab = gguf_vocab.vocabulary(metadata, source)
    return cls(vocab.backend, vocab.chat_template, vocab.special_tokens, vocab.eos_token_ids, source,
               template_source=f"{source} (tokenizer.chat_template)")

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

  def count_tokens(self, text: str, stop_after: int) -> int:
    """How many tokens `text` holds (no special tokens added), counted in pieces of about PIECE_CHARS characters,
    so that memory stays bounded whatever its size, and stopping as soon as the count passes `stop_after` (so a
    text far over a bound costs about that many tokens to refuse). A piece ends before a space that follows a
    non-space and precedes one (" word"), where a byte-level BPE pre-tokenizer splits the text anyway: the count
    is then the whole text's. A piece without such a space is cut where it must be, and _HARD_CUT_SLACK tokens
    are taken off for that cut: the count never exceeds the whole text's."""
    count, start, n = 0, 0, len(text)
    while start < n and count <= stop_after:
      end, slack = min(n, start + PIECE_CHARS), 0
      if end < n:
        cut = _word_start(text, start + PIECE_CHARS // 2, end)
        end, slack = (end, _HARD_CUT_SLACK) if cut is None else (cut, 0)
      count += len(self._backend.encode(text[start:end], add_special_tokens=False).ids) - slack
      start = end
    return max(count, 0)

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
    variables.update(extra)
    text = template.render(messages, tools, add_generation_prompt=add_generation_prompt, variables=variables,
                           seconds=self.render_seconds, max_chars=self.render_max_chars)
    return self.encode(text, add_special_tokens=False) if tokenize else text

  def _template(self) -> ChatTemplate:
    if self._chat_template is None:
      raise ConfigError(f"{self.source} has no chat template, so apply_chat_template cannot build a prompt.")
    if self._compiled is None:
      self._compiled = ChatTemplate(self._chat_template, self._template_source)
    return self._compiled


def _word_start(text: str, lo: int, hi: int) -> int | None:
  """The last i in (lo, hi) where text[i] is a space between a non-space and a non-space, or None."""
  i = text.rfind(" ", lo, hi)
  while i > lo and (text[i - 1].isspace() or i + 1 >= len(text) or text[i + 1].isspace()):
    i = text.rfind(" ", lo, i)
  return i if i > lo else None


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


# --- Hugging Face directories --------------------------------------------------------------------


def _directory_chat_template(directory: pathlib.Path, config: Mapping[str, Any]) -> tuple[str | None, str | None]:
  """(template, where it came from) for a Hugging Face directory, or (None, None)."""
  jinja_file = directory / "chat_template.jinja"
  if jinja_file.is_file():
    try:
      return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    except (OSError, UnicodeDecodeError) as e:
      raise CheckpointError(f"Cannot read {jinja_file} ({first_line(e)}).") from None
  config_file = directory / "tokenizer_config.json"
  template = config.get("chat_template")
  if template is None:
    processor = read_json(directory / "chat_template.json", error=CheckpointError, optional=True) or {}
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
