"""Qwen2's byte-level BPE tokenizer rebuilt from a GGUF file's `tokenizer.*` metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the token list, their types, the BPE
merges, the pre-tokenizer's name and the special token ids. `vocabulary(metadata, where)` rebuilds from it what
tokenizer.json would hold: NFC normalization, Qwen2's split regex, byte-to-unicode mapping, BPE merges, and the
control tokens (`<|im_start|>`, `<|endoftext|>`, ...) matched whole before any of that.

The metadata is a plain mapping (`qwenjax.checkpoints.gguf_file.GGUFCheckpoint.metadata`), so this module reads
no file: `GGUFCheckpoint.tokenizer()` is the way from a GGUF path to a `Tokenizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from qwenjax._errors import ConfigError, first_line

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


class Vocabulary(NamedTuple):
  """What a `qwenjax.text.tokenizer.Tokenizer` is built from."""

  backend: tokenizers.Tokenizer
  chat_template: str | None
  special_tokens: dict[str, str | None]  # bos_token, eos_token, unk_token, pad_token
  eos_token_ids: list[int]


def vocabulary(meta: Mapping[str, Any], where: str) -> Vocabulary:
  """Builds Qwen2's byte-level BPE tokenizer from llama.cpp's tokenizer.* metadata.

  Args:
    meta: the GGUF file's metadata, key -> value.
    where: the file, for messages.

  Raises:
    ConfigError: the metadata describes a tokenizer qwenjax does not read, or is malformed.
  """
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
        f"{where}'s tokenizer.ggml.tokens and merges do not form a BPE vocabulary ({first_line(e)}).") from None
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
  return Vocabulary(backend, template, special_tokens, eos_ids)
