"""qwenjax.kernels.cpu_paths and launch.bench.cpu_paths: the choice made from recorded tables (hand-built ones with
the answer derived by hand, and the probe's record of a Sapphire Rapids Xeon in tests/data), one real probe of
tiny shapes in subprocesses, and every formulation's results held to the default path's."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import ConfigError
from qwenjax.kernels import cpu_paths, int8_matmul

REPO = pathlib.Path(__file__).resolve().parents[2]
XEON_RECORD = REPO / "tests" / "data" / "cpu_paths_xeon.json"
ZEN3_RECORD = REPO / "tests" / "data" / "cpu_paths_zen3.json"  # AMD EPYC, AVX2 only; with the probe's decode steps
ZEN5_RECORD = REPO / "tests" / "data" / "cpu_paths_zen5.json"  # AMD EPYC, AVX-512 with VNNI and BF16; with steps


def _entry(mode, m, us, *, config="default", layout=None, formulation=None, error=1e-7, k=64, n=96, **extra):
  layout = layout or ("kn" if mode in cpu_paths.INT8_MODES else "-")
  return dict(config=config, mode=mode, shape=f"{k}x{n}", k=k, n=n, m=m, layout=layout,
              formulation=formulation or cpu_paths.DEFAULT_FORMULATION[mode], us=us, error=error, **extra)


def _record(*entries, configs=("default", "onednn")):
  return {"version": cpu_paths.RECORD_VERSION, "timings": list(entries),
          "configs": {c: {"flags": list(cpu_paths.CONFIGS[c]), "status": {m: "ok" for m in cpu_paths.MODES}}
                      for c in configs}}


def test_a_configuration_must_win_by_more_than_the_margin():
  # onednn is 10% faster at both row counts: chosen, with its flags. At 3% faster it is noise: the defaults stay.
  faster = _record(_entry("float32", 1, 100.0), _entry("float32", 8, 200.0),
                   _entry("float32", 1, 90.0, config="onednn"), _entry("float32", 8, 180.0, config="onednn"))
  paths = cpu_paths.select(faster, "float32")
  assert paths.config == "onednn" and paths.flags == cpu_paths.CONFIGS["onednn"]
  close = _record(_entry("float32", 1, 100.0), _entry("float32", 8, 200.0),
                  _entry("float32", 1, 97.0, config="onednn"), _entry("float32", 8, 194.0, config="onednn"))
  assert cpu_paths.select(close, "float32").config == "default"


def test_a_process_of_another_configuration_chooses_among_its_timings():
  """One XLA configuration per process: a mode that is not the process's own chooses among the timings of the
  configuration the process runs (here onednn's formulation differs from the defaults')."""
  e = lambda m, us, config, formulation: _entry("bfloat16", m, us, config=config, formulation=formulation)
  record = _record(e(1, 100, "default", "dot"), e(1, 50, "default", "dot_2_rows"),
                   e(1, 10, "onednn", "dot"), e(1, 40, "onednn", "dot_2_rows"))
  assert cpu_paths.select(record, "bfloat16").formulation(1, 64, 96) == "dot"  # onednn, 5x the defaults
  assert cpu_paths.select(record, "bfloat16", config="default").formulation(1, 64, 96) == "dot_2_rows"
  assert cpu_paths.select(record, "bfloat16", config="xnnpack").config == "default"  # never timed: the defaults
  assert cpu_paths.config_of_flags("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot "
                                   "--xla_dump_to=/tmp") == "onednn"
  assert cpu_paths.config_of_flags("--xla_cpu_use_onednn=true") == "default"
  assert cpu_paths.config_of_flags("") == "default"


def _step(mode, config, batch, ms):
  return dict(config=config, mode=mode, model="tiny", layers=2, batch=batch, ms=ms, tokens=[[1, 2]] * batch)


def test_decode_steps_overrule_the_matmuls():
  """onednn wins the matmuls 2x. Timed whole decode steps decide instead, with the same margin; a configuration
  whose step failed, or was not timed at every batch size the defaults were, is never chosen over them."""
  matmuls = [_entry("float32", 1, 100.0), _entry("float32", 8, 200.0),
             _entry("float32", 1, 50.0, config="onednn"), _entry("float32", 8, 100.0, config="onednn")]
  assert cpu_paths.select(_record(*matmuls), "float32").config == "onednn"
  cases = {
      "default": [_step("float32", "default", 1, 40.0), _step("float32", "default", 32, 300.0),
                  _step("float32", "onednn", 1, 50.0), _step("float32", "onednn", 32, 280.0)],  # onednn loses
      "onednn": [_step("float32", "default", 1, 40.0), _step("float32", "default", 32, 300.0),
                 _step("float32", "onednn", 1, 36.0), _step("float32", "onednn", 32, 270.0)],  # 10% faster
  }
  for want, steps in cases.items():
    record = dict(_record(*matmuls), steps=steps + [_step("bfloat16", "onednn", 1, 1.0)])  # another mode's
    assert cpu_paths.select(record, "float32").config == want
    assert "decided by decode steps" in cpu_paths.describe_choices(record)
  close = [_step("float32", "default", 1, 40.0), _step("float32", "onednn", 1, 39.0)]  # 2.5%: noise
  failed = [_step("float32", "default", 1, 40.0), dict(config="onednn", mode="float32", model="tiny", error="failed")]
  partial = [_step("float32", "default", 1, 40.0), _step("float32", "default", 32, 300.0),
             _step("float32", "onednn", 1, 20.0)]
  for steps in (close, failed, partial):
    assert cpu_paths.select(dict(_record(*matmuls), steps=steps), "float32").config == "default"
  # A process whose configuration is given keeps it: steps choose only the mode's own configuration.
  record = dict(_record(*matmuls), steps=cases["default"])
  assert cpu_paths.select(record, "float32", config="onednn").config == "onednn"
  table = cpu_paths.format_table(dict(record, steps=cases["default"] + failed[1:]))
  assert "decode steps" in table and "1/1 rows" in table and "failed" in table


def test_which_configurations_are_stepped():
  from launch.bench import cpu_paths as probe

  status = lambda *ok: {"status": {m: "ok" if m in ok else "failed: x" for m in cpu_paths.MODES}, "flags": []}
  record = {"version": cpu_paths.RECORD_VERSION,
            "configs": {"default": status(*cpu_paths.MODES), "onednn": status("float32"), "ynnpack": status()},
            "timings": [_entry("float32", 1, 100.0), _entry("float32", 1, 50.0, config="onednn"),
                        _entry("w8a8", 1, 100.0), _entry("w8a8", 1, 98.0, config="onednn")]}
  assert probe.step_configs(record, "float32", "candidates") == ["default", "onednn"]
  assert probe.step_configs(record, "w8a8", "candidates") == []  # the defaults chosen: nothing to confirm
  assert probe.step_configs(record, "w8a8", "all") == ["default"]  # onednn did not run w8a8
  assert probe.step_configs(record, "float32", "none") == []
  assert probe.step_configs(record, "bfloat16", "candidates") == []  # no timing at all: nothing to confirm
  old = dict(record, steps=[_step("float32", "default", 1, 1.0), _step("w8a8", "default", 1, 2.0)])
  new = dict(record, configs={"default": {"status": {"w8a8": "ok"}, "flags": []}}, timings=[_entry("w8a8", 1, 80.0)],
             steps=[_step("w8a8", "default", 1, 3.0)])
  merged = probe.merge(old, new)
  assert sorted((e["mode"], e["ms"]) for e in merged["steps"]) == [("float32", 1.0), ("w8a8", 3.0)]


def test_inexact_paths_never_count():
  # The onednn float32 path is 10x faster but 3x the default path's error; the int8 one is fast but its int32 dot
  # differs from numpy's. Neither is chosen. (Errors above the floor of 2^-20 that any float32 path may have.)
  record = _record(_entry("float32", 2, 100.0, error=1e-6), _entry("float32", 2, 10.0, config="onednn", error=3e-6),
                   _entry("w8a8", 2, 100.0), _entry("w8a8", 2, 10.0, config="onednn", int_exact=False))
  assert cpu_paths.select(record, "float32").config == "default"
  assert cpu_paths.select(record, "w8a8").config == "default"
  # Within twice the default's error it counts.
  record["timings"][1]["error"] = 1.9e-6
  assert cpu_paths.select(record, "float32").config == "onednn"
  assert not cpu_paths.exact(_entry("float32", 1, 1.0, error=math.nan), 1e-7)
  assert cpu_paths.exact(_entry("float32", 1, 1.0, error=5e-7), 0.0)  # within the floor
  assert not cpu_paths.exact(_entry("bfloat16", 1, 1.0, error=0.02), 1e-3)


def test_layout_by_total_time_and_formulation_per_row_count():
  # [K, N] wins at M = 1 and 2 by a little, [N, K] at 32 by a lot: the geometric means pick "nk"
  # (100*50*400 < 90*45*900).
  e = lambda m, us, layout, formulation: _entry("w8a8", m, us, layout=layout, formulation=formulation)
  record = _record(e(1, 95, "kn", "int32_dot"), e(1, 90, "kn", "int32_dot_2_rows"), e(2, 45, "kn", "int32_dot"),
                   e(32, 900, "kn", "int32_dot"),
                   e(1, 300, "nk", "int32_dot"), e(1, 100, "nk", "int32_dot_2_rows"), e(2, 50, "nk", "int32_dot"),
                   e(32, 400, "nk", "int32_dot"))
  paths = cpu_paths.select(record, "w8a8")
  assert paths.layout(64, 96) == "nk"
  assert paths.formulations[64, 96] == ((1, "int32_dot_2_rows"), (2, "int32_dot"))
  assert [paths.formulation(m, 64, 96) for m in (1, 2, 5, 32, 200)] == [
      "int32_dot_2_rows", "int32_dot", "int32_dot", "int32_dot", "int32_dot"]
  # A shape the probe did not time: the fallback (what most shapes chose) and the layout most shapes chose.
  assert paths.formulation(1, 7, 9) == "int32_dot_2_rows" and paths.layout(7, 9) == "nk"


def test_whole_weight_converts_are_never_chosen_for_w8a16():
  """w8a16's "convert" is timed but not chosen, however fast alone (whole programs hold every converted weight)."""
  e = lambda m, us, formulation: _entry("w8a16", m, us, formulation=formulation)
  paths = cpu_paths.select(_record(e(2, 10, "convert"), e(2, 50, "column_blocks")), "w8a16")
  assert paths.formulation(2, 64, 96) == "column_blocks"


def test_no_default_timings_is_a_clear_error():
  with pytest.raises(ConfigError, match="no exact w8a16 timing"):
    cpu_paths.select(_record(_entry("float32", 1, 1.0)), "w8a16")
  with pytest.raises(ConfigError, match="mode 'int4'"):
    cpu_paths.select(_record(), "int4")


@pytest.mark.parametrize("path,processor", [(XEON_RECORD, "Xeon"), (ZEN3_RECORD, "AMD EPYC"),
                                            (ZEN5_RECORD, "AMD EPYC")])
def test_a_recorded_probe_chooses_the_fastest_exact_path_of_each_cell(path, processor):
  """On the recorded probes of a Sapphire Rapids Xeon, a Zen 3 and a Zen 5 EPYC: at every probed (shape, M) the chosen
  formulation (in the chosen layout) is the fastest exact one there, recomputed here from the table."""
  record = json.loads(path.read_text())
  assert processor in record["processor"]
  for mode, config in [(m, None) for m in cpu_paths.MODES] + [(m, "default") for m in cpu_paths.MODES]:
    paths = cpu_paths.select(record, mode, config=config)
    rows = [e for e in record["timings"] if e["mode"] == mode]
    base = {(e["k"], e["n"], e["m"]): e["error"] for e in rows if e["config"] == "default"
            and e["formulation"] == cpu_paths.DEFAULT_FORMULATION[mode] and e["layout"] in ("kn", "-")}
    ok = [e for e in rows if cpu_paths.exact(e, base[e["k"], e["n"], e["m"]])
          and (mode, e["formulation"]) not in cpu_paths.NOT_CHOSEN]
    for k, n, m in base:
      layout = paths.layout(k, n) if mode in cpu_paths.INT8_MODES else "-"
      cell = [e for e in ok if (e["config"], e["k"], e["n"], e["m"], e["layout"]) == (paths.config, k, n, m, layout)]
      assert paths.formulation(m, k, n) == min(cell, key=lambda e: e["us"])["formulation"], (mode, k, n, m)


def test_the_zen3_record_decode_steps_overrule_bfloat16s_matmuls():
  """The recorded Zen 3 probe: YNNPACK won bfloat16's matmuls (XLA's default bfloat16 dots are 3-10x slower there)
  and w8a16's went to XNNPACK; the whole decode steps, timed after, keep the defaults for bfloat16 (435.8 against
  444.6 ms, geometric mean of batch 1 and 32) and confirm XNNPACK for w8a16 (171.8 against 183.3 ms, 6.7%)."""
  record = json.loads(ZEN3_RECORD.read_text())
  matmuls_only = dict(record, steps=[])
  assert cpu_paths.select(matmuls_only, "bfloat16").config == "ynnpack"
  assert cpu_paths.select(matmuls_only, "w8a16").config == "xnnpack"
  ms = {(e["mode"], e["config"], e["batch"]): e["ms"] for e in record["steps"]}
  assert math.sqrt(ms["bfloat16", "default", 1] * ms["bfloat16", "default", 32]) == pytest.approx(435.79, abs=0.01)
  assert math.sqrt(ms["bfloat16", "ynnpack", 1] * ms["bfloat16", "ynnpack", 32]) == pytest.approx(444.63, abs=0.01)
  assert cpu_paths.select(record, "bfloat16").config == "default"
  assert cpu_paths.select(record, "w8a16").config == "xnnpack"
  assert {cpu_paths.select(record, m).config for m in ("float32", "w8a8")} == {"default"}


def test_the_zen5_record_chooses_by_its_steps_and_the_margin():
  """The recorded Zen 5 probe (AVX-512 with VNNI and BF16): XNNPACK's float32 matmuls (geometric mean 681.2 against
  735.9 us) and decode steps (73.27 against 80.16 ms) win; YNNPACK's bfloat16 dots are 2.2x the defaults' but the
  whole bfloat16 steps are within the 5% margin (207.62 against 211.76 ms), so the defaults stay; XNNPACK is
  confirmed for w8a16 (82.78 against 87.90 ms); w8a8's XNNPACK matmuls win by 2.7% (167.3 against 171.8 us), under
  the margin, and were not stepped."""
  record = json.loads(ZEN5_RECORD.read_text())
  assert record["processor"] == "AMD EPYC" and record["key"] != json.loads(ZEN3_RECORD.read_text())["key"]
  matmuls_only = dict(record, steps=[])
  assert {m: cpu_paths.select(matmuls_only, m).config for m in cpu_paths.MODES} == {
      "float32": "xnnpack", "bfloat16": "ynnpack", "w8a16": "xnnpack", "w8a8": "default"}
  steps = {(e["mode"], e["config"]): e["ms"] for e in record["steps"]}
  for mode, config, ms in (("float32", "xnnpack", 73.27), ("float32", "default", 80.16), ("bfloat16", "ynnpack",
                            207.62), ("bfloat16", "default", 211.76), ("w8a16", "xnnpack", 82.78), ("w8a16",
                            "default", 87.90)):
    assert cpu_paths.step_scores(record, mode)[config] == pytest.approx(ms, abs=0.01), (mode, config)
  assert not any(mode == "w8a8" for mode, _ in steps)
  assert {m: cpu_paths.select(record, m).config for m in cpu_paths.MODES} == {
      "float32": "xnnpack", "bfloat16": "default", "w8a16": "xnnpack", "w8a8": "default"}


def test_a_dead_worker_is_recorded_by_its_fatal_line():
  """What a probe worker's death is recorded as: Python's fatal error even where a library's message ran into it
  (oneDNN on a Zen 3 EPYC, stderr as captured), and the last path timed."""
  from launch.bench import cpu_paths as probe

  stderr = ("I1206 14:51:03.161358 139861722442624 cpu_paths.py:190] onednn mlp_up float32 M=1 - dot_2_rows: "
            "1648.8 us, error 2.10e-07\npartition compile failedFatal Python error: Illegal instruction\n\n"
            "Thread 0x00007f341848ab80 (most recent call first):\n  File \"/x/y.py\", line 1 in f\n\n"
            "Extension modules: jaxlib.cpu_feature_guard, numpy._core._multiarray_umath (total: 2)\n")
  assert probe._failure(stderr, -4) == ("Fatal Python error: Illegal instruction (partition compile failed) (after: "
                                        "onednn mlp_up float32 M=1 - dot_2_rows: 1648.8 us, error 2.10e-07)")
  assert probe._failure("Traceback (most recent call last):\nValueError: bad flag\n", 1) == (
      "ValueError: bad flag (before the first path)")
  assert probe._failure("", -9) == "exit status -9 (before the first path)"


def test_user_xla_flags_win():
  paths = cpu_paths.Paths("float32", "onednn", cpu_paths.CONFIGS["onednn"], {}, {}, ((1, "dot"),))
  env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  assert cpu_paths.apply_xla_flags(paths, env) is None and env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
  env = {}
  assert cpu_paths.apply_xla_flags(paths, env) == " ".join(cpu_paths.CONFIGS["onednn"]) == env["XLA_FLAGS"]


def test_flags_a_qwenjax_parent_set_are_not_the_users():
  """A benchmark sets its own mode's flags, then starts launch scripts of other modes, which inherit its environment:
  each must run its own mode's configuration (the benchmark's w8a8 job ran under float32's XNNPACK, its log saying
  "XLA_FLAGS of your own"), while flags the user set, even after a qwenjax parent's, still win."""
  xnnpack = cpu_paths.Paths("float32", "xnnpack", cpu_paths.CONFIGS["xnnpack"], {}, {}, ((1, "dot"),))
  defaults = cpu_paths.Paths("w8a8", "default", (), {}, {}, ((1, "int32_dot"),))
  ynnpack = cpu_paths.Paths("w8a16", "ynnpack", cpu_paths.CONFIGS["ynnpack"], {}, {}, ((1, "column_blocks"),))
  parent = {}
  cpu_paths.apply_xla_flags(xnnpack, parent)
  assert parent == {"XLA_FLAGS": " ".join(cpu_paths.CONFIGS["xnnpack"]),
                    cpu_paths.SET_XLA_FLAGS_ENV: " ".join(cpu_paths.CONFIGS["xnnpack"])}
  child = dict(parent)
  assert cpu_paths.apply_xla_flags(defaults, child) is None and child == {}  # XLA's defaults: no flags at all
  child = dict(parent)
  assert cpu_paths.apply_xla_flags(ynnpack, child) == " ".join(cpu_paths.CONFIGS["ynnpack"]) == child["XLA_FLAGS"]
  users = dict(parent, XLA_FLAGS="--xla_cpu_enable_fast_math=false")  # the user's own, set after the parent's
  assert cpu_paths.apply_xla_flags(ynnpack, users) is None and users["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
  assert cpu_paths.apply_xla_flags(defaults, users) is None and users["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"


def test_the_probe_and_the_benchmark_parts_import_beside_a_launch_script():
  """Tests and tools import the probe's and the benchmark's parts into one process with the launch scripts: none may
  define a flag at import that a launch script defines too (the probe's --output met batch_generate's in CI)."""
  parts = ["cpu_paths", "perplexity", "decode_profile", "speculative", "adapters", "concurrency", "job", "prefix",
           "workload", "report"]
  code = (f"import importlib\nfor name in ('launch.batch_generate', *('launch.bench.' + p for p in {parts!r})):\n"
          "  importlib.import_module(name)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_real_probe_of_tiny_shapes(tmp_path):
  """The probe end to end: two configurations, each in its own process, every mode, both layouts; every path's
  error is recorded and every int8 dot equals numpy's; the record reads back and chooses for every mode."""
  out = tmp_path / "record.json"
  probe = lambda *args: subprocess.run(
      [sys.executable, "-m", "launch.bench.cpu_paths", "--shapes=64x96,96x64", "--rows=1,3", "--repeats=1",
       "--rotate_mib=0", "--configs=default,ynnpack", "--step_model=tiny", "--step_batches=2", f"--output={out}",
       *args],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  first = probe("--modes=float32,bfloat16,w8a16", "--steps=none")
  assert first.returncode == 0, first.stderr[-2000:]
  proc = probe("--modes=w8a8", "--merge", "--steps=all")  # a launch script's first use in a new mode adds that mode
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = cpu_paths.read_record(out)
  assert {e["mode"] for e in record["steps"]} == {"w8a8"}  # the first run stepped nothing (--steps=none)
  steps = record["steps"]  # w8a8's: the engine's decode step under both configurations
  assert sorted((e["config"], e["batch"]) for e in steps) == [("default", 2), ("ynnpack", 2)]
  for e in steps:
    assert e["model"] == "tiny" and e["layers"] == 2 and math.isfinite(e["ms"]) and e["ms"] > 0
    assert len(e["tokens"]) == e["batch"] and all(len(t) == 9 and all(0 <= i < 512 for i in t) for t in e["tokens"])
  assert "decode steps" in proc.stdout
  assert record["configs"]["default"]["status"] == {mode: "ok" for mode in cpu_paths.MODES}
  assert record["configs"]["ynnpack"]["flags"] == ["--xla_cpu_experimental_ynn_fusion_type=dot"]
  timings = record["timings"]
  assert {e["mode"] for e in timings} == set(cpu_paths.MODES)
  assert {e["layout"] for e in timings if e["mode"] == "w8a8"} == {"kn", "nk"}
  assert all(e["int_exact"] for e in timings if e["mode"] == "w8a8")
  assert all(math.isfinite(e["us"]) and e["us"] > 0 for e in timings)
  for e in timings:  # every path within float32 (bfloat16) error of the float64 reference
    assert e["error"] < (2e-2 if e["mode"] == "bfloat16" else 1e-5), e
  for mode in cpu_paths.MODES:
    assert cpu_paths.select(record, mode).mode == mode
  assert "chosen:" in proc.stdout and "64x96" in proc.stdout


@pytest.mark.parametrize("formulation", sorted(cpu_paths.FLOAT_FORMULATIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m", [1, 3])
def test_float_formulations_match_numpy(formulation, dtype, m):
  rng = np.random.default_rng(m)
  x = jnp.asarray(rng.standard_normal((m, 48)), dtype)
  w = jnp.asarray(rng.standard_normal((48, 40)), dtype)
  want = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
  for transpose, weight in ((False, w), (True, w.T)):
    got = np.asarray(jax.jit(cpu_paths.FLOAT_FORMULATIONS[formulation], static_argnums=2)(x, weight, transpose)
                     .astype(jnp.float32))
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)


def test_the_active_paths_steer_the_int8_dispatch():
  """int8_matmul's XLA formulation follows the active record (per M and shape), and falls back without one."""
  paths = cpu_paths.Paths("w8a16", "default", (), {}, {(64, 96): ((1, "convert"), (8, "column_blocks"))},
                          ((1, "column_blocks"),))
  with cpu_paths.using():
    assert int8_matmul.xla_formulation("w8a16", "cpu", m=1, k=64, n=96) == "column_blocks"
  with cpu_paths.using(paths):
    assert int8_matmul.xla_formulation("w8a16", "cpu", m=1, k=64, n=96) == "convert"
    assert int8_matmul.xla_formulation("w8a16", "cpu", m=8, k=64, n=96) == "column_blocks"
    assert int8_matmul.xla_formulation("w8a16", "tpu", m=1, k=64, n=96) == "convert"
    assert int8_matmul.xla_formulation("w8a8", "cpu", m=1, k=64, n=96) == "int32_dot_2_rows"  # no w8a8 record
