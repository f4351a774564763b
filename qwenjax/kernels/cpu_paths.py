"""Matmul paths on XLA:CPU, chosen per processor by measurement: the record a probe writes, and what the model
reads from it.

The probe (`python -m launch.bench.cpu_paths`) times the model's matmul shapes at the row counts the engine runs,
for every mode (float32, bfloat16, w8a16, w8a8), formulation (below), int8 weight layout ([K, N] or output-major
[N, K]) and candidate XLA:CPU configuration (`CONFIGS`: the defaults, oneDNN, XNNPACK, YNNPACK), each
configuration in a process of its own (XLA reads its flags once). It writes one JSON record per processor and
jaxlib under the cache directory (`qwenjax.engine.cpu_records`). `select(record, mode)` turns a record into `Paths`, and
`activate(paths)` makes them what `qwenjax.model.layers` and `qwenjax.kernels.int8_matmul` trace with:

  config        the XLA:CPU configuration of the mode: the one whose exact paths run fastest over all shapes and
                row counts (geometric mean), kept over the defaults only if it wins by more than `MIN_GAIN`
  layouts       (K, N) -> "kn" or "nk": an int8 weight's stored layout (fastest over the row counts, geometric mean)
  formulations  (K, N) -> [(smallest M, formulation)], and a mode-wide fallback for shapes not probed

Where the record holds whole decode steps of a mode (the probe times the engine's step on a random-weight model of
the probed shapes under the defaults and under the configuration the matmuls chose, each on its own paths), the
steps choose the configuration instead, with the same margin: a matmul timed alone can win where the whole program
loses (on a Sapphire Rapids Xeon, YNNPACK won bfloat16's matmuls 2.1x, and a bfloat16 decode step under it took 755
ms against 626 ms on the defaults).

A path counts only if it is exact for its mode (`exact`): float32 and bfloat16 results within twice the error of
the default path (the plain dot, [K, N], default flags) against a float64 reference, int8 dots equal to numpy's.

Formulations (`FLOAT_FORMULATIONS` here; the int8 ones are `qwenjax.kernels.int8_matmul.XLA_FORMULATIONS`):
  dot          x @ w
  dot_2_rows   one row padded to two: XLA:CPU turns an M = 1 dot into a matrix-vector loop that is a cliff for
               every dtype on some processors (bfloat16 4x, int8 10x slower than two rows on a Sapphire Rapids)

No record active (the default, and any backend but CPU): "kn" layouts and the formulations `int8_matmul` chose
before the probe existed. Where records live, and the call library users make before their first jax computation
(`qwenjax.use_cpu_paths()`), are `qwenjax.engine.cpu_records`'; the launch scripts make it for them
(`--cpu_paths`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import platform
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp

from qwenjax._errors import ConfigError

RECORD_VERSION = 1
MODES = ("float32", "bfloat16", "w8a16", "w8a8")
INT8_MODES = ("w8a16", "w8a8")
LAYOUTS = ("kn", "nk")
# name -> XLA:CPU flags. jaxlib 0.10's backends behind XLA:CPU; a configuration whose flags this jaxlib does not
# know fails in its probe process and is recorded as unavailable.
CONFIGS: dict[str, tuple[str, ...]] = {
    "default": (),
    "onednn": ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_fusion_type=dot"),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", "--xla_cpu_experimental_xnn_fusion_type=dot"),
    "ynnpack": ("--xla_cpu_experimental_ynn_fusion_type=dot",),
}
MIN_GAIN = 1.05  # a configuration other than the defaults must be this much faster (geometric mean) to be chosen
# Timed, never chosen: in a whole program (a decode step of every layer) XLA:CPU schedules w8a16's whole-weight
# converts as early as it can, so the step holds every weight in float32 at once. A matmul timed alone cannot show
# it: on a Sapphire Rapids Xeon under YNNPACK "convert" timed 1.4-1.8x faster than "column_blocks", and the batch
# job it chose ran 1.4x slower than float32 at a peak RSS above float32's (4.06 against 3.89 GiB).
NOT_CHOSEN = {("w8a16", "convert")}
DEFAULT_FORMULATION = {"float32": "dot", "bfloat16": "dot", "w8a16": "convert", "w8a8": "int32_dot"}
# What `int8_matmul` ran on CPU before there was a probe (and still runs with no record active).
LEGACY_CPU_FORMULATION = {"float32": "dot", "bfloat16": "dot", "w8a16": "column_blocks", "w8a8": "int32_dot_2_rows"}


# --- Float formulations ---

def _dot(x: jax.Array, w: jax.Array, transpose_rhs: bool, min_rows: int = 1) -> jax.Array:
  """x [M, K] @ w [K, N] ([N, K] with transpose_rhs) in x's dtype -> [M, N] (the model's own expression); M padded
  with zero rows to min_rows first."""
  m = x.shape[0]
  if m < min_rows:
    x = jnp.pad(x, ((0, min_rows - m), (0, 0)))
  w = w.astype(x.dtype)
  return (x @ (w.T if transpose_rhs else w))[:m]


def _dot_2_rows(x: jax.Array, w: jax.Array, transpose_rhs: bool) -> jax.Array:
  return _dot(x, w, transpose_rhs, min_rows=2)


# (x [M, K], w float, transpose_rhs) -> [M, N] in x's dtype.
FLOAT_FORMULATIONS = {"dot": _dot, "dot_2_rows": _dot_2_rows}


def float_mode(dtype) -> str:
  """The probe mode of a float matmul in `dtype`."""
  return "bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32"


# --- The record and the choice ---

@dataclasses.dataclass(frozen=True)
class Paths:
  """One mode's chosen paths (`select`). formulations: (K, N) -> ((smallest M, formulation), ...) ascending in M;
  fallback: the same for shapes the probe did not time; default_layout: the int8 layout of those shapes (the one
  most probed shapes chose)."""

  mode: str
  config: str
  flags: tuple[str, ...]
  layouts: Mapping[tuple[int, int], str]
  formulations: Mapping[tuple[int, int], tuple[tuple[int, str], ...]]
  fallback: tuple[tuple[int, str], ...]
  default_layout: str = "kn"

  def formulation(self, m: int, k: int, n: int) -> str:
    steps = self.formulations.get((k, n), self.fallback)
    chosen = steps[0][1]
    for rows, name in steps:
      if m >= rows:
        chosen = name
    return chosen

  def layout(self, k: int, n: int) -> str:
    return self.layouts.get((k, n), self.default_layout)

  def describe(self) -> str:
    """One line per choice: what --verbosity=1 prints."""
    lines = [f"{self.mode}: XLA:CPU configuration {self.config!r} ({' '.join(self.flags) or 'no flags'})"]
    for (k, n), steps in sorted(self.formulations.items()):
      ranges = ", ".join(f"M>={rows}: {name}" for rows, name in steps)
      layout = f" layout {self.layout(k, n)}" if self.mode in INT8_MODES else ""
      lines.append(f"  {k}x{n}{layout}: {ranges}")
    return "\n".join(lines)


def exact(entry: Mapping, baseline_error: float | None) -> bool:
  """Whether one timed path counts for its mode: int8 dots equal numpy's (`int_exact`), float results within
  twice the default path's error against the float64 reference (and a floor of a few float32 or bfloat16 ulps)."""
  if entry.get("int_exact") is False:
    return False
  error = entry.get("error")
  if error is None or not math.isfinite(error):
    return False
  floor = 2.0 ** -20 if entry["mode"] != "bfloat16" else 2.0 ** -6
  return error <= max(2.0 * (baseline_error or 0.0), floor)


def _entries(record: Mapping) -> list[dict]:
  return [e for e in record.get("timings", []) if isinstance(e, dict)]


def select(record: Mapping, mode: str, config: str | None = None) -> Paths:
  """The paths a record chooses for `mode` (the rules in the module docstring). config: the XLA:CPU configuration
  the process runs under when it is not the mode's own choice (a process has one: the other modes of a process
  choose their formulations and layouts among that configuration's timings); None chooses it. ConfigError if the
  record holds no exact timing of the mode under the default configuration."""
  if mode not in MODES:
    raise ConfigError(f"cpu paths mode {mode!r} is not one of {MODES}.")
  entries = [e for e in _entries(record) if e.get("mode") == mode]
  base_layout = "kn" if mode in INT8_MODES else "-"  # float weights have one layout, recorded as "-"
  baseline = {(e["k"], e["n"], e["m"]): e["error"] for e in entries if e["config"] == "default"
              and e["formulation"] == DEFAULT_FORMULATION[mode] and e["layout"] == base_layout}
  usable = [e for e in entries if (e["k"], e["n"], e["m"]) in baseline and (mode, e["formulation"]) not in NOT_CHOSEN
            and exact(e, baseline[e["k"], e["n"], e["m"]])]
  best: dict[tuple, float] = {}  # (config, k, n, m) -> fastest exact microseconds
  for e in usable:
    key = (e["config"], e["k"], e["n"], e["m"])
    best[key] = min(best.get(key, math.inf), e["us"])
  cells = sorted({key[1:] for key in best if key[0] == "default"})
  if not cells:
    raise ConfigError(f"the cpu paths record holds no exact {mode} timing under the default configuration.")
  score = {}
  for candidate in sorted({key[0] for key in best}):
    if all((candidate, *cell) in best for cell in cells):
      score[candidate] = math.exp(sum(math.log(best[(candidate, *cell)]) for cell in cells) / len(cells))
  if config is None:
    steps = {c: ms for c, ms in step_scores(record, mode).items() if c in score}
    if "default" in steps:  # whole decode steps were timed: they decide, among the configurations they timed
      score = steps
    config = min(score, key=score.get)
    if config != "default" and score["default"] < MIN_GAIN * score[config]:
      config = "default"
  elif config not in score:  # not timed (or not exact) in this mode: XLA's defaults are what was measured
    config = "default"

  mine = [e for e in usable if e["config"] == config]
  shapes = sorted({(e["k"], e["n"]) for e in mine})
  layouts, formulations, wins = {}, {}, {}
  for k, n in shapes:
    layout = base_layout
    if mode in INT8_MODES:
      totals = {}
      for candidate in LAYOUTS:
        times = [min((e["us"] for e in mine if (e["k"], e["n"], e["m"], e["layout"]) == (k, n, m, candidate)),
                     default=math.inf) for m in sorted({e["m"] for e in mine if (e["k"], e["n"]) == (k, n)})]
        totals[candidate] = sum(math.log(t) for t in times)  # geometric mean: every row count counts alike
      layout = min(LAYOUTS, key=lambda c: (totals[c], c != "kn"))
      layouts[k, n] = layout
    steps = []
    for m in sorted({e["m"] for e in mine if (e["k"], e["n"], e["layout"]) == (k, n, layout)}):
      fastest = min((e for e in mine if (e["k"], e["n"], e["m"], e["layout"]) == (k, n, m, layout)),
                    key=lambda e: e["us"])
      wins.setdefault(m, []).append(fastest["formulation"])
      if not steps or steps[-1][1] != fastest["formulation"]:
        steps.append((m if steps else 1, fastest["formulation"]))
    formulations[k, n] = tuple(steps)
  fallback = []
  for m in sorted(wins):  # the formulation most shapes chose at each probed M
    name = max(sorted(set(wins[m])), key=wins[m].count)
    if not fallback or fallback[-1][1] != name:
      fallback.append((m if fallback else 1, name))
  flags = tuple(record.get("configs", {}).get(config, {}).get("flags", CONFIGS.get(config, ())))
  chosen = list(layouts.values())
  default_layout = "nk" if chosen.count("nk") > chosen.count("kn") else "kn"
  return Paths(mode, config, flags, layouts, formulations, tuple(fallback), default_layout)


def step_scores(record: Mapping, mode: str) -> dict[str, float]:
  """configuration -> geometric mean of its recorded decode-step milliseconds in `mode`, over the batch sizes the
  defaults were stepped at (configurations stepped at all of them; a failed step has no time)."""
  steps = [e for e in record.get("steps", []) if isinstance(e, dict) and e.get("mode") == mode
           and isinstance(e.get("ms"), (int, float)) and e["ms"] > 0]
  batches = {e["batch"] for e in steps if e["config"] == "default"}
  scores = {}
  for config in sorted({e["config"] for e in steps}):
    ms = {e["batch"]: e["ms"] for e in steps if e["config"] == config}
    if batches and batches <= ms.keys():
      scores[config] = math.exp(sum(math.log(ms[b]) for b in batches) / len(batches))
  return scores


def mode_of(dtype: str, quantize: str | None) -> str:
  """The probe mode of a model: its `--quantize` mode (int8 -> w8a16, w8a8), else its compute dtype."""
  if quantize in (None, "", "none"):
    return float_mode(dtype)
  return {"int8": "w8a16", "w8a8": "w8a8"}.get(quantize, quantize)


# --- Reports ---

def format_table(record: Mapping) -> str:
  """The record as a table: one line per (shape, mode, M, layout, formulation), microseconds per configuration."""
  configs = [c for c, v in record.get("configs", {}).items() if "ok" in v.get("status", {}).values()]
  rows: dict[tuple, dict] = {}
  for e in _entries(record):
    key = (e["shape"], e["mode"], e["m"], e["layout"], e["formulation"])
    rows.setdefault(key, {})[e["config"]] = e
  head = f"{'shape':<9} {'mode':<8} {'M':>4} {'layout':<6} {'formulation':<17}" + "".join(
      f" {c:>10}" for c in configs) + "   error (default)"
  lines = [f"processor: {record.get('processor')}  jaxlib {record.get('jaxlib')}  ({record.get('created')})",
           "configurations (status per mode):",
           *(f"  {c} [{' '.join(v['flags']) or 'no flags'}]: " + ", ".join(f"{m} {s}" for m, s in v["status"].items())
             for c, v in record.get("configs", {}).items()),
           "microseconds per call:", head]
  for key in sorted(rows, key=lambda k: (k[0], ("float32", "bfloat16", "w8a16", "w8a8").index(k[1]), k[2], k[3],
                                         k[4])):
    cells = rows[key]
    err = cells.get("default", {}).get("error")
    exact = "" if cells.get("default", {}).get("int_exact", True) else " NOT EXACT"
    lines.append(f"{key[0]:<9} {key[1]:<8} {key[2]:>4} {key[3]:<6} {key[4]:<17}" + "".join(
        f" {cells[c]['us']:>10.1f}" if c in cells else f" {'-':>10}" for c in configs)
        + (f"   {err:.1e}{exact}" if err is not None else ""))
  steps = [e for e in record.get("steps", []) if isinstance(e, dict)]
  if steps:
    lines += ["decode steps (a random-weight model of the probed shapes, the engine on each configuration's own "
              "paths), ms per step:", f"{'mode':<8} {'configuration':<13} {'model':<14} {'layers':>6} {'batch':>5} "
              f"{'ms':>9}   tokens as the defaults'"]
    for e in sorted(steps, key=lambda e: (MODES.index(e["mode"]) if e.get("mode") in MODES else 9,
                                          e.get("config") != "default", e.get("config", ""), e.get("batch", 0))):
      if "ms" not in e:
        lines.append(f"{e.get('mode', '?'):<8} {e.get('config', '?'):<13} {e.get('model', '?'):<14} "
                     f"{e.get('error', 'failed')}")
        continue
      base = next((b for b in steps if b.get("config") == "default" and b.get("mode") == e["mode"]
                   and b.get("batch") == e["batch"] and "tokens" in b), None)
      same = "" if base is None or e["config"] == "default" else _same_tokens(e.get("tokens"), base["tokens"])
      lines.append(f"{e['mode']:<8} {e['config']:<13} {e['model']:<14} {e['layers']:>6} {e['batch']:>5} "
                   f"{e['ms']:>9.2f}   {same}")
  return "\n".join(lines)


def _same_tokens(tokens, base) -> str:
  if not isinstance(tokens, list) or len(tokens) != len(base):
    return "-"
  return f"{sum(a == b for a, b in zip(tokens, base))}/{len(base)} rows"


def describe_choices(record: Mapping) -> str:
  """Every mode's choice (`Paths.describe`), each under its own best configuration; where decode steps decided,
  their geometric means."""
  modes = sorted({e["mode"] for e in _entries(record)}, key=MODES.index)
  lines = []
  for mode in modes:
    lines.append(select(record, mode).describe())
    steps = step_scores(record, mode)
    if "default" in steps and len(steps) > 1:
      lines.append("  decided by decode steps (geometric mean ms): " + ", ".join(
          f"{c} {ms:.2f}" for c, ms in sorted(steps.items(), key=lambda kv: kv[1])))
  return "\n".join(lines)


def config_of_flags(xla_flags: str) -> str:
  """The configuration an XLA_FLAGS value runs: the one whose flags it all holds (the most flags wins), else the
  defaults."""
  given = set(xla_flags.split())
  held = [c for c, f in CONFIGS.items() if f and set(f) <= given]
  return max(held, key=lambda c: len(CONFIGS[c]), default="default")


# --- Where records live ---

def read_record(path: str | os.PathLike[str]) -> dict:
  """A record file -> dict; ConfigError naming the file if it is not a record of this version."""
  path = pathlib.Path(path)
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: not a readable cpu paths record ({e}).") from e
  if not isinstance(record, dict) or record.get("version") != RECORD_VERSION or not isinstance(
      record.get("timings"), list):
    raise ConfigError(f"{path}: not a cpu paths record of version {RECORD_VERSION} (run python -m "
                      "launch.bench.cpu_paths again).")
  return record


# --- The active paths ---

_ACTIVE: dict[str, Paths] = {}


def activate(paths: Paths | None, mode: str | None = None) -> None:
  """Makes `paths` what matmuls of its mode trace with from now on (None: clears `mode`'s, or every mode's).
  Programs already compiled keep the paths they were traced with: activate before building the model."""
  if paths is None:
    if mode is None:
      _ACTIVE.clear()
    else:
      _ACTIVE.pop(mode, None)
    return
  _ACTIVE[paths.mode] = paths


def record_modes(record: Mapping) -> list[str]:
  """The modes `record` holds timings of, in MODES' order."""
  return sorted({e.get("mode") for e in _entries(record)} & set(MODES), key=MODES.index)


def activate_record(record: Mapping, config: str) -> dict[str, Paths]:
  """Activates, for every mode `record` holds, its paths under `config`, the XLA:CPU configuration this process
  runs (one per process: `config_of_flags`); returns them by mode."""
  chosen = {mode: select(record, mode, config=config) for mode in record_modes(record)}
  for paths in chosen.values():
    activate(paths)
  return chosen


@contextlib.contextmanager
def using(*paths: Paths) -> Iterator[None]:
  """Exactly `paths` active for the duration of a block (none: the defaults), what was active before restored
  after it (tests)."""
  saved = dict(_ACTIVE)
  _ACTIVE.clear()
  try:
    for p in paths:
      activate(p)
    yield
  finally:
    _ACTIVE.clear()
    _ACTIVE.update(saved)


def formulation(mode: str, m: int, k: int, n: int, backend: str | None = None) -> str:
  """The formulation a matmul of `mode` with M rows by a [K, N] weight traces with on `backend` (default: JAX's):
  on CPU the active record's choice (without one, `LEGACY_CPU_FORMULATION`), elsewhere the plain formula."""
  if (jax.default_backend() if backend is None else backend) != "cpu":
    return DEFAULT_FORMULATION[mode]
  paths = _ACTIVE.get(mode)
  return LEGACY_CPU_FORMULATION[mode] if paths is None else paths.formulation(m, k, n)


def int8_layout(mode: str, k: int, n: int) -> str:
  """The stored layout of an int8 [K, N] projection of `mode`: "kn", or "nk" (output-major) where the record's
  probe found it faster."""
  paths = _ACTIVE.get(mode)
  return "kn" if paths is None or jax.default_backend() != "cpu" else paths.layout(k, n)


def accelerator_installed() -> bool:
  """Whether a TPU or GPU plugin for jax is installed (then jax will not compute on the CPU: no paths to choose),
  found without starting any backend."""
  import pkgutil  # noqa: PLC0415

  return any(m.name.startswith(("libtpu", "jax_cuda", "jax_rocm")) for m in pkgutil.iter_modules())


# The XLA_FLAGS value a qwenjax process set for its own mode. Its subprocesses inherit both: a launch script that a
# benchmark or a tool starts for another mode sees XLA_FLAGS equal to this and knows them for qwenjax's, not the
# user's (which always win), so it runs its own mode's configuration.
SET_XLA_FLAGS_ENV = "QWENJAX_SET_XLA_FLAGS"


def apply_xla_flags(paths: Paths, environ: dict | None = None) -> str | None:
  """Puts the chosen configuration's flags in XLA_FLAGS unless the user set XLA_FLAGS (theirs always win); flags a
  qwenjax parent process set (`SET_XLA_FLAGS_ENV`) are replaced, or removed where the defaults were chosen.
  Returns what was set, or None. XLA reads XLA_FLAGS when its CPU backend starts: call before jax computes."""
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  if current and current != environ.get(SET_XLA_FLAGS_ENV):
    return None
  if not paths.flags:
    environ.pop("XLA_FLAGS", None)
    environ.pop(SET_XLA_FLAGS_ENV, None)
    return None
  environ["XLA_FLAGS"] = environ[SET_XLA_FLAGS_ENV] = " ".join(paths.flags)
  return environ["XLA_FLAGS"]


def machine() -> str:
  """The processor's model name, for reports."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
