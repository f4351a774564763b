"""A batch job's input lines: each non-blank line of its JSONL files, read as bytes, keyed, and parsed into an
`InputLine`, or into the error that line's record will carry. Nothing a line holds stops the job.

    ids = job_input.scan_input(inputs)                   # every id once, before decoding: duplicates are an error
    for line in job_input.read_input(inputs, share=(rank, count), keyed_by_path=jobs.keyed_by_path(values)):
      if line.error: ...                                 # answered by an error record, keyed like any line
      else: ...                                          # line.obj: the request object (`line.openai`: its format)

An input line is one line of a JSONL file: a JSON object, either a simple request ({"id", "prompt" or "messages",
...}) or an OpenAI Batch line ({"custom_id", "method", "url", "body"}). A UTF-8 byte-order mark at the start of a
file is skipped; blank lines are not lines (but count in a multi-host run's share of positions). Its key, the id
that its result record answers, is its "custom_id" (an OpenAI Batch line), else its "id", else "line-N"
("<path>:line-N" when the job is keyed by path: a glob or several inputs). Two lines with one key (as
`jobs.record_key` compares them) stop the job before decoding (`scan_input`), unless the later ones are skipped.

The errors a line records (InputLine.error, one line naming "<path>:<number>", and InputLine.code):
  invalid_json     not valid UTF-8 (the byte and its column); malformed JSON (the reason and its column, or a
                   nesting deeper than `_files.MAX_JSON_DEPTH`); a JSON value that is not an object.
  invalid_request  an "id" or "custom_id" that is not a string or an integer; a line over --max_line_bytes
                   (MAX_LINE_BYTES by default), which is read past in chunks and never held whole.
A line that cannot be parsed whole (too deep, too long) is still keyed by its id when a cheap, linear look at its
top level (`_cheap_key`) finds one, and answered as an OpenAI Batch line when that look finds a "custom_id".
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from absl import logging

from qwenjax import _files
from qwenjax._errors import InputError
from qwenjax.engine import openai_batch
from qwenjax.engine.jobs import record_key


@dataclasses.dataclass(frozen=True)
class InputLine:
  """One non-blank input line: line `number` of file `path`. key: its "custom_id" (an OpenAI Batch line) or "id",
  else "line-N" ("<path>:line-N" in a job keyed by path: a glob or several inputs); obj: the request object, or
  None with `error` saying why the line cannot be served (and `code`, its kind: invalid_json, invalid_request).
  batch_format: for a line that could not be parsed whole (nested too deep, over --max_line_bytes), whether a
  cheap look at its top level found a "custom_id" (its error is then recorded as an OpenAI Batch line)."""

  number: int
  key: Any
  obj: dict[str, Any] | None
  error: str | None = None
  path: str = ""
  code: str | None = None
  batch_format: bool = False

  @property
  def where(self) -> str:
    """How error messages name the line: "<path>:<number>"."""
    return f"{self.path}:{self.number}" if self.path else f"line {self.number}"

  @property
  def openai(self) -> bool:
    """Whether the line is in the OpenAI Batch format (answered in its output format)."""
    return openai_batch.is_batch_line(self.obj) if self.obj is not None else self.batch_format


# A line longer than this (bytes, its newline not counted) is an error record, read past in chunks, never whole:
# memory per line stays bounded (batch_generate --max_line_bytes).
MAX_LINE_BYTES = 8 << 20
_SKIP_CHUNK = 1 << 20  # how much of an overlong line is in memory at once while it is read past
_KEY_PREFIX = 1 << 16  # how much of a line that cannot be parsed whole is searched for its id
_INTERESTING = re.compile(r'["\[\]{}]')


def _default_key(number: int, path: str, keyed_by_path: bool) -> str:
  return f"{path}:line-{number}" if keyed_by_path else f"line-{number}"


def _where(number: int, path: str) -> str:
  return f"{path}:{number}" if path else f"line {number}"


def parse_input_line(raw: bytes, number: int, path: str = "", keyed_by_path: bool = False) -> InputLine:
  """One line's bytes (BOM already removed) -> InputLine; never raises for bad content. JSON nested deeper than
  `_files.MAX_JSON_DEPTH` is that line's error (keyed by its id if a cheap look at its top level finds one)."""
  key: Any = _default_key(number, path, keyed_by_path)
  where = _where(number, path)

  def failed(message: str, code: str = "invalid_json") -> InputLine:
    return InputLine(number, key, None, f"{where}: {message}", path, code)

  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    # Still key the error by the line's id when the rest of it parses.
    try:
      obj = _files.loads(raw.decode("utf-8", "replace"))
      key = _line_id(obj, key)[0] if isinstance(obj, dict) else key
    except ValueError:
      pass
    return failed(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}).")
  try:
    obj = _files.loads(text)
  except _files.JSONDepthError as e:
    key, batch_format = _cheap_key(text[:_KEY_PREFIX], key)
    return dataclasses.replace(failed(f"malformed JSON ({_files.describe(e)})."), key=key, batch_format=batch_format)
  except json.JSONDecodeError as e:
    return failed(f"malformed JSON ({e.msg} at column {e.colno}).")
  if not isinstance(obj, dict):
    return failed(f"expected a JSON object, got {_json_type(obj)}.")
  key, field = _line_id(obj, key)
  if field is not None and _valid_id(obj[field], None) is None:
    return failed(f"'{field}' must be a string or an integer, got {_json_type(obj[field])}.", "invalid_request")
  return InputLine(number, key, obj, None, path)


def overlong_line(head: bytes, size: int, number: int, path: str = "", keyed_by_path: bool = False,
                  max_line_bytes: int = MAX_LINE_BYTES) -> InputLine:
  """The error of a line of `size` bytes, over `max_line_bytes`, of which `head` (its first bytes) was kept: keyed
  by its id if a cheap look at `head` finds one at the top level, else by its line."""
  key, batch_format = _cheap_key(head[:_KEY_PREFIX].decode("utf-8", "replace"),
                                 _default_key(number, path, keyed_by_path))
  return InputLine(number, key, None, f"{_where(number, path)}: {size} bytes, over --max_line_bytes={max_line_bytes}.",
                   path, "invalid_request", batch_format)


def _cheap_key(text: str, default: Any) -> tuple[Any, bool]:
  """(key, whether it is an OpenAI Batch line) of a line that cannot be parsed whole, as `_line_id` would key it:
  its top-level "custom_id" or "id" where `text` (a prefix of the line) shows one, else `default`. Linear in
  `text`, with no recursion: brackets are counted, strings skipped."""
  pos = len(text) - len(text.lstrip())
  if not text.startswith("{", pos):
    return default, False
  depth, found = 0, {}
  while (m := _INTERESTING.search(text, pos)) is not None:
    pos = m.start()
    if m.group() == '"':
      string = _files.JSON_STRING.match(text, pos)
      if string is None:  # cut off inside a string: nothing after it can be trusted
        break
      pos = string.end()
      if depth == 1 and string.group() in ('"id"', '"custom_id"'):
        colon = pos + len(text[pos:pos + 64]) - len(text[pos:pos + 64].lstrip())
        if text.startswith(":", colon):
          found.setdefault(string.group()[1:-1], _scalar_at(text, colon + 1))
      continue
    depth += 1 if m.group() in "[{" else -1
    pos += 1
    if depth == 0:
      break
  field = "custom_id" if "custom_id" in found else "id" if "id" in found else None
  return (default if field is None else _valid_id(found[field], default)), field == "custom_id"


def _scalar_at(text: str, pos: int) -> Any:
  """The JSON string or number at text[pos] (blanks skipped), or None for anything else."""
  try:
    value, _ = _files.raw_decode(text[:pos + _KEY_PREFIX], pos)
  except ValueError:
    return None
  return value if isinstance(value, (str, int, float)) else None


def _line_id(obj: dict, default: Any) -> tuple[Any, str | None]:
  """(the line's key, the field it comes from): an OpenAI Batch line's custom_id, else its id, else `default`."""
  field = "custom_id" if openai_batch.is_batch_line(obj) else "id" if "id" in obj else None
  return (default, None) if field is None else (_valid_id(obj[field], default), field)


def _valid_id(value: Any, default: Any) -> Any:
  return value if isinstance(value, (str, int)) and not isinstance(value, bool) else default


def _json_type(value: Any) -> str:
  names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
           float: "a number", type(None): "null"}
  return names.get(type(value), type(value).__name__)


def _read_lines(f: BinaryIO, max_line_bytes: int) -> Iterator[tuple[bytes, int | None]]:
  """(line, None) for each line of `f` (its newline included), or (its first bytes, its size) for a line of more
  than `max_line_bytes` bytes (its newline not counted), which is read past in chunks and never held whole."""
  while raw := f.readline(max_line_bytes + 1):
    if raw.endswith(b"\n") or len(raw) <= max_line_bytes:
      yield raw, None
      continue
    size, head = len(raw), raw[:_KEY_PREFIX]
    del raw
    while chunk := f.readline(_SKIP_CHUNK):
      if chunk.endswith(b"\n"):
        size += len(chunk) - 1
        break
      size += len(chunk)
    yield head, size


def read_input(paths: str | Sequence[str], share: tuple[int, int] = (0, 1), *, keyed_by_path: bool | None = None,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[InputLine]:
  """The non-blank lines of the JSONL files, in order, whose 0-based position in all of them (blank lines
  counted) is congruent to share[0] modulo share[1]. A UTF-8 byte-order mark at the start of a file is skipped.
  keyed_by_path: id-less lines are keyed "<path>:line-N" (default: with several files; pass `keyed_by_path(...)`
  of the --input values, so that a glob keys by path even while it matches one file). A line over
  `max_line_bytes` is its error, read past in chunks."""
  paths = [paths] if isinstance(paths, str) else list(paths)
  keyed_by_path = len(paths) > 1 if keyed_by_path is None else keyed_by_path
  position = 0
  for path in paths:
    with open(path, "rb") as f:
      for number, (raw, size) in enumerate(_read_lines(f, max_line_bytes), 1):
        position += 1
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
          raw = raw[len(codecs.BOM_UTF8):]
        if (size is None and not raw.strip()) or (position - 1) % share[1] != share[0]:
          continue
        if size is not None:
          yield overlong_line(raw, size, number, path, keyed_by_path, max_line_bytes)
        else:
          yield parse_input_line(raw, number, path, keyed_by_path)


@dataclasses.dataclass(frozen=True)
class InputScan:
  """lines: non-blank lines in the files; skipped: (path, number) of the lines that repeat an earlier line's id
  (kept out of the job with keep_first)."""

  lines: int
  skipped: frozenset[tuple[str, int]]


def scan_input(paths: str | Sequence[str], keep_first: bool = False, *, keyed_by_path: bool | None = None,
               max_line_bytes: int = MAX_LINE_BYTES) -> InputScan:
  """Reads every line's id once before the job starts (as `read_input` keys them). InputError for an id used
  twice (in one file or across them), naming both lines, unless `keep_first` (the later lines are then skipped,
  with a warning)."""
  first: dict[str, str] = {}
  skipped: list[tuple[InputLine, str]] = []
  lines = 0
  for line in read_input(paths, keyed_by_path=keyed_by_path, max_line_bytes=max_line_bytes):
    lines += 1
    k = record_key(line.key)
    if k in first:
      skipped.append((line, first[k]))
    else:
      first[k] = line.where
  if skipped and not keep_first:
    line, earlier = skipped[0]
    more = f" ({len(skipped) - 1} more)" if len(skipped) > 1 else ""
    raise InputError(f"--input: id {record_key(line.key)} is on {earlier} and {line.where}{more}; ids must be "
                     "unique in the output (or pass --duplicate_ids=keep_first).")
  if skipped:
    logging.warning("--input: %d line(s) repeat an earlier id and are skipped (first: %s, id %s).", len(skipped),
                    skipped[0][0].where, record_key(skipped[0][0].key))
  return InputScan(lines, frozenset((line.path, line.number) for line, _ in skipped))
