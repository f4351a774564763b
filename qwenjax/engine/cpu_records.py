"""Where the CPU path probe's records live (one per processor and jaxlib under the qwenjax cache directory), and
the one call a library user makes before the first jax computation to run on this processor's chosen matmul
paths (`qwenjax.kernels.cpu_paths`):

    import qwenjax
    qwenjax.use_cpu_paths("w8a8")      # the mode the model will run: float32, bfloat16, w8a16 (int8) or w8a8
    engine = qwenjax.Engine.load("default", quantize="w8a8")
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

from qwenjax.checkpoints.embedded import cache_directory
from qwenjax.engine import compilation_cache
from qwenjax.kernels import cpu_paths


def processor_key() -> str:
  """The processor and jaxlib a record belongs to: `compilation_cache.processor_key` plus the jaxlib version."""
  import jaxlib  # noqa: PLC0415

  return f"{compilation_cache.processor_key()}-jaxlib{jaxlib.__version__}"


def record_path(directory: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """<cache dir>/cpu_paths/<processor key>.json (`directory` replaces <cache dir>/cpu_paths)."""
  if directory is None:
    directory = cache_directory() / "cpu_paths"
  return pathlib.Path(directory) / f"{processor_key()}.json"


def use_record(record: Mapping, mode: str) -> tuple[cpu_paths.Paths, str, str | None]:
  """Puts the XLA flags `record` chooses for `mode` in XLA_FLAGS (unless XLA_FLAGS is set: the user's win), then
  activates every mode's paths under the configuration the process then runs. Returns (`mode`'s active paths,
  the configuration chosen for `mode`, the XLA_FLAGS set or None). Call before jax starts its backend."""
  own = cpu_paths.select(record, mode)
  flags_set = cpu_paths.apply_xla_flags(own)
  running = cpu_paths.config_of_flags(os.environ.get("XLA_FLAGS", ""))
  return cpu_paths.activate_record(record, running)[mode], own.config, flags_set


def use_cpu_paths(mode: str = "float32",
                  record: str | os.PathLike[str] | Mapping | None = None) -> cpu_paths.Paths | None:
  """The library's one call, made before the first jax computation: reads the record of this processor (or the
  one given, a path or a dict) and `use_record`s it: `mode`'s XLA flags in XLA_FLAGS (unless XLA_FLAGS is set),
  every mode's paths active under the configuration those flags run. Returns `mode`'s Paths, or None when this
  processor has no record yet (`python -m launch.bench.cpu_paths` writes it)."""
  if record is None:
    path = record_path()
    if not path.is_file():
      return None
    record = cpu_paths.read_record(path)
  elif not isinstance(record, Mapping):
    record = cpu_paths.read_record(record)
  return use_record(record, mode)[0]
