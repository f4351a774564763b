"""JAX's persistent compilation cache for qwenjax's programs, one directory per processor, so that a rerun reads
its programs back instead of compiling them (a killed batch job's rerun, a second `launch.generate`; on a TPU a
first compile costs minutes per program).

    qwenjax.enable_compilation_cache()                    # before the first jitted call: <cache dir>/xla/<processor>
    qwenjax.enable_compilation_cache("/fast/disk/xla")    # /fast/disk/xla/<processor>
    ...
    compilation_cache.counts()                            # {"read_back": 9, "compiled": 1} since enabled

JAX keys each entry by the program, its compile options, the XLA flags (`XLA_FLAGS`, `LIBTPU_INIT_ARGS`), the
backend and its version, and the jax and jaxlib versions. It does not key the host processor: on CPU the backend's
version is just "cpu", while XLA:CPU compiles for the instruction set of the processor it runs on, so a cache
shared by two machines (a network home, a container image) would hand one the other's code. Hence the directory
of its own per processor: its model name and a hash of its feature flags.

`JAX_COMPILATION_CACHE_DIR`, when set, is the user's choice and wins over the default place (an explicit
directory passed here wins over both). Programs are cached whatever their compile time (JAX's default skips those
under a second: most of a small model's).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import re

import jax

from qwenjax.checkpoints.embedded import cache_directory

ENV = "JAX_COMPILATION_CACHE_DIR"
_MIN_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_events = {"/jax/compilation_cache/compile_requests_use_cache": 0, "/jax/compilation_cache/cache_hits": 0}
_listening = False


def processor_key(cpuinfo: str | None = None) -> str:
  """A directory name for this host's processor: its model name, slugged, and 8 hex digits of the hash of its
  feature flags (two processors of one model name with different features get different directories).
  cpuinfo: /proc/cpuinfo's text (default: read it; elsewhere, `platform`'s processor and machine)."""
  if cpuinfo is None:
    try:
      cpuinfo = pathlib.Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
      cpuinfo = ""
  fields = dict(re.findall(r"^(model name|flags|Features)\s*:\s*(.*)$", cpuinfo, re.MULTILINE))
  name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
  features = " ".join(sorted((fields.get("flags") or fields.get("Features") or "").split()))
  slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]
  return f"{slug}-{hashlib.sha256(f'{platform.machine()} {features}'.encode()).hexdigest()[:8]}"


def default_directory() -> pathlib.Path:
  """Where the cache lives unless told: `<qwenjax cache directory>/xla` (`qwenjax.checkpoints.embedded`)."""
  return cache_directory() / "xla"


def enable(directory: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Turns JAX's persistent compilation cache on in `directory`/<processor> (default: `$JAX_COMPILATION_CACHE_DIR`
  as given, else `default_directory()`/<processor>), creating it; returns the directory. Call it before the
  first jitted call: JAX opens its cache once, at its first compile."""
  global _listening
  if directory is None and os.environ.get(ENV):
    path = pathlib.Path(os.environ[ENV]).expanduser()
  else:
    path = pathlib.Path(directory or default_directory()).expanduser() / processor_key()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  if not os.environ.get(_MIN_TIME_ENV):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if not _listening:
    jax.monitoring.register_event_listener(_count)
    _listening = True
  return path


def disable() -> None:
  """No persistent cache, whatever `$JAX_COMPILATION_CACHE_DIR` says (call it before the first jitted call)."""
  jax.config.update("jax_enable_compilation_cache", False)


def counts() -> dict[str, int] | None:
  """Programs read back from the cache and compiled (missed) since `enable`; None if it never enabled one."""
  if not _listening:
    return None
  requests, hits = _events.values()
  return {"read_back": hits, "compiled": requests - hits}


def _count(event: str, **_) -> None:
  """JAX's events: every compile that asks the cache, and a hit for each it answered."""
  if event in _events:
    _events[event] += 1
