"""The report's derived sections and its two views: ratios between engines, machine and versions, rounding, the
stdout table, and tokens_per_s.png drawn with matplotlib (Agg, no display needed).
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform

from launch.bench.adapters import ENGINES
from launch.bench.probes import cpuinfo

LABELS = {"qwenjax": "qwenjax", "transformers": "transformers", "llamacpp": "llama.cpp"}
COLORS = {"qwenjax": "tab:blue", "transformers": "tab:red", "llamacpp": "tab:green"}


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a and b else None


def compute_ratios(engines: dict, batches: list[int]) -> dict:
  """qwenjax over the others: batch-1 decode, throughput at the largest batch, and per batch size."""

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
  return {"decode_batch_1": decode, "throughput_largest_batch": throughput, "per_batch": per_batch}


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


def format_table(report: dict) -> str:
  """One row per engine and batch size, the limits used, and the two headline ratios against their targets."""
  cols = ("engine", "batch", "prefill tok/s", "TTFT s", "decode tok/s", "job tok/s", "compile s", "%BW", "%FLOPs")
  lines = ["{:<13}{:>6}{:>15}{:>9}{:>14}{:>11}{:>11}{:>7}{:>8}".format(*cols)]
  for name, engine in report["engines"].items():
    if "skipped" in engine:
      lines.append(f"{LABELS[name]:<13}  skipped: {engine['skipped']}")
      continue
    for r in engine["runs"]:
      compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
      lines.append("{:<13}{:>6}{:>15.1f}{:>9.2f}{:>14.2f}{:>11.2f}{:>11}{:>6.1f}%{:>7.1f}%".format(
          LABELS[name], r["batch"], r["prefill_tokens_per_s"], r["time_to_first_token_s"],
          r["decode_tokens_per_s"], r["throughput_tokens_per_s"], compile_s, 100 * r["decode_bandwidth_fraction"],
          100 * r["prefill_flops_fraction"]))
  used = report["device_limits"]["used"]
  lines.append(f"limits ({used['source']}): {used['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
               f"{used['peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
  ratios = report["ratios"]
  fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"
  d, t = ratios["decode_batch_1"], ratios["throughput_largest_batch"]
  lines.append(f"batch-1 decode, qwenjax / transformers: {fmt(d['qwenjax_over_transformers'])} "
               f"(target {d['target']:.0f}x{'' if d['met'] is None else ': met' if d['met'] else ': not met'}); "
               f"qwenjax / llama.cpp: {fmt(d['qwenjax_over_llamacpp'])}")
  lines.append(f"batch-{t['batch']} job throughput, qwenjax / transformers: {fmt(t['qwenjax_over_transformers'])} "
               f"(target {t['target']:.0f}x{'' if t['met'] is None else ': met' if t['met'] else ': not met'}); "
               f"qwenjax / llama.cpp single stream: {fmt(t['qwenjax_over_llamacpp_single_stream'])}")
  return "\n".join(lines)


def plot(report: dict, path: pathlib.Path) -> None:
  """tokens/s against batch size (log-2 axis): decode solid, whole-job throughput dashed, one color per engine. A
  single-stream engine (one batch size) continues as a thin level line across the larger batch sizes."""
  # A Figure on the Agg canvas, not pyplot: no display, no global figure state.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import NullLocator  # pylint: disable=g-import-not-at-top

  engines = {n: e for n, e in report["engines"].items() if "runs" in e}
  batches = sorted(report["benchmark"]["batch_sizes"])
  figure = Figure(figsize=(9, 5.6), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  ax = figure.add_subplot()
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
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)
  figure.savefig(path, format="png")
