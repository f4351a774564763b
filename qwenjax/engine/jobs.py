"""The files of a batch job: the paths it is given, and its results file, which is only ever recognised, recovered,
locked and appended to, never overwritten. (Its input lines are `job_input`'s; a multi-host run's parts are
`job_parts`'.)

    inputs = jobs.expand_inputs(["a.jsonl", "shards/*.jsonl"], "out.jsonl")   # globs, each file once, sorted
    jobs.check_paths(inputs, "out.jsonl")                 # InputError before anything is loaded
    with jobs.OutputLock("out.jsonl"):                    # one job per file, any spelling; a killed one is taken over
      done = jobs.recover("out.jsonl").ids                 # corrupt regions moved to out.jsonl.corrupt, not deleted
      with jobs.ResultWriter("out.jsonl", fsync_every_lines=1000, fsync_every_seconds=30) as out:
        for line in job_input.read_input(inputs): ...      # InputLine(number, key, obj, error, path, code)
          out.write({"id": ..., "text": ...})              # whole, newline-terminated, flushed; fsynced on the policy

A results file is recognised as a job's own when every record in it has a shape `batch_generate` writes: a simple
record (`simple_batch.is_result`: a JSON object with an "id" and either an "error" string or "text",
"token_ids", "finish_reason" and "usage") or an OpenAI Batch output line (`openai_batch.is_result`, keyed by its
"custom_id"). A file with no such record (a notes file, another job's input, a binary) is refused untouched; so
is the input itself. Records glued together on one line, or separated by garbage, are split apart again; what is
not a record is appended to `<output>.corrupt` before the output is rewritten (atomically, onto the file a
symlinked output names) without it, so no byte is ever lost. A record is looked for only where a JSON value can
begin, never inside an object that failed to parse: a record torn by a kill whose "metadata" holds something
record-shaped does not count as that inner record.

Files beside the output are touched only when they are provably the job's own (`qwenjax._files`): the lock is
`<real output>.qwenjax-lock`, so a file of the user's named `<output>.lock` is never opened; `<output>.corrupt` is
created with O_EXCL and a header line (CORRUPT_HEADER) and appended to only when it starts with it; a part is
merged and removed only when it is a regular file (never a link) that holds results; temporaries are named by
`_files.temporary_path` and only those are ever removed. A write that fails (a full disk) is an InputError naming
the file, and leaves the output, the .corrupt and every temporary as they were.

Exactly once, whatever moment a kill strikes: every record is one unbuffered append, so a kill leaves at most a
torn last line, which `recover` moves aside and whose id is redone; a multi-host run's parts are merged on the
same terms (`job_parts`).

Fault injection for the kill harness (tests/launch/test_kill_harness.py): QWENJAX_CRASH_AT="write:37" kills the
process with SIGKILL halfway through the bytes of its 37th record, "merge:3" likewise in a merge, "recover" just
before a rewritten results file replaces the old one, "load" (batch_generate) once the model is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import signal
import stat
import time
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from qwenjax import _files
from qwenjax._errors import InputError
from qwenjax.engine import openai_batch, simple_batch

CORRUPT_SUFFIX = ".corrupt"
# The first line of every .corrupt file, written only by the job that creates it: what proves the file is ours.
CORRUPT_HEADER = b"# qwenjax: regions of the results file beside this one that were not records, one per line\n"
CRASH_ENV = "QWENJAX_CRASH_AT"
_BLANK = " \t\r"  # JSON whitespace between records (newlines end lines); anything else is kept


def record_key(key: Any) -> str:
  """The canonical form of an id, as the job compares them: its JSON text ("a" and "\\u0061" are one id)."""
  return json.dumps(key)


def result_key(obj: Any) -> str | None:
  """The record_key() of the id a record answers, if `obj` is a record as `batch_generate` writes it, in either
  format: an OpenAI Batch output line (its custom_id) or a simple record (its id). None for anything else."""
  for batch_format in (openai_batch, simple_batch):
    if batch_format.is_result(obj):
      return record_key(batch_format.result_key(obj))
  return None


def is_result(obj: Any) -> bool:
  """Whether `obj` is a record as `batch_generate` writes it (either format)."""
  return result_key(obj) is not None


def crash_point(point: str) -> bool:
  """Whether the kill harness asked (QWENJAX_CRASH_AT, comma-separated) for a SIGKILL at `point`."""
  return point in os.environ.get(CRASH_ENV, "").split(",")


def crash() -> None:
  """SIGKILL to this process: no handler, no flush, no atexit, as a preempted host dies."""
  os.kill(os.getpid(), signal.SIGKILL)


# --- Paths -----------------------------------------------------------------------------------------------------


def expand_inputs(values: Sequence[str], output_path: str | None = None) -> list[str]:
  """--input's values (files and glob patterns) -> the files, in the order given, a pattern's matches sorted, each
  file once. A pattern skips the output and its side files (it may match them on a rerun: `data/*.jsonl` with
  --output=data/out.jsonl). InputError for a pattern that matches nothing."""
  side = os.path.abspath(output_path) if output_path else None
  files, seen = [], set()
  for value in values:
    if glob.has_magic(value):
      matches = [m for m in sorted(glob.glob(value)) if side is None or not (
          os.path.abspath(m) == side or os.path.abspath(m).startswith(side + "."))]
      if not matches:
        raise InputError(f"--input={value}: no file matches.")
    else:
      matches = [value]
    for path in matches:
      real = os.path.realpath(path)
      if real not in seen:
        seen.add(real)
        files.append(path)
  if not files:
    raise InputError("--input: name at least one file.")
  return files


def keyed_by_path(values: Sequence[str]) -> bool:
  """Whether --input's values key id-less lines by path ("<path>:line-N"): a glob or several values do, from the
  start, even while they name one file, so a glob that gains a file between runs never re-keys a line."""
  return len(values) > 1 or any(glob.has_magic(value) for value in values)


def check_paths(input_paths: str | Sequence[str], output_path: str) -> None:
  """InputError naming the flag for an input that is not a readable file, an output that is a directory, in a
  missing directory or one of the inputs."""
  input_paths = [input_paths] if isinstance(input_paths, str) else list(input_paths)
  for input_path in input_paths:
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
    if any(os.path.samefile(i, output_path) for i in input_paths):
      raise InputError(f"--output={output_path} is the input file; results would overwrite the requests.")
    if not os.path.isfile(output_path):
      raise InputError(f"--output={output_path}: not a regular file.")
  if not os.access(parent if not os.path.exists(output_path) else output_path, os.W_OK):
    raise InputError(f"--output={output_path}: not writable.")


# --- The results file --------------------------------------------------------------------------------------------


def _split_line(line: bytes) -> tuple[list[tuple[bytes, str]], list[bytes]]:
  """One line (no newline) -> its records as (exact bytes, record_key of the id), and its corrupt regions.
  Records glued together or separated by garbage are found by trying a JSON object at each "{" that is not inside
  a value that failed to parse (or parsed as something else): a torn record's nested objects are never records."""
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
    key, end = _record_at(text, pos)
    if key is None:
      bad_from = pos if bad_from is None else bad_from
      nxt = text.find("{", _value_end(text, pos))
      pos = len(text) if nxt < 0 else nxt
      continue
    if bad_from is not None and text[bad_from:pos].strip(_BLANK):
      corrupt.append(text[bad_from:pos].encode("utf-8", "surrogateescape"))
    bad_from = None
    records.append((text[pos:end].encode("utf-8"), key))
    pos = end
  if bad_from is not None and text[bad_from:].strip(_BLANK):
    corrupt.append(text[bad_from:].encode("utf-8", "surrogateescape"))
  return records, corrupt


def _record_at(text: str, pos: int) -> tuple[str | None, int]:
  """The record_key of a whole, cleanly encoded record starting at text[pos] and where it ends; (None, pos) if
  there is none."""
  if text[pos] != "{":
    return None, pos
  try:
    obj, end = _files.raw_decode(text, pos)  # nesting past its bound is not a record (JSONDepthError)
  except ValueError:
    return None, pos
  key = result_key(obj)
  if key is None:
    return None, pos
  try:
    text[pos:end].encode("utf-8")
  except UnicodeEncodeError:  # it spans an undecodable byte (a surrogate inside a string)
    return None, pos
  return key, end


def _value_end(text: str, pos: int) -> int:
  """Where the bracketed value opening at text[pos] closes, read leniently (strings and escapes tracked, nothing
  else checked): the end of the line if it never does, as for a torn record. pos + 1 if text[pos] opens none."""
  if text[pos] not in "{[":
    return pos + 1
  depth, in_string, i = 0, False, pos
  while i < len(text):
    c = text[i]
    if in_string:
      if c == "\\":
        i += 1
      elif c == '"':
        in_string = False
    elif c == '"':
      in_string = True
    elif c in "{[":
      depth += 1
    elif c in "}]":
      depth -= 1
      if depth == 0:
        return i + 1
    i += 1
  return len(text)


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
  _files.remove_stale_temporaries(path)  # a rewrite killed before its replace: a copy, no more
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
  # file is fsynced before the output is replaced, so no byte exists nowhere at any moment; if anything fails
  # (a full disk), the temporary goes and the side file is cut back to what it held.
  side, tmp, what = path + CORRUPT_SUFFIX, _files.temporary_path(path), f"--output={path}"
  with _corrupt_file(path) if found.corrupt else contextlib.nullcontext() as aside:
    try:
      with _files.create_exclusive(tmp, what=what) as out:
        for records, corrupt in _split_lines(path):
          for record, _ in records:
            out.write(record + b"\n")
          for region in corrupt:
            aside.write(region + b"\n")
      if aside is not None:
        aside.sync()
      os.chmod(tmp, os.stat(path).st_mode & 0o7777)
      if crash_point("recover"):
        crash()
      _files.replace(tmp, path, what=what)  # onto the real file, if the output is a symlink
    except (InputError, OSError) as e:  # the temporary goes (if create_exclusive did not); the side file is cut back
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
      message = str(e) if isinstance(e, InputError) else f"{what}: rewriting it failed ({e.strerror})."
      raise InputError(f"{message} The output is unchanged; rerun the same command once that is fixed.") from None
  if found.corrupt:
    shown = ", ".join(map(str, bad_lines[:10])) + (", ..." if len(bad_lines) > 10 else "")
    logging.warning("%s: %d corrupt region(s) on line(s) %s moved to %s; %d record(s) kept, the ids the regions "
                    "held are redone.", path, found.corrupt, shown, side, found.records)
  else:
    logging.info("%s: rewritten with one record per line (%d records).", path, found.records)
  return found


class _SideFile:
  """An open `.corrupt` file: whole appends, fsync; an OSError (a full disk) is an InputError naming it."""

  def __init__(self, fd: int, path: str, what: str):
    self.fd, self.path, self.what = fd, path, what

  def write(self, data: bytes) -> None:
    view = memoryview(data)
    try:
      while view:
        view = view[os.write(self.fd, view):]
    except OSError as e:
      raise InputError(f"{self.what}: writing {self.path} failed ({e.strerror}).") from None

  def sync(self) -> None:
    try:
      os.fsync(self.fd)
    except OSError as e:
      raise InputError(f"{self.what}: writing {self.path} failed ({e.strerror}).") from None


@contextlib.contextmanager
def _corrupt_file(path: str) -> Iterator[_SideFile]:
  """`path + ".corrupt"` opened for appending: created here (O_EXCL | O_NOFOLLOW) with CORRUPT_HEADER, or an
  existing regular file that starts with it. InputError, untouched, for anything else there (a link, a file of
  the user's). If the block fails, the file is cut back to what it held (removed if it was created here)."""
  side, what = path + CORRUPT_SUFFIX, f"--output={path}"
  flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
  created = True
  try:
    fd = os.open(side, flags | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    created = False
    if os.path.islink(side):
      raise InputError(f"{what}: {side} is a symbolic link; refusing to append to it (move it away).") from None
    if not stat.S_ISREG(os.lstat(side).st_mode):
      raise InputError(f"{what}: {side} is not a regular file; refusing to append to it (move it away).") from None
    try:
      fd = os.open(side, flags)
    except OSError as e:
      raise InputError(f"{what}: cannot open {side} ({e.strerror}).") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode) or os.pread(fd, len(CORRUPT_HEADER), 0) != CORRUPT_HEADER:
      os.close(fd)
      raise InputError(f"{what}: {side} exists and was not written by qwenjax (it does not start with its header "
                       "line); refusing to append to it (move it away).") from None
  except OSError as e:
    raise InputError(f"{what}: cannot create {side} ({e.strerror}).") from None
  size = os.fstat(fd).st_size
  try:
    f = _SideFile(fd, side, what)
    if created:
      f.write(CORRUPT_HEADER)
    yield f
  except BaseException:
    if created:
      with contextlib.suppress(OSError):
        os.remove(side)
    else:
      with contextlib.suppress(OSError):
        os.ftruncate(fd, size)
    raise
  finally:
    os.close(fd)


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


class ResultWriter:
  """Appends records to a results file, each whole and newline-terminated in one unbuffered write (so a reader, or
  the next run, sees every record the moment it is written, and a kill tears at most the last line).

  Durability is a policy: fsync after every `fsync_every_lines` records and whenever `fsync_every_seconds` have
  passed since the last one (0 turns either off), and on close. A file system that uploads only on fsync or
  close (gcsfuse, other object-store mounts) holds on the server what was last fsynced: that is what survives the
  loss of the host, and the rest is redone by the next run. Each fsync there uploads, so it is not per line."""

  def __init__(self, path: str, *, fsync_every_lines: int = 0, fsync_every_seconds: float = 10.0,
               crash_label: str = "write", follow_links: bool = True):
    """follow_links: False for a file the job names itself (a part), which a link must not redirect."""
    self.path = path
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    try:
      fd = os.open(path, flags | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0)), 0o644)
    except OSError as e:
      raise InputError(f"--output={path}: cannot be opened for appending ({e.strerror}).") from None
    self._file = os.fdopen(fd, "ab", buffering=0)
    self._every_lines, self._every_seconds = fsync_every_lines, fsync_every_seconds
    self._unsynced, self._synced = 0, time.monotonic()
    self._label, self.written = crash_label, 0

  def write(self, record: dict[str, Any]) -> None:
    self.write_raw((json.dumps(record, ensure_ascii=False)).encode("utf-8"))

  def write_raw(self, record: bytes) -> None:
    """A record's exact bytes (from `iter_records`, or encoded by `write`), newline added."""
    data = memoryview(record + b"\n")
    self.written += 1
    try:
      if crash_point(f"{self._label}:{self.written}"):
        self._file.write(data[:len(data) // 2])
        crash()
      while data:
        data = data[self._file.write(data):]
      self._unsynced += 1
      if (self._every_lines and self._unsynced >= self._every_lines) or (
          self._every_seconds and time.monotonic() - self._synced >= self._every_seconds):
        self.sync()
    except OSError as e:
      raise InputError(f"--output={self.path}: write failed ({e.strerror}); rerun the job to resume.") from None

  def sync(self) -> None:
    try:
      os.fsync(self._file.fileno())
    except OSError as e:
      raise InputError(f"--output={self.path}: fsync failed ({e.strerror}); rerun the job to resume.") from None
    self._unsynced, self._synced = 0, time.monotonic()

  def close(self) -> None:
    if not self._file.closed:
      try:
        self.sync()
      finally:
        self._file.close()

  def __enter__(self) -> ResultWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class OutputLock(_files.OwnedLock):
  """One job at a time per results file, whatever the spelling of its path: `_files.OwnedLock` on
  `<real path>.qwenjax-lock` (a link, `..` or a second mount of the directory find the same lock; `<output>.lock`
  is never touched). A file with several hard links has several real paths, so it is refused once locked."""

  def __init__(self, output: str):
    super().__init__(_files.lock_path_for(output), f"--output={output}")
    self.output = output

  def acquire(self) -> OutputLock:
    super().acquire()
    try:
      links = os.stat(self.output).st_nlink
    except FileNotFoundError:
      links = 1
    if links > 1:
      self.release()
      raise InputError(f"--output={self.output}: has {links} hard links; a job locks its output by its real path, "
                       "so another name of the same file could be written by a second job at once (copy it to a "
                       "file of its own).")
    return self
