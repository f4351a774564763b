r"""The CPU path probe: times the model's matmul shapes at the engine's row counts in every mode, formulation, int8
weight layout and XLA:CPU configuration, checks each result against a float64 reference, and writes the record
`qwenjax.kernels.cpu_paths` chooses from (one file per processor and jaxlib under the cache directory).

  python -m launch.bench.cpu_paths                          # Qwen2.5-0.5B's shapes, all modes and configurations
  python -m launch.bench.cpu_paths --show                   # this processor's record: its table and choices
  python -m launch.bench.cpu_paths --modes=w8a8 --configs=default,onednn --rows=1,2,8 --shapes=mlp_up,64x96

Each configuration (`cpu_paths.CONFIGS`) runs in a process of its own with its flags in XLA_FLAGS (XLA reads them
once, when its CPU backend starts); a configuration whose flags this jaxlib refuses is recorded as failed. In a
process, per shape, mode, row count M, layout and formulation: the result on one random x and weight, its error
against float64 numpy (relative to the output's largest magnitude; for int8, whether the int32 dot equals numpy's
exactly), and the best of --repeats passes over enough weight copies to cycle --rotate_mib of int8 bytes (a
decode step reads every weight from memory, not cache; `launch.bench.int8_matmul`'s timing). Formulations that
differ only at one row ("dot_2_rows", "int32_dot_2_rows") are timed at M = 1 alone: above it they are the same
program as their base.

Then the whole decode step (`--steps`): where a mode's matmuls choose a configuration other than the defaults, the
engine's decode step on a random-weight model of the probed shapes (`--step_model`, Qwen2.5-0.5B's by default, at
`--step_batches` rows) is timed under both, each in a process of its own on that configuration's own paths; the
step times, not the matmuls', then choose (`qwenjax.kernels.cpu_paths.select`). A matmul timed alone can win where
the program loses: XLA fuses, hoists and schedules a whole step differently.

Modes: float32 and bfloat16 (weights in that dtype; the vocabulary table [V, D] as the model reads it), w8a16 and
w8a8 (int8 weights [K, N] and output-major [N, K], float32 activations; the table is not quantized by default and
is left out). Launch scripts run this on first use when no record exists (`--cpu_paths=auto`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

from launch import _cli
from launch.bench import measure

SHAPES = measure.MATMUL_SHAPES
DEFAULT_ROWS = (1, 2, 8, 32, 128)
FLAGS = flags.FLAGS


def parse_shape(name: str) -> tuple[int, int, bool]:
  """A shape name or "KxN" -> (K, N, stored [N, K])."""
  if name in SHAPES:
    return SHAPES[name]
  k, sep, n = name.partition("x")
  if sep and k.isdigit() and n.isdigit() and int(k) > 0 and int(n) > 0:
    return int(k), int(n), False
  raise ValueError(f"shape {name!r} is neither one of {', '.join(SHAPES)} nor KxN")


def _presets() -> list[str]:
  from qwenjax.config import PRESETS  # noqa: PLC0415

  return list(PRESETS)


def _valid_shapes(names: list[str]) -> bool:
  try:
    return bool(names) and all(parse_shape(n) for n in names)
  except ValueError:
    return False


def _define_flags() -> None:
  """The probe's flags, defined when it runs as a program, not at import: tests and tools import this module beside
  launch scripts whose flags share names (--output)."""
  flags.DEFINE_list("modes", ["float32", "bfloat16", "w8a16", "w8a8"], "Modes to probe.")
  flags.DEFINE_list("configs", ["default", "onednn", "xnnpack", "ynnpack"], "XLA:CPU configurations.")
  flags.DEFINE_list("rows", [str(r) for r in DEFAULT_ROWS], "Row counts M (tokens) of x.")
  flags.DEFINE_list("shapes", list(SHAPES), "Weight shapes: names among "
                     f"{', '.join(SHAPES)}, or KxN (a [K, N] projection).")
  flags.DEFINE_integer("repeats", 5, "Timed passes; the best is kept.", lower_bound=1)
  flags.DEFINE_integer("rotate_mib", 64, "int8 weight bytes cycled through per pass (MiB).", lower_bound=0)
  flags.DEFINE_string("output", None, "Where the record goes (default: this processor's record file "
                       "under the cache directory, where launch scripts look for it).")
  flags.DEFINE_bool("show", False, "Print the record (--output, or this processor's) and its choices; probe "
                     "nothing.")
  flags.DEFINE_bool("merge", False, "Keep the --output record's timings of the modes not probed now (what "
                     "a launch script's first use in a new mode does).")
  flags.DEFINE_string("worker", None, "Internal: time one configuration, write JSON here.")
  flags.DEFINE_enum("steps", "candidates", ["candidates", "all", "none"], "Whole decode steps timed to "
                     "confirm a configuration: candidates: a mode's matmul choice and the defaults, where that "
                     "choice is not the defaults; all: every configuration that ran, in every mode; none.")
  flags.DEFINE_string("step_model", "qwen2.5-0.5b", "The random-weight model of those steps: a "
                       "qwenjax.PRESETS size (of the probed shapes), or 'tiny' (tests).")
  flags.DEFINE_integer("step_layers", None, "Its layers (default: the preset's).", lower_bound=1)
  flags.DEFINE_list("step_batches", ["1", "32"], "The decode batch sizes (rows) stepped.")
  flags.DEFINE_string("step_worker", None, "Internal: time one mode's decode steps in this process's "
                       "configuration under the paths of the record at --output, write JSON here.")

  flags.register_validator("rows", measure.positive_integers, "expected positive integers, e.g. 1,2,8")
  flags.register_validator("step_batches", measure.positive_integers, "expected positive integers, e.g. 1,32")
  flags.register_validator("step_model", lambda name: name == "tiny" or name in _presets(),
                           "expected 'tiny' or a qwenjax.PRESETS name")
  flags.register_validator("modes", lambda m: bool(m) and set(m) <= {"float32", "bfloat16", "w8a16", "w8a8"},
                           "expected modes among float32, bfloat16, w8a16, w8a8")
  flags.register_validator("configs", lambda c: bool(c) and set(c) <= {"default", "onednn", "xnnpack", "ynnpack"},
                           "expected configurations among default, onednn, xnnpack, ynnpack")
  flags.register_validator("shapes", _valid_shapes, f"expected shapes among {', '.join(SHAPES)}, or KxN")


# --- One configuration, in its own process ---

def _candidates(mode: str, table: bool) -> list[tuple[str, str, int]]:
  """(layout, formulation, largest M or 0 for any) to time for a mode; layout "-" for float weights."""
  from qwenjax.kernels import int8_matmul  # noqa: PLC0415

  if mode in ("float32", "bfloat16"):
    return [("-", "dot", 0), ("-", "dot_2_rows", 1)]
  if table:
    return []
  out = []
  for layout in ("kn", "nk"):
    for name in int8_matmul.XLA_FORMULATIONS[mode]:
      out.append((layout, name, 1 if name.endswith("_2_rows") else 0))
  return out


def probe_config(config: str, modes: list[str], shapes: list[str], rows: list[int], repeats: int,
                 rotate_bytes: int) -> list[dict]:
  """Every timing of this process's configuration (its flags are already in XLA_FLAGS)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from launch.bench.measure import best_seconds  # noqa: PLC0415
  from qwenjax.kernels import cpu_paths, int8_matmul  # noqa: PLC0415

  rng = np.random.default_rng(0)
  out = []
  for shape in shapes:
    k, n, table = parse_shape(shape)
    copies = max(1, math.ceil(rotate_bytes / (k * n)))
    int8_kn = [rng.integers(-127, 128, (k, n), dtype=np.int8) for _ in range(copies)]
    scale = rng.uniform(1e-3, 1e-2, (n,)).astype(np.float32)
    for mode in modes:
      candidates = _candidates(mode, table)
      if not candidates:
        continue
      floats = mode in ("float32", "bfloat16")
      if floats:
        dtype = jnp.float32 if mode == "float32" else jnp.bfloat16
        dense = (w.astype(np.float32) * scale[None, :] for w in int8_kn)  # [K, N]
        weights = {"-": [jnp.asarray(np.ascontiguousarray(d.T) if table else d, dtype) for d in dense]}
        w64 = np.asarray(weights["-"][0].astype(jnp.float32), np.float64)  # as stored, rounded to the mode
        w64 = w64.T if table else w64  # [K, N]
      else:
        weights = {"kn": [jnp.asarray(w) for w in int8_kn], "nk": [jnp.asarray(np.ascontiguousarray(w.T))
                                                                    for w in int8_kn]}
      for m in rows:
        # The float64 reference, once per row count: every candidate is held to it.
        x_np = rng.standard_normal((m, k)).astype(np.float32)
        if floats:
          x = jnp.asarray(x_np, dtype)
          ref = np.asarray(x.astype(jnp.float32), np.float64) @ w64
        else:
          x = jnp.asarray(x_np)
          if mode == "w8a16":
            ref = (x_np.astype(np.float64) @ int8_kn[0].astype(np.float64)) * scale.astype(np.float64)[None, :]
          else:
            xq, xs = (np.asarray(a) for a in int8_matmul.quantize_activations(x))
            acc = xq.astype(np.int64) @ int8_kn[0].astype(np.int64)
            ref = acc.astype(np.float64) * xs.astype(np.float64)[:, None] * scale.astype(np.float64)[None, :]
        for layout, name, max_rows in candidates:
          if max_rows and m > max_rows:
            continue
          ws = weights[layout]
          transpose = table if layout == "-" else layout == "nk"
          entry = dict(config=config, mode=mode, shape=shape, k=k, n=n, m=m, layout=layout, formulation=name)
          if floats:
            fn = cpu_paths.FLOAT_FORMULATIONS[name]
            call = lambda x, w, s, fn=fn, t=transpose: fn(x, w, t)
            got = np.asarray(jax.jit(call)(x, ws[0], None).astype(jnp.float32), np.float64)
          else:
            fn = int8_matmul.XLA_FORMULATIONS[mode][name]
            call = lambda x, w, s, fn=fn, t=transpose: fn(x, w, s, t)
            if mode == "w8a8":
              core = np.asarray(int8_matmul._int32_dot(jnp.asarray(xq), ws[0], transpose,  # noqa: SLF001
                                                      min_rows=2 if name.endswith("_2_rows") else 1))
              entry["int_exact"] = bool(np.array_equal(core.astype(np.int64), acc))
            got = np.asarray(jax.jit(call)(x, ws[0], jnp.asarray(scale)), np.float64)
          entry["error"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
          entry["us"] = best_seconds(call, x, ws, jnp.asarray(scale), repeats) * 1e6
          logging.info("%s %s %s M=%d %s %s: %.1f us, error %.2e", config, shape, mode, m, layout, name,
                       entry["us"], entry["error"])
          out.append(entry)
      del weights
  return out


STEP_PROMPT_TOKENS = 16
STEP_NEW_TOKENS = 9
STEP_REPEATS = 2


def step_model(name: str, layers: int | None, mode: str):
  """The random-weight Qwen2 of a decode-step timing: `name` (a preset, or 'tiny') in `mode`'s dtype and
  quantization, with `layers` layers (None: the preset's), unrolled or scanned as the engine runs it here."""
  import dataclasses  # noqa: PLC0415

  from flax import nnx  # noqa: PLC0415

  import qwenjax  # noqa: PLC0415
  from launch.bench import workload  # noqa: PLC0415
  from qwenjax.config import DTYPES, default_scan_layers  # noqa: PLC0415

  cfg = workload.tiny_config() if name == workload.TINY else qwenjax.PRESETS[name]
  if layers is not None:
    cfg = dataclasses.replace(cfg, num_layers=layers)
  dtype = DTYPES["bfloat16" if mode == "bfloat16" else "float32"]
  quantize = {"w8a16": "int8", "w8a8": "w8a8"}.get(mode)
  return qwenjax.Qwen2(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, scan_layers=default_scan_layers(),
                       quantize=quantize)


def time_steps(record: dict, mode: str, config: str, model_name: str, layers: int | None,
               batches: list[int]) -> list[dict]:
  """One mode's decode step in this process's configuration (its flags already in XLA_FLAGS), on the paths
  `record` chooses for it there: per batch size, the milliseconds of a step of the engine (`qwenjax.Engine`, one
  slot per prompt, greedy, end-of-sequence ignored), the best of STEP_REPEATS warm runs, and the tokens it made."""
  from launch.bench import workload  # noqa: PLC0415
  from launch.bench.adapters import qwenjax_generate_fn  # noqa: PLC0415
  from qwenjax.kernels import cpu_paths  # noqa: PLC0415

  cpu_paths.activate(cpu_paths.select(record, mode, config=config))  # before the model: it fixes int8 layouts
  model = step_model(model_name, layers, mode)
  out = []
  for batch in batches:
    prompts = workload.random_prompts(model.cfg.vocab_size, batch, STEP_PROMPT_TOKENS)
    generate = qwenjax_generate_fn(model, None, max_seq_len=STEP_PROMPT_TOKENS + STEP_NEW_TOKENS)
    generate(prompts, STEP_NEW_TOKENS)  # compiles
    best = math.inf
    for _ in range(STEP_REPEATS):
      start = time.perf_counter()
      tokens, ttft = generate(prompts, STEP_NEW_TOKENS)
      best = min(best, (time.perf_counter() - start - ttft) / (STEP_NEW_TOKENS - 1))
    out.append(dict(config=config, mode=mode, model=model_name, layers=model.cfg.num_layers, batch=batch,
                    ms=best * 1e3, tokens=tokens))
    logging.info("%s %s decode step, batch %d: %.2f ms", config, mode, batch, best * 1e3)
  return out


# --- The parent: one process per configuration ---

def _worker_env(flags_: tuple[str, ...]) -> dict:
  from qwenjax.kernels import cpu_paths  # noqa: PLC0415

  env = dict(os.environ, XLA_FLAGS=" ".join(flags_), JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # time compiled code, never read back from another run
  env.pop(cpu_paths.SET_XLA_FLAGS_ENV, None)  # these flags are the worker's own, not a parent's to replace
  return env


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def step_configs(record: dict, mode: str, policy: str) -> list[str]:
  """The configurations whose decode steps confirm `mode`'s choice: under 'candidates', the defaults and the one
  its matmuls choose when that is not the defaults (none when it is); under 'all', every one that ran the mode."""
  from qwenjax import ConfigError  # noqa: PLC0415
  from qwenjax.kernels import cpu_paths  # noqa: PLC0415

  ran = [c for c, v in record["configs"].items() if v["status"].get(mode) == "ok"]
  if policy == "none" or "default" not in ran:
    return []
  if policy == "all":
    return ran
  try:
    chosen = cpu_paths.select(record, mode).config
  except ConfigError as e:  # no exact default timing: nothing to confirm
    logging.warning("%s: %s", mode, e)
    return []
  return [] if chosen == "default" else ["default", chosen]


def run_steps(record: dict, modes: list[str], policy: str, model_name: str, layers: int | None,
              batches: list[int]) -> list[dict]:
  """The decode steps of `step_configs`, each configuration and mode in a process of its own. A step that fails is
  recorded with its error (and never confirms its configuration)."""
  from qwenjax.kernels import cpu_paths  # noqa: PLC0415

  steps = []
  with tempfile.TemporaryDirectory(prefix="qwenjax-cpu-steps-") as tmp:
    record_path = os.path.join(tmp, "record.json")
    write_record(record, record_path)
    for mode in modes:
      for config in step_configs(record, mode, policy):
        result = os.path.join(tmp, f"{mode}-{config}.json")
        cmd = [sys.executable, "-m", "launch.bench.cpu_paths", f"--step_worker={result}", f"--output={record_path}",
               f"--configs={config}", f"--modes={mode}", f"--step_model={model_name}",
               f"--step_batches={','.join(map(str, batches))}"] + ([f"--step_layers={layers}"] if layers else [])
        start = time.monotonic()
        proc = subprocess.run(cmd, env=_worker_env(cpu_paths.CONFIGS[config]), capture_output=True, text=True,
                              check=False, cwd=_REPO)
        if proc.returncode == 0 and os.path.exists(result):
          with open(result, encoding="utf-8") as f:
            steps.extend(json.load(f))
          status = "ok"
        else:
          status = "failed: " + _failure(proc.stderr, proc.returncode)
          steps.append(dict(config=config, mode=mode, model=model_name, error=status))
        logging.info("decode steps, %s under %s: %s in %.0f s", mode, config, status, time.monotonic() - start)
  return steps


def run_probe(modes, configs, shapes, rows, repeats, rotate_mib) -> dict:
  """Runs every configuration in its own process and returns the record."""
  import jaxlib  # noqa: PLC0415

  from qwenjax.engine import cpu_records  # noqa: PLC0415
  from qwenjax.kernels import cpu_paths  # noqa: PLC0415

  record = {"version": cpu_paths.RECORD_VERSION, "processor": cpu_paths.machine(), "key": cpu_records.processor_key(),
            "jaxlib": jaxlib.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rows": rows, "shapes": {s: list(parse_shape(s)[:2]) for s in shapes}, "configs": {}, "timings": []}
  for config in configs:
    flags_ = cpu_paths.CONFIGS[config]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qwenjax-cpu-paths-") as tmp:
      result = os.path.join(tmp, "timings.json")
      env = _worker_env(flags_)
      cmd = [sys.executable, "-m", "launch.bench.cpu_paths", f"--worker={result}", f"--configs={config}",
             f"--modes={','.join(modes)}", f"--shapes={','.join(shapes)}", f"--rows={','.join(map(str, rows))}",
             f"--repeats={repeats}", f"--rotate_mib={rotate_mib}"]
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=_REPO)
      if proc.returncode == 0 and os.path.exists(result):
        with open(result, encoding="utf-8") as f:
          timings = json.load(f)
        record["timings"].extend(timings)
        status = "ok"
      else:
        status = "failed: " + _failure(proc.stderr, proc.returncode)
    record["configs"][config] = {"flags": list(flags_), "status": {mode: status for mode in modes},
                                 "seconds": round(time.monotonic() - start, 1)}
    logging.info("configuration %s (%s): %s in %.0f s", config, " ".join(flags_) or "no flags", status,
                 time.monotonic() - start)
  return record


def _failure(stderr: str, returncode: int) -> str:
  """What killed a worker, in one line: its fatal error or last error line, and the last path it had timed."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  # A library's last words can share the fatal line ("partition compile failedFatal Python error: Illegal
  # instruction": oneDNN on a Zen 3, no newline): the error first, what preceded it after.
  fatal = [f"{line[line.index('Fatal Python error'):]} ({line[:line.index('Fatal Python error')]})"
           if line.index("Fatal Python error") else line for line in lines if "Fatal Python error" in line]
  fatal = fatal or [line for line in lines if "Error" in line.split(":")[0]]
  timed = [line.split("] ", 1)[1] for line in lines if "cpu_paths.py" in line and "] " in line and " us, error" in line]
  what = (fatal or lines[-1:] or [f"exit status {returncode}"])[-1][:160]
  return what + (f" (after: {timed[-1][:120]})" if timed else " (before the first path)")


def merge(old: dict, new: dict) -> dict:
  """`new` with the timings of `old` whose modes `new` did not probe; each configuration's status per mode is
  `old`'s, updated by `new`'s."""
  probed = {e["mode"] for e in new["timings"]} | {m for v in new["configs"].values() for m in v["status"]}
  merged = dict(new, timings=[e for e in old.get("timings", []) if e.get("mode") not in probed] + new["timings"],
                steps=[e for e in old.get("steps", []) if e.get("mode") not in probed] + new.get("steps", []))
  merged["configs"] = {c: dict(v) for c, v in old.get("configs", {}).items()}
  for config, value in new["configs"].items():
    status = {**merged["configs"].get(config, {}).get("status", {}), **value["status"]}
    merged["configs"][config] = dict(value, status=status)
  return merged


def write_record(record: dict, path) -> None:
  from qwenjax import _files  # noqa: PLC0415

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _files.write_json(path, record, marker="qwenjax cpu paths record")


def main(argv):
  del argv
  rows = sorted({int(r) for r in FLAGS.rows})
  if FLAGS.step_worker:
    from qwenjax.kernels import cpu_paths  # noqa: PLC0415

    steps = time_steps(cpu_paths.read_record(FLAGS.output), FLAGS.modes[0], FLAGS.configs[0], FLAGS.step_model,
                       FLAGS.step_layers, [int(b) for b in FLAGS.step_batches])
    with open(FLAGS.step_worker, "w", encoding="utf-8") as f:
      json.dump(steps, f)
    return
  if FLAGS.worker:
    timings = probe_config(FLAGS.configs[0], FLAGS.modes, FLAGS.shapes, rows, FLAGS.repeats, FLAGS.rotate_mib << 20)
    with open(FLAGS.worker, "w", encoding="utf-8") as f:
      json.dump(timings, f)
    return
  from qwenjax import QwenJaxError  # noqa: PLC0415
  from qwenjax.engine import cpu_records  # noqa: PLC0415
  from qwenjax.kernels import cpu_paths  # noqa: PLC0415

  path = FLAGS.output or str(cpu_records.record_path())
  try:
    if not FLAGS.show and "default" not in FLAGS.configs:
      raise QwenJaxError("--configs must include default: every path is held to the default configuration's.")
    if FLAGS.show:
      record = cpu_paths.read_record(path)
    else:
      record = run_probe(FLAGS.modes, FLAGS.configs, FLAGS.shapes, rows, FLAGS.repeats, FLAGS.rotate_mib)
      if not record["timings"]:
        raise QwenJaxError("no configuration could be probed: " + "; ".join(
            f"{c}: {'; '.join(set(v['status'].values()))}" for c, v in record["configs"].items()))
      record["steps"] = run_steps(record, FLAGS.modes, FLAGS.steps, FLAGS.step_model, FLAGS.step_layers,
                                  [int(b) for b in FLAGS.step_batches])
      if FLAGS.merge and os.path.exists(path):
        record = merge(cpu_paths.read_record(path), record)
      write_record(record, path)
    print(cpu_paths.format_table(record))
    print("chosen:")
    print(cpu_paths.describe_choices(record))
    if not FLAGS.show:
      print(f"record: {path}")
  except QwenJaxError as e:
    _cli.fail(e)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
