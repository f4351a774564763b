"""The files of a batch job: its JSONL input, read line by line as bytes, and its results file, which is only ever
recognised, recovered, locked and appended to, never overwritten.

    jobs.check_paths("in.jsonl", "out.jsonl")            # InputError before anything is loaded
    with jobs.OutputLock("out.jsonl"):                   # one job per output; a killed job's lock is taken over
      done = jobs.recover("out.jsonl").ids                # corrupt regions moved to out.jsonl.corrupt, not deleted
      ids = jobs.scan_input("in.jsonl")                   # duplicate ids are an error before decoding
      with jobs.ResultWriter("out.jsonl") as out:
        for line in jobs.read_input("in.jsonl"): ...      # InputLine(number, key, obj, error)
          out.write({"id": ..., "text": ...})             # whole, newline-terminated, flushed

A results file is recognised as a job's own when every record in it has the shape `batch_generate` writes: a JSON
object with an "id" and either an "error" string or "text", "token_ids", "finish_reason" and "usage". A file with no
such record (a notes file, another job's input, a binary) is refused untouched; so is the input itself. Records
glued together on one line, or separated by garbage, are split apart again; what is not a record is appended to
`<output>.corrupt` before the output is rewritten (atomically) without it, so no byte is ever lost.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from absl import logging

from qwenjax._errors import InputError

CORRUPT_SUFFIX = ".corrupt"
LOCK_SUFFIX = ".lock"
_DECODER = json.JSONDecoder()
_BLANK = " \t\r"  # JSON whitespace between records (newlines end lines); anything else is kept


def record_key(key: Any) -> str:
  """The canonical form of an id, as the job compares them: its JSON text ("a" and "\\u0061" are one id)."""
  return json.dumps(key)


def is_result(obj: Any) -> bool:
  """Whether `obj` is a record as `batch_generate` writes it: an answer or an error, keyed by an id."""
  if not isinstance(obj, dict) or not isinstance(obj.get("id"), (str, int)) or isinstance(obj["id"], bool):
    return False
  if isinstance(obj.get("error"), str):
    return True
  return (isinstance(obj.get("text"), str) and isinstance(obj.get("token_ids"), list)
          and isinstance(obj.get("finish_reason"), str) and isinstance(obj.get("usage"), dict))


# --- Paths -----------------------------------------------------------------------------------------------------


def check_paths(input_path: str, output_path: str) -> None:
  """InputError naming the flag for an input that is not a readable file, an output that is a directory, in a
  missing directory or the input itself."""
  if not os.path.exists(input_path):
    raise InputError(f"--input={input_path}: no such file.")
  if not os.path.isfile(input_path):
    raise InputError(f"--input={input_path}: not a regular file.")
  if not os.access(input_path, os.R_OK):
    raise InputError(f"--input={input_path}: not readable.")
  parent = os.path.dirname(os.path.abspath(output_path))
  if not os.path.isdir(parent):
    raise InputError(f"--output={output_path}: directory {parent} does not exist.")
  if os.path.isdir(output_path):
    raise InputError(f"--output={output_path}: is a directory; name a file.")
  if os.path.exists(output_path):
    if os.path.samefile(input_path, output_path):
      raise InputError(f"--output={output_path} is the input file; results would overwrite the requests.")
    if not os.path.isfile(output_path):
      raise InputError(f"--output={output_path}: not a regular file.")
  if not os.access(parent if not os.path.exists(output_path) else output_path, os.W_OK):
    raise InputError(f"--output={output_path}: not writable.")


# --- The results file --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Scan:
  """What a results file holds. records: each valid record's exact bytes (no newline), in file order; ids: their
  record_key()s; corrupt: (line number, bytes) of every region that is not a record; terminated: whether the
  data ends with a newline (or is empty)."""

  records: list[bytes]
  ids: set[str]
  corrupt: list[tuple[int, bytes]]
  terminated: bool


def scan_results(data: bytes) -> Scan:
  """Splits a results file's bytes into records and corrupt regions. Pure: nothing is read or written."""
  scan = Scan([], set(), [], not data or data.endswith(b"\n"))
  for number, line in enumerate(data.split(b"\n"), 1):
    records, corrupt = _split_line(line)
    scan.records.extend(r for r, _ in records)
    scan.ids.update(k for _, k in records)
    scan.corrupt.extend((number, c) for c in corrupt)
  return scan


def _split_line(line: bytes) -> tuple[list[tuple[bytes, str]], list[bytes]]:
  """One line (no newline) -> its records as (exact bytes, record_key of the id), and its corrupt regions.
  Records glued together or separated by garbage are found by trying a JSON object at every "{"."""
  records: list[tuple[bytes, str]] = []
  corrupt: list[bytes] = []
  # Undecodable bytes become lone surrogates: a region holding one is never a record, and the mapping back to
  # bytes stays exact.
  text = line.decode("utf-8", "surrogateescape")
  pos, bad_from = 0, None
  while pos < len(text):
    if text[pos] in _BLANK and bad_from is None:
      pos += 1
      continue
    obj, end = _record_at(text, pos)
    if obj is None:
      bad_from = pos if bad_from is None else bad_from
      nxt = text.find("{", pos + 1)
      pos = len(text) if nxt < 0 else nxt
      continue
    if bad_from is not None and text[bad_from:pos].strip(_BLANK):
      corrupt.append(text[bad_from:pos].encode("utf-8", "surrogateescape"))
    bad_from = None
    records.append((text[pos:end].encode("utf-8"), record_key(obj["id"])))
    pos = end
  if bad_from is not None and text[bad_from:].strip(_BLANK):
    corrupt.append(text[bad_from:].encode("utf-8", "surrogateescape"))
  return records, corrupt


def _record_at(text: str, pos: int) -> tuple[dict[str, Any] | None, int]:
  """A whole, cleanly encoded record starting at text[pos] and where it ends; (None, pos) if there is none."""
  if text[pos] != "{":
    return None, pos
  try:
    obj, end = _DECODER.raw_decode(text, pos)
  except ValueError:
    return None, pos
  if not is_result(obj):
    return None, pos
  try:
    text[pos:end].encode("utf-8")
  except UnicodeEncodeError:  # it spans an undecodable byte (a surrogate inside a string)
    return None, pos
  return obj, end


@dataclasses.dataclass
class Recovered:
  """A results file made safe to append to: the ids it answers, how many records and corrupt regions it had."""

  ids: set[str]
  records: int = 0
  corrupt: int = 0


def recover(path: str) -> Recovered:
  """Makes an existing results file safe to append to, and says what it holds (a missing file holds nothing).

  InputError, the file untouched, if it is not recognisably a job's results. Otherwise the file is left as it is
  when it holds one record per line, each newline-terminated. If not, it is rewritten so (atomically): records
  glued together go on lines of their own, a last record gets its newline, and corrupt regions (a record torn
  by a kill, garbage, lines of another format) are first appended to `path + ".corrupt"`. Streams the file: its
  records are never all in memory."""
  if not os.path.exists(path):
    return Recovered(set())
  found, bad_lines, canonical, first = Recovered(set()), [], True, b""
  try:
    with open(path, "rb") as f:
      for number, raw in enumerate(f, 1):
        line = raw.removesuffix(b"\n")
        records, corrupt = _split_line(line)
        found.records += len(records)
        found.ids.update(k for _, k in records)
        if corrupt:
          found.corrupt += len(corrupt)
          bad_lines.append(number)
        canonical &= len(records) == 1 and not corrupt and raw.endswith(b"\n") and records[0][0] == line
        if number == 1 and not records:
          first = raw
  except OSError as e:
    raise InputError(f"--output={path}: cannot be read ({e.strerror}).") from None
  if not found.records and found.corrupt and not _torn_first_record(path, first, found.corrupt):
    raise InputError(f"--output={path} exists and holds no batch_generate results; refusing to append to it "
                     "(move it away or pick another --output).")
  if canonical:
    return found
  # One pass splits every line again: records to a temporary file, corrupt regions to the side file. The side
  # file is fsynced before the output is replaced, so no byte exists nowhere at any moment.
  side, tmp = path + CORRUPT_SUFFIX, f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as out, open(side, "ab") if found.corrupt else contextlib.nullcontext() as aside:
    for records, corrupt in _split_lines(path):
      for record, _ in records:
        out.write(record + b"\n")
      for region in corrupt:
        aside.write(region + b"\n")
    for f in (aside, out):
      if f is not None:
        f.flush()
        os.fsync(f.fileno())
  if found.corrupt:
    shown = ", ".join(map(str, bad_lines[:10])) + (", ..." if len(bad_lines) > 10 else "")
    logging.warning("%s: %d corrupt region(s) on line(s) %s moved to %s; %d record(s) kept, the ids the regions "
                    "held are redone.", path, found.corrupt, shown, side, found.records)
  else:
    logging.info("%s: rewritten with one record per line (%d records).", path, found.records)
  os.chmod(tmp, os.stat(path).st_mode & 0o7777)
  os.replace(tmp, path)
  _fsync_directory(path)
  return found


def iter_records(path: str) -> Iterator[tuple[bytes, str]]:
  """(exact bytes, record_key of the id) of each record in a results file, in order (after `recover`)."""
  for records, _ in _split_lines(path):
    yield from records


def _split_lines(path: str) -> Iterator[tuple[list[tuple[bytes, str]], list[bytes]]]:
  """`_split_line` of each line of a results file (its newline removed), in order."""
  with open(path, "rb") as f:
    for raw in f:
      yield _split_line(raw.removesuffix(b"\n"))


def _torn_first_record(path: str, first: bytes, corrupt: int) -> bool:
  """A job killed while writing its very first record leaves one unterminated line starting as records do."""
  return corrupt == 1 and not first.endswith(b"\n") and first.startswith(b'{"id": ') and (
      os.path.getsize(path) == len(first))


def _fsync_directory(path: str) -> None:
  dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


class ResultWriter:
  """Appends records to a results file, each whole and newline-terminated, flushed as it is written (fsynced
  every `sync_every` seconds and on close)."""

  def __init__(self, path: str, sync_every: float = 10.0):
    self.path = path
    self._file = open(path, "ab", buffering=0)  # pylint: disable=consider-using-with
    self._sync_every, self._synced = sync_every, time.monotonic()

  def write(self, record: dict[str, Any]) -> None:
    data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    try:
      while data:
        data = data[self._file.write(data):]
      if time.monotonic() - self._synced > self._sync_every:
        os.fsync(self._file.fileno())
        self._synced = time.monotonic()
    except OSError as e:
      raise InputError(f"--output={self.path}: write failed ({e.strerror}); rerun the job to resume.") from None

  def write_raw(self, record: bytes) -> None:
    """A record's exact bytes (from `iter_records`), newline added."""
    self._file.write(record + b"\n")

  def close(self) -> None:
    if not self._file.closed:
      os.fsync(self._file.fileno())
      self._file.close()

  def __enter__(self) -> ResultWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class OutputLock:
  """One job at a time per results file: an exclusive `flock` on `<output>.lock`, which the kernel releases when
  its process dies, so a lock left by a killed job is taken over (with a warning naming it). The file holds the
  holder's pid, host and start time, for the error the next job prints."""

  def __init__(self, output: str):
    self.output, self.path = output, output + LOCK_SUFFIX
    self._fd: int | None = None

  def acquire(self) -> OutputLock:
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise InputError(f"{self.path}: cannot create the job's lock file ({e.strerror}).") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a job"
        os.close(fd)
        raise InputError(f"--output={self.output} is being written by another job ({holder}); one job at a time "
                         f"per output (its lock: {self.path}).") from None
      # A job that just finished may have removed the file we opened: lock the file that is there now.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if previous:
      logging.warning("%s: taking over the lock of a job that ended without releasing it (%s).", self.path, previous)
    os.ftruncate(fd, 0)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.unlink(self.path)  # while still held: a waiting job re-checks the path (above)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> OutputLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# --- The input file ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputLine:
  """One non-blank input line. key: its "id", or "line-N" when it has none or cannot be read; obj: the request
  object, or None with `error` saying why the line cannot be served."""

  number: int
  key: Any
  obj: dict[str, Any] | None
  error: str | None = None


def parse_input_line(raw: bytes, number: int) -> InputLine:
  """One line's bytes (BOM already removed) -> InputLine; never raises for bad content."""
  key: Any = f"line-{number}"
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    # Still key the error by the line's id when the rest of it parses.
    try:
      obj = json.loads(raw.decode("utf-8", "replace"))
      key = _valid_id(obj.get("id"), key) if isinstance(obj, dict) else key
    except ValueError:
      pass
    return InputLine(number, key, None, f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                        f"{e.start + 1}).")
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    return InputLine(number, key, None, f"line {number}: malformed JSON ({e.msg} at column {e.colno}).")
  if not isinstance(obj, dict):
    return InputLine(number, key, None, f"line {number}: expected a JSON object, got {_json_type(obj)}.")
  if "id" in obj and _valid_id(obj["id"], None) is None:
    return InputLine(number, key, None, f"line {number}: 'id' must be a string or an integer, got "
                                        f"{_json_type(obj['id'])}.")
  return InputLine(number, obj.get("id", key), obj)


def _valid_id(value: Any, default: Any) -> Any:
  return value if isinstance(value, (str, int)) and not isinstance(value, bool) else default


def _json_type(value: Any) -> str:
  names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
           float: "a number", type(None): "null"}
  return names.get(type(value), type(value).__name__)


def read_input(path: str, share: tuple[int, int] = (0, 1)) -> Iterator[InputLine]:
  """The non-blank lines of a JSONL file whose 1-based numbers are congruent to share[0] + 1 modulo share[1]. A
  UTF-8 byte-order mark at the start of the file is skipped."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      if number == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      if not raw.strip() or (number - 1) % share[1] != share[0]:
        continue
      yield parse_input_line(raw, number)


@dataclasses.dataclass(frozen=True)
class InputScan:
  """lines: non-blank lines in the file; skipped: numbers of the lines that repeat an earlier line's id (kept
  out of the job with keep_first)."""

  lines: int
  skipped: frozenset[int]


def scan_input(path: str, keep_first: bool = False) -> InputScan:
  """Reads every line's id once before the job starts. InputError for an id used twice, naming both lines,
  unless `keep_first` (the later lines are then skipped, with a warning)."""
  first: dict[str, int] = {}
  skipped: list[tuple[int, int, Any]] = []
  lines = 0
  for line in read_input(path):
    lines += 1
    k = record_key(line.key)
    if k in first:
      skipped.append((line.number, first[k], line.key))
    else:
      first[k] = line.number
  if skipped and not keep_first:
    number, earlier, key = skipped[0]
    more = f" ({len(skipped) - 1} more)" if len(skipped) > 1 else ""
    raise InputError(f"--input={path}: id {record_key(key)} is on lines {earlier} and {number}{more}; ids must be "
                     "unique in the output (or pass --duplicate_ids=keep_first).")
  if skipped:
    logging.warning("%s: %d line(s) repeat an earlier id and are skipped (first: line %d, id %s).", path,
                    len(skipped), skipped[0][0], record_key(skipped[0][2]))
  return InputScan(lines, frozenset(n for n, _, _ in skipped))
