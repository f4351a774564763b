"""The report's derived sections and its two views: ratios between engines, machine and versions, rounding, the
stdout table, and tokens_per_s.png drawn with matplotlib (Agg, no display needed): tokens/s against batch size,
and beside it, when measured, the batch job's whole-process seconds and the sequences each KV cache holds at once.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform

from launch.bench.adapters import ENGINES
from launch.bench.probes import cpuinfo

LABELS = {"qwenjax": "qwenjax", "transformers": "transformers", "llamacpp": "llama.cpp", "qwenjax-int8": "qwenjax-int8",
          "qwenjax-w8a8": "qwenjax-w8a8",
          # each qwenjax engine on XLA's default matmul paths, beside it on the probe's (launch/benchmark.py)
          "qwenjax-default-paths": "qwenjax xla-paths", "qwenjax-int8-default-paths": "int8 xla-paths",
          "qwenjax-w8a8-default-paths": "w8a8 xla-paths"}
COLORS = {"qwenjax": "tab:blue", "transformers": "tab:red", "llamacpp": "tab:green", "qwenjax-int8": "tab:orange",
          "qwenjax-w8a8": "tab:brown", "qwenjax-default-paths": "tab:cyan", "qwenjax-int8-default-paths": "tab:olive",
          "qwenjax-w8a8-default-paths": "tab:pink"}


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a and b else None


def compute_ratios(engines: dict, batches: list[int], job: dict | None = None,
                   concurrency: dict | None = None, dtype: str = "float32") -> dict:
  """qwenjax over the others: batch-1 decode, throughput at the largest batch, and per batch size; the batch job's
  speedups (the other engine's whole-process seconds over qwenjax's, same requests); the paged cache's sequences
  at once over the computed one-row-per-slot figure in the concurrency measurement."""

  def run(engine, batch):
    runs = engines.get(engine, {}).get("runs", [])
    return next((r for r in runs if r["batch"] == batch), None)

  def get(engine, batch, key):
    r = run(engine, batch)
    return r[key] if r else None

  q1, t1 = get("qwenjax", 1, "decode_tokens_per_s"), get("transformers", 1, "decode_tokens_per_s")
  single_stream = get("llamacpp", 1, "decode_tokens_per_s")
  big = max(batches)
  qb, tb = get("qwenjax", big, "throughput_tokens_per_s"), get("transformers", big, "throughput_tokens_per_s")
  decode = {"qwenjax_tokens_per_s": q1, "transformers_tokens_per_s": t1,
            "qwenjax_over_transformers": _ratio(q1, t1), "target": 2.0,
            "llamacpp_tokens_per_s": single_stream, "qwenjax_over_llamacpp": _ratio(q1, single_stream)}
  throughput = {"batch": big, "qwenjax_tokens_per_s": qb, "transformers_tokens_per_s": tb,
                "qwenjax_over_transformers": _ratio(qb, tb), "target": 3.0,
                "llamacpp_single_stream_decode_tokens_per_s": single_stream,
                "qwenjax_over_llamacpp_single_stream": _ratio(qb, single_stream)}
  for r in (decode, throughput):
    r["met"] = None if r["qwenjax_over_transformers"] is None else r["qwenjax_over_transformers"] >= r["target"]
  per_batch = []
  for b in batches:
    row = {"batch": b}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "throughput_tokens_per_s"):
      for other in ENGINES:
        row[f"{key}_qwenjax_over_{other}"] = _ratio(get("qwenjax", b, key), get(other, b, key))
    per_batch.append(row)
  ratios = {"decode_batch_1": decode, "throughput_largest_batch": throughput, "per_batch": per_batch}
  quantized = {}
  for name, engine in engines.items():
    q = engine.get("quantize", "none")
    if q == "none" or "qwenjax" not in engines:
      continue
    float_bytes = engines["qwenjax"].get("weight_bytes")
    bf16_bytes = None if float_bytes is None else float_bytes * 2 // (4 if dtype == "float32" else 2)
    quantized[name] = {
        "weight_bytes": engine["weight_bytes"], "over_float": _ratio(engine["weight_bytes"], float_bytes),
        "over_bfloat16": _ratio(engine["weight_bytes"], bf16_bytes), "bfloat16_target": 0.55,
        "per_batch": [{"batch": b, **{f"{key}_over_float": _ratio(get(name, b, key), get("qwenjax", b, key))
                                      for key in ("decode_tokens_per_s", "throughput_tokens_per_s")},
                       "throughput_over_transformers": _ratio(get(name, b, "throughput_tokens_per_s"),
                                                              get("transformers", b, "throughput_tokens_per_s")),
                       "decode_over_llamacpp_single_stream": _ratio(get(name, b, "decode_tokens_per_s"),
                                                                    single_stream)}
                      for b in batches]}
  if quantized:
    ratios["quantized"] = quantized
  paths = {}  # the probe's chosen matmul paths over XLA's defaults, per engine
  for name in engines:
    if name.endswith("-default-paths") and name.removesuffix("-default-paths") in engines:
      chosen = name.removesuffix("-default-paths")
      paths[chosen] = [{"batch": b, **{key: _ratio(get(chosen, b, key), get(name, b, key)) for key in (
          "prefill_tokens_per_s", "decode_tokens_per_s", "throughput_tokens_per_s")}} for b in batches]
  if paths:
    ratios["chosen_paths_over_default_paths"] = paths
  if job is not None:
    wall = {name: e["wall_s"] for name, e in job["engines"].items() if "wall_s" in e and "failed" not in e}
    ratios["job"] = {"paged_speedup_over_llamacpp": _ratio(wall.get("llamacpp"), wall.get("qwenjax"))}
    for name in wall:
      if name.startswith("qwenjax-"):
        q = name[len("qwenjax-"):]
        ratios["job"][f"{q}_speedup_over_llamacpp"] = _ratio(wall.get("llamacpp"), wall[name])
        ratios["job"][f"{q}_speedup_over_float"] = _ratio(wall.get("qwenjax"), wall[name])
  if concurrency is not None:
    ratios["concurrency"] = {"paged_over_contiguous": _ratio(concurrency["paged"]["peak_sequences"],
                                                             concurrency["contiguous_sequences"])}
  return ratios


def versions() -> dict:
  """Python's version and those of the distributions the figures depend on (None: not installed)."""
  out = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "llama_cpp_python", "gguf", "pillow"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = None
  return out


def machine() -> dict:
  """The CPU, memory and JAX devices of this run, and a one-line description for the plot's title."""
  import jax  # pylint: disable=g-import-not-at-top

  info = cpuinfo()
  cores = len(os.sched_getaffinity(0))
  mem_kib = 0
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal:"):
        mem_kib = int(line.split()[1])
  except OSError:
    pass
  cpu = info.get("model name") or platform.processor() or "unknown CPU"
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  return {"cpu_model": cpu, "cores": cores, "memory_gib": round(mem_kib / 2**20, 1), "platform": platform.platform(),
          "load_average_1min_at_end": os.getloadavg()[0],
          "jax_backend": backend, "jax_device": device, "jax_device_count": jax.device_count(),
          "description": f"{cpu}, {cores} cores" if backend == "cpu" else f"{jax.device_count()}x {device}"}


def round_figures(value, digits: int = 4):
  """Every float in a nest of dicts and lists to `digits` significant digits."""
  if isinstance(value, float):
    return float(f"{value:.{digits}g}")
  if isinstance(value, dict):
    return {k: round_figures(v, digits) for k, v in value.items()}
  if isinstance(value, list):
    return [round_figures(v, digits) for v in value]
  return value


def _times(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.2f}x"


def format_table(report: dict) -> str:
  """One row per engine and batch size, the limits used, the headline ratios against their targets; then, when
  measured, the batch job (a row per engine) and the concurrency at a long context."""
  cols = ("engine", "batch", "prefill tok/s", "TTFT s", "decode tok/s", "job tok/s", "compile s", "%BW", "%FLOPs")
  lines = ["{:<20}{:>6}{:>15}{:>9}{:>14}{:>11}{:>11}{:>7}{:>8}".format(*cols)]
  for name, engine in report["engines"].items():
    if "skipped" in engine:
      lines.append(f"{LABELS[name]:<20}  skipped: {engine['skipped']}")
      continue
    for r in engine["runs"]:
      compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
      lines.append("{:<20}{:>6}{:>15.1f}{:>9.2f}{:>14.2f}{:>11.2f}{:>11}{:>6.1f}%{:>7.1f}%".format(
          LABELS[name], r["batch"], r["prefill_tokens_per_s"], r["time_to_first_token_s"],
          r["decode_tokens_per_s"], r["throughput_tokens_per_s"], compile_s, 100 * r["decode_bandwidth_fraction"],
          100 * r["prefill_flops_fraction"]))
  used = report["device_limits"]["used"]
  lines.append(f"limits ({used['source']}): {used['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
               f"{used['peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
  ratios = report["ratios"]
  d, t = ratios["decode_batch_1"], ratios["throughput_largest_batch"]
  lines.append(f"batch-1 decode, qwenjax / transformers: {_times(d['qwenjax_over_transformers'])} "
               f"(target {d['target']:.0f}x{'' if d['met'] is None else ': met' if d['met'] else ': not met'}); "
               f"qwenjax / llama.cpp: {_times(d['qwenjax_over_llamacpp'])}")
  lines.append(f"batch-{t['batch']} job throughput, qwenjax / transformers: {_times(t['qwenjax_over_transformers'])} "
               f"(target {t['target']:.0f}x{'' if t['met'] is None else ': met' if t['met'] else ': not met'}); "
               f"qwenjax / llama.cpp single stream: {_times(t['qwenjax_over_llamacpp_single_stream'])}")
  for name, q in ratios.get("quantized", {}).items():
    per_batch = lambda key, q=q: ", ".join(f"batch {r['batch']} {_times(r[key])}" for r in q["per_batch"])
    lines.append(f"{name}: weights {q['weight_bytes'] / 2**20:.0f} MiB, {_times(q['over_float'])} float, "
                 f"{_times(q['over_bfloat16'])} bfloat16 (target <= {q['bfloat16_target']}); decode tok/s over "
                 f"float: {per_batch('decode_tokens_per_s_over_float')}; job tok/s over transformers: "
                 f"{per_batch('throughput_over_transformers')}; batch-1 decode over llama.cpp: "
                 f"{_times(q['per_batch'][0]['decode_over_llamacpp_single_stream'])}")
  if "job" in report:
    lines += ["", _job_table(report["job"], ratios["job"])]
  if "concurrency" in report:
    c, paged = report["concurrency"], report["concurrency"]["paged"]
    lines += ["", f"concurrency at {c['max_seq_len']} positions, {c['kv_cache_memory_gib']:g} GiB of KV cache: "
              f"one row per slot {c['contiguous_sequences']} sequences ({c['contiguous_row_bytes'] / 2**20:.0f} MiB "
              f"a slot, computed), "
              f"paged {paged['peak_sequences']} decoding at once (limited by {paged['limited_by']}; its "
              f"{paged['pool_pages']} pages hold ~{paged['pool_holds_sequences_of_this_job']} of this job's "
              f"sequences): {_times(ratios['concurrency']['paged_over_contiguous'])}"]
  if "prefix" in report:
    p = report["prefix"]
    lines += ["", f"shared prefixes ({p['requests']} requests, {p['shared_prefix_tokens']}-token header, "
              f"{p['unique_prompt_tokens']} unique prompt tokens): shared {p['shared']['seconds']:.1f} s, "
              f"{p['shared']['computed_prompt_tokens']} computed; unshared {p['unshared']['seconds']:.1f} s, "
              f"{p['unshared']['computed_prompt_tokens']} computed; unshared / shared time "
              f"{_times(p['ratios']['unshared_seconds_over_shared'])}, identical completions: "
              f"{p['identical_completions']}"]
  return "\n".join(lines)


def _job_table(job: dict, ratios: dict) -> str:
  p, m = job["prompt_tokens"], job["max_tokens"]
  lines = [f"batch job: {job['requests']} requests (prompts of {p['min']}-{p['max']} tokens, max_tokens "
           f"{m['min']}-{m['max']}, {job['requests_with_stop_strings']} with stop strings), {job['slots']} slots, "
           f"max_seq_len {job['max_seq_len']}; whole process: load, compile and serve",
           "{:<20}{:>8}{:>12}{:>9}{:>22}{:>10}".format("engine", "wall s", "generated", "tok/s", "identical to qwenjax",
                                                      "peak GiB")]
  for name, e in job["engines"].items():
    if "skipped" in e:
      lines.append(f"{LABELS[name]:<20}  skipped: {e['skipped']}")
      continue
    same = job["identical_completions_with_qwenjax"].get(name)
    lines.append("{:<20}{:>8.1f}{:>12}{:>9.2f}{:>22}{:>10.2f}".format(
        LABELS[name], e["wall_s"], e["generated_tokens"], e["generated_tokens_per_s"],
        "-" if same is None else f"{100 * same:.1f}%", e.get("peak_rss_gib", float("nan"))))
    if "failed" in e:
      lines.append(f"{'':<20}  failed: {e['failed']}")
  lines.append(f"job speedup of qwenjax over llama.cpp: {_times(ratios['paged_speedup_over_llamacpp'])}")
  for key, value in ratios.items():
    if key.endswith("_speedup_over_llamacpp") and not key.startswith("paged"):
      q = key[:-len("_speedup_over_llamacpp")]
      lines.append(f"job speedup of qwenjax-{q} over llama.cpp: {_times(value)}; over float qwenjax: "
                   f"{_times(ratios.get(f'{q}_speedup_over_float'))}")
  return "\n".join(lines)


def plot(report: dict, path: pathlib.Path) -> None:
  """tokens/s against batch size (log-2 axis): decode solid, whole-job throughput dashed, one color per engine. A
  single-stream engine (one batch size) continues as a thin level line across the larger batch sizes. Beside it,
  when measured: the batch job's whole-process seconds per engine, and the sequences each KV cache holds at once."""
  # A Figure on the Agg canvas, not pyplot: no display, no global figure state.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import NullLocator  # pylint: disable=g-import-not-at-top

  engines = {n: e for n, e in report["engines"].items() if "runs" in e}
  batches = sorted(report["benchmark"]["batch_sizes"])
  panels = [k for k in ("job", "concurrency") if k in report]
  figure = Figure(figsize=(9 + 3.2 * len(panels), 5.6), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  ax, *side = figure.subplots(1, 1 + len(panels), width_ratios=[3] + [1] * len(panels), squeeze=False)[0]
  for name, engine in engines.items():
    for key, style, what in (("decode_tokens_per_s", "-", "decode"), ("throughput_tokens_per_s", "--", "job")):
      xs, ys = [r["batch"] for r in engine["runs"]], [r[key] for r in engine["runs"]]
      ax.plot(xs, ys, linestyle=style, color=COLORS[name], linewidth=2, marker="o", markersize=5,
              label=f"{LABELS[name]} {what}")
      if len(xs) == 1 and batches[-1] > xs[0]:
        ax.hlines(ys[0], xs[0], batches[-1], colors=COLORS[name], linewidth=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.xaxis.set_minor_locator(NullLocator())
  if len(batches) > 1:
    ax.set_xlim(batches[0] / 2**0.1, batches[-1] * 2**0.1)
  ax.set_ylim(bottom=0)
  ax.grid(axis="y", color="0.88")
  ax.set_axisbelow(True)
  ax.set_xlabel("batch size")
  ax.set_ylabel("tokens/s")
  bench = report["benchmark"]
  ax.set_title(f"{bench['model_name']}, {bench['dtype']}, {bench['prompt_tokens']}-token prompts, "
               f"{bench['new_tokens']} new tokens\non {report['machine']['description']}", loc="left", fontsize=10)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
  for panel, axis in zip(panels, side):
    if panel == "job":
      job = report["job"]
      ran = {n: e for n, e in job["engines"].items() if "wall_s" in e}
      bars = axis.bar([LABELS[n] for n in ran], [e["wall_s"] for e in ran.values()],
                      color=[COLORS[n] for n in ran])
      axis.bar_label(bars, [f"{e['generated_tokens']} tok" for e in ran.values()], fontsize=8)
      axis.set_ylabel("whole-process seconds")
      axis.set_title(f"batch job: {job['requests']} mixed requests,\n{job['slots']} slots (lower is better)",
                     loc="left", fontsize=10)
    else:
      c = report["concurrency"]
      bars = axis.bar(["a row per slot\n(computed)", "paged"], [c["contiguous_sequences"],
                                                                c["paged"]["peak_sequences"]],
                      color=["tab:gray", COLORS["qwenjax"]])
      axis.bar_label(bars, fontsize=8)
      axis.set_ylabel("sequences decoding at once")
      axis.set_title(f"{c['kv_cache_memory_gib']:g} GiB of KV cache,\n{c['max_seq_len']}-position context",
                     loc="left", fontsize=10)
    axis.tick_params(axis="x", labelsize=8, labelrotation=20)
    axis.grid(axis="y", color="0.88")
    axis.set_axisbelow(True)
  figure.savefig(path, format="png")
