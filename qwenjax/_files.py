"""The few ways qwenjax reads JSON and touches files that hold users' data. Every JSON reader, every lock and every
temporary or report file goes through these helpers, so that a class of fault is mended once:

    obj = _files.loads(text)                          # JSONDecodeError (never RecursionError) past MAX_JSON_DEPTH
    with _files.OwnedLock(_files.lock_path_for("out.jsonl"), "--output=out.jsonl"):   # one writer per file
      _files.write_json("out.jsonl.summary.json", summary, marker="batch_generate summary")
      with _files.create_exclusive(tmp) as f: ...    # a file of our own: O_EXCL | O_NOFOLLOW
      _files.replace(tmp, "out.jsonl")               # onto the real file, never onto (and over) a symlink

The rule they keep: the job only creates, writes and deletes files it can prove are its own, by a name of its own
(`.qwenjax-lock`, `.qwenjax-tmp-<pid>`), creation with O_EXCL and O_NOFOLLOW, and a content marker. Anything else
at such a path is refused with an InputError naming it, and left untouched. A write that fails (a full disk, a
read-only mount) is an InputError naming the file, and its temporary is removed.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from absl import logging

from qwenjax._errors import InputError

# Deeper JSON is refused before anything walks it: Python's own decoder, encoder, jinja and every recursive walk
# over a request would otherwise hit the interpreter's recursion limit (about 1,000 frames). No schema, message
# list or sampling object that a person writes comes near this.
MAX_JSON_DEPTH = 100
LOCK_SUFFIX = ".qwenjax-lock"
TMP_INFIX = ".qwenjax-tmp-"
LOCK_MARKER = b"qwenjax lock\n"
MARKER_KEY = "qwenjax_file"
_DECODER = json.JSONDecoder()
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)  # one whole JSON string, escapes included


# --- JSON with bounded nesting ------------------------------------------------------------------------------------


class JSONDepthError(json.JSONDecodeError):
  """JSON nested deeper than MAX_JSON_DEPTH: a JSONDecodeError (so every caller's handler for malformed JSON takes
  it), whose msg says so and whose pos is the first bracket past the limit."""

  def __init__(self, doc: str, pos: int):
    super().__init__(f"nested deeper than {MAX_JSON_DEPTH} levels", doc, pos)


def loads(text: str | bytes, *, decoder: json.JSONDecoder | None = None) -> Any:
  """json.loads, but JSON nested deeper than MAX_JSON_DEPTH raises JSONDepthError instead of RecursionError (or
  of a value that something later cannot walk). `decoder`: one with hooks of its own (parse_constant, ...)."""
  if isinstance(text, (bytes, bytearray)):
    text = text.decode("utf-8")
  obj, end = raw_decode(text, 0, decoder=decoder)
  end = _skip_blank(text, end)
  if end != len(text):
    raise json.JSONDecodeError("Extra data", text, end)
  return obj


def raw_decode(text: str, pos: int = 0, *, decoder: json.JSONDecoder | None = None) -> tuple[Any, int]:
  """JSONDecoder.raw_decode with the same depth bound as `loads` (leading whitespace skipped, as loads does)."""
  pos = _skip_blank(text, pos)
  try:
    obj, end = (decoder or _DECODER).raw_decode(text, pos)
  except RecursionError:
    raise JSONDepthError(text, _too_deep_at(text, pos)) from None
  if _may_be_deep(text, pos, end) and _depth(obj) > MAX_JSON_DEPTH:
    raise JSONDepthError(text, _too_deep_at(text, pos))
  return obj, end


def _skip_blank(text: str, pos: int) -> int:
  while pos < len(text) and text[pos] in " \t\n\r":
    pos += 1
  return pos


def _may_be_deep(text: str, start: int, end: int) -> bool:
  """Whether text[start:end] has more opening brackets than the depth bound (counted in C; almost never)."""
  return text.count("[", start, end) + text.count("{", start, end) > MAX_JSON_DEPTH


def _depth(obj: Any) -> int:
  """The nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
  deepest, stack = 0, [(obj, 1)]
  while stack:
    value, depth = stack.pop()
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if children is None:
      continue
    deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
      return deepest
    stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
  return deepest


def _too_deep_at(text: str, start: int) -> int:
  """The offset of the first bracket, from `start`, that opens level MAX_JSON_DEPTH + 1 (strings skipped)."""
  depth, pos = 0, start
  while pos < len(text):
    c = text[pos]
    if c == '"':
      m = JSON_STRING.match(text, pos)
      if m is None:
        return pos
      pos = m.end()
      continue
    if c in "[{":
      depth += 1
      if depth > MAX_JSON_DEPTH:
        return pos
    elif c in "]}":
      depth -= 1
      if depth <= 0:
        return start
    pos += 1
  return start


def describe(error: json.JSONDecodeError) -> str:
  """A decode error as job records and messages quote it: "nested deeper than 100 levels at column 101"."""
  return f"{error.msg} at column {error.colno}" + (f" of line {error.lineno}" if error.lineno > 1 else "")


def read_json(path: str | os.PathLike[str], what: str | None = None) -> Any:
  """A JSON file, depth-bounded. InputError naming the file (or `what`) for one that is unreadable or not JSON."""
  name = what or str(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise InputError(f"{name}: cannot be read ({e.strerror}).") from None
  try:
    return loads(data)
  except UnicodeDecodeError as e:
    raise InputError(f"{name}: not valid UTF-8 (byte {e.start}).") from None
  except json.JSONDecodeError as e:
    raise InputError(f"{name}: malformed JSON ({describe(e)}).") from None


# --- Files of our own ----------------------------------------------------------------------------------------------


def _open_flags() -> int:
  return getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _space(e: OSError) -> str:
  return e.strerror or type(e).__name__


def temporary_path(path: str | os.PathLike[str]) -> str:
  """Where a rewrite of `path` is written before it replaces it: beside the real file (a symlink resolved), named
  as only qwenjax names files."""
  real = os.path.realpath(path)
  return f"{os.path.join(os.path.dirname(real), '.' + os.path.basename(real))}{TMP_INFIX}{os.getpid()}"


def stale_temporaries(path: str | os.PathLike[str], *, directories: bool = False) -> list[str]:
  """Temporaries of `path` that a killed process left (any pid): regular files (with `directories`: directories),
  never links, by our own name."""
  real = os.path.realpath(path)
  directory, prefix = os.path.dirname(real), "." + os.path.basename(real) + TMP_INFIX
  found = []
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  for name in names:
    if name.startswith(prefix) and name[len(prefix):].isdigit():
      full = os.path.join(directory, name)
      with contextlib.suppress(OSError):
        if (os.path.isdir(full) if directories else os.path.isfile(full)) and not os.path.islink(full):
          found.append(full)
  return found


def remove_stale_temporaries(path: str | os.PathLike[str], *, marker_file: str | None = None,
                             marker: str | None = None) -> None:
  """Removes the temporaries of `path` that processes no longer running (or this one, earlier) left before their
  rename: files; with `marker_file`, directories that hold that file as `write_json` wrote it with `marker`
  (anything else of that name is left alone)."""
  for tmp in stale_temporaries(path, directories=marker_file is not None):
    pid = int(tmp.rsplit(TMP_INFIX, 1)[1])
    if pid != os.getpid() and is_alive(pid):
      continue
    if marker_file is None:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    elif is_marked(os.path.join(tmp, marker_file), marker):
      shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(path: str | os.PathLike[str], *, quiet: float = 0.2, timeout: float = 30.0) -> bool:
  """Removes the directory tree `path` that threads of this process may still be writing into (a failed Orbax
  save leaves tensorstore's other writes running): removes it again whenever something reappears, until it has
  stayed absent for `quiet` seconds, or `timeout` seconds have passed. Returns whether it is gone."""
  deadline = time.monotonic() + timeout
  while True:
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
      time.sleep(quiet)
      if not os.path.lexists(path):
        return True
    if time.monotonic() > deadline:
      return False
    time.sleep(0.01)


def is_alive(pid: int) -> bool:
  """Whether process `pid` runs (on this host)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def create_exclusive(path: str | os.PathLike[str], mode: int = 0o644, *, what: str | None = None
                     ) -> Iterator[BinaryIO]:
  """A new file opened for binary writing: O_CREAT | O_EXCL | O_NOFOLLOW, so it is ours and no link redirects it.
  On any error inside the block (a full disk included) the file is removed and an OSError becomes an InputError
  naming `what` (default: the path)."""
  name = what or str(path)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _open_flags(), mode)
  except FileExistsError:
    raise InputError(f"{name}: {path} already exists and is not this job's; refusing to overwrite it.") from None
  except OSError as e:
    raise InputError(f"{name}: cannot create {path} ({_space(e)}).") from None
  f = os.fdopen(fd, "wb")
  try:
    yield f
    f.flush()
    os.fsync(f.fileno())
    f.close()
  except BaseException as e:
    with contextlib.suppress(OSError):
      f.close()
    with contextlib.suppress(OSError):
      os.remove(path)
    if isinstance(e, OSError):
      raise InputError(f"{name}: writing {path} failed ({_space(e)}).") from None
    raise


def replace(tmp: str, path: str | os.PathLike[str], *, what: str | None = None) -> None:
  """Renames `tmp` over the real file `path` names (a symlink is followed, never replaced), then fsyncs its
  directory. InputError naming `what` if that fails; `tmp` is then removed."""
  real = os.path.realpath(path)
  try:
    os.replace(tmp, real)
    fsync_directory(real)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise InputError(f"{what or path}: replacing {real} failed ({_space(e)}).") from None


def fsync_directory(path: str | os.PathLike[str]) -> None:
  dir_fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


# The report files batch_generate wrote before they carried a marker, known by the keys every one of them has, so
# that a job begun with an older qwenjax resumes after an upgrade (a file of the user's has no reason to hold them).
_BEFORE_MARKERS = {
    "batch_generate summary": frozenset({"output", "lines", "complete", "finished_at", "missing", "this_run"}),
    "batch_generate progress": frozenset({"done", "total", "fraction", "eta_seconds", "replicas",
                                          "replicas_reporting", "updated", "final"}),
    "batch_generate replica progress": frozenset({"replica", "elapsed_seconds", "compile_seconds", "final"}),
}


def is_marked(path: str | os.PathLike[str], marker: str) -> bool:
  """Whether `path` is a regular file (not a link) holding a JSON object that `write_json` wrote with `marker`."""
  if os.path.islink(path) or not os.path.isfile(path):
    return False
  try:
    obj = read_json(path)
  except InputError:
    return False
  if not isinstance(obj, dict):
    return False
  if MARKER_KEY not in obj and marker in _BEFORE_MARKERS:  # written by a qwenjax from before markers
    return _BEFORE_MARKERS[marker] <= obj.keys()
  return obj.get(MARKER_KEY) == marker


def check_ours(path: str | os.PathLike[str], marker: str, what: str) -> None:
  """InputError, the file untouched, unless `path` is missing or a file `write_json` wrote with `marker`."""
  if (os.path.lexists(path)) and not is_marked(path, marker):
    raise InputError(f"{what}: {path} exists and was not written by qwenjax ({marker}); refusing to overwrite "
                     "it (move it away or choose another output).")


def write_json(path: str | os.PathLike[str], obj: dict[str, Any], *, marker: str, what: str | None = None) -> None:
  """Writes `obj` (with `MARKER_KEY: marker` added) as JSON, atomically: a reader sees the old file or the new one.
  Refuses (InputError, untouched) a path that holds anything but an earlier such file, a link included."""
  what = what or str(path)
  check_ours(path, marker, what)
  tmp = temporary_path(path)
  with contextlib.suppress(FileNotFoundError):
    os.remove(tmp)  # our own pid's, from an earlier write cut short in this process
  with create_exclusive(tmp, what=what) as f:
    f.write(json.dumps({MARKER_KEY: marker, **obj}, indent=1, sort_keys=True).encode("utf-8") + b"\n")
  # os.replace on `path` itself: check_ours refused a link, so this replaces a regular file of ours or nothing.
  try:
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise InputError(f"{what}: replacing {path} failed ({_space(e)}).") from None


def remove_if_ours(path: str | os.PathLike[str], marker: str) -> bool:
  """Removes `path` if it is a file `write_json` wrote with `marker`; leaves anything else. True if removed."""
  if is_marked(path, marker):
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    return True
  return False


# --- One writer per file -----------------------------------------------------------------------------------------


def lock_path_for(target: str | os.PathLike[str]) -> str:
  """The lock of whatever file or directory `target` names: beside the real one (symlinks resolved), so every
  spelling of one file, a link or a second mount of its directory, finds the same lock."""
  return os.path.realpath(target) + LOCK_SUFFIX


class OwnedLock:
  """One process at a time per target: an exclusive `flock` on a lock file of qwenjax's own name and content
  (`LOCK_MARKER`, then the holder's pid, host and start time). The kernel releases it when its holder dies, so a
  lock a killed job left is taken over, with a warning naming that job. A path there that is a link, not a
  regular file, or not marked as a qwenjax lock is refused untouched. `what` names the target in messages."""

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    self._fd: int | None = None

  def acquire(self) -> OwnedLock:
    while True:
      created = True
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _open_flags(), 0o644)
      except FileExistsError:
        created = False
        try:
          fd = os.open(self.path, os.O_RDWR | _open_flags())
        except FileNotFoundError:
          continue  # released meanwhile
        except OSError as e:
          if e.errno == errno.ELOOP:
            raise InputError(f"{self.what}: its lock path {self.path} is a symbolic link; refusing to use it "
                             "(remove the link).") from None
          raise InputError(f"{self.what}: cannot open the lock {self.path} ({_space(e)}).") from None
      except OSError as e:
        raise InputError(f"{self.what}: cannot create the lock {self.path} ({_space(e)}).") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _holder(os.pread(fd, 4096, 0)) or "another process"
        os.close(fd)
        raise InputError(f"{self.what} is being written by another job ({holder}); one job at a time (its lock: "
                         f"{self.path}).") from None
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
      except FileNotFoundError:
        same = False
      if not same:  # the holder we waited for removed (or someone replaced) the file we opened: try again
        os.close(fd)
        continue
      content = os.pread(fd, 4096, 0)
      # An empty file of our lock's name is one whose creator was killed between its O_EXCL create and the
      # marker's write (the marker is written under the flock, so a live holder is never seen empty here).
      if not created and not ((content.startswith(LOCK_MARKER) or not content) and _is_regular(fd)):
        os.close(fd)
        raise InputError(f"{self.what}: {self.path} exists and is not a qwenjax lock; refusing to touch it (move "
                         "it away if no job is running).")
      break
    if not created:
      logging.warning("%s: taking over the lock of a job that ended without releasing it (%s).", self.path,
                      _holder(content) or "no holder recorded")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, LOCK_MARKER + f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
    except OSError as e:
      os.close(fd)
      raise InputError(f"{self.what}: cannot write the lock {self.path} ({_space(e)}).") from None
    self._fd = fd
    return self

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    if self._fd is not None:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)  # while still held: a job waiting on the old file re-checks the path (above)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> OwnedLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _is_regular(fd: int) -> bool:
  import stat  # pylint: disable=g-import-not-at-top

  return stat.S_ISREG(os.fstat(fd).st_mode)


def _holder(content: bytes) -> str:
  return content.removeprefix(LOCK_MARKER).decode("utf-8", "replace").strip()
