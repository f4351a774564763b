r"""Where a decode step's time goes: the engine's decode program at each batch size, traced by JAX's profiler, each
XLA operation named by the part of the model it computes; a projection's time set against the weight bytes it reads.

  python -m launch.bench.decode_profile --quantize=w8a8 --quantize_embeddings --batch_sizes=1,32
  python -m launch.bench.decode_profile --batch_sizes=1 --output=profile.json     # float32, the JSON kept

Per batch size, on a warm engine (`qwenjax.Engine`, one slot per prompt, greedy, end-of-sequence ignored):
  1. the decode step's wall time over --new_tokens tokens, as `launch.benchmark` times it (the run's time after
     every sequence had its first token, over the tokens after the first);
  2. one more run under `jax.profiler`. XLA:CPU records every operation it executes (a thunk: a fusion, a matmul
     library call, a copy) with its HLO name, and the decode program's optimized HLO, which this process has XLA
     dump to a temporary directory, says what each one is: its part of the model is the innermost of the model's
     named scopes in its metadata (`PARTS`).

Per part: milliseconds per step, operations per step, and for the projections the weight bytes read per step, the
bandwidth that makes (bytes over their time) and its fraction of the measured memory bandwidth (`probes`). The
batch-1 roofline is all weight bytes over that bandwidth. XLA:CPU runs independent operations concurrently (the
gate and up projections side by side): each instant of the program is split evenly among the operations running
then, so the parts add up to the program's own time (`program_ms`). `host_ms`, the wall step minus that, is what
runs outside the program: dispatch, the scheduler, the host reading tokens back (0 when the traced run, slowed a
little by tracing, took longer than the timed one).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import shutil
import tempfile
import time

from absl import app, flags, logging

from launch import _cli
from launch.bench.measure import positive_integers

MODULE = "jit_paged_decode_block"  # the decode program's HLO module (`qwenjax.engine.programs.paged_decode_block`)
# The model's named scopes (qwenjax/model/decoder.py, layers.py; sampling in engine/programs.py), innermost wins.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
PARTS = PROJECTIONS + ("attention", "rope", "norm", "silu", "embed", "sample")
CONTROL = ("while", "conditional", "call")  # operations whose time is that of the operations they run

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$", re.M)


def define_flags() -> None:
  """The entry point's flags, defined when it runs (launch.benchmark imports this module for `run`)."""
  flags.DEFINE_string("model", "default", "'default' (the embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf file or a "
                      "checkpoint directory.")
  flags.DEFINE_enum("preset", None, ["tiny"], "Instead of --model: launch.bench.workload's tiny random model (tests).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and weight dtype.")
  flags.DEFINE_enum("quantize", "none", ["none", "int8", "w8a8"], "Weight quantization (qwenjax.load's quantize=).")
  flags.DEFINE_bool("quantize_embeddings", False, "With --quantize, the embedding and lm_head in int8 too.")
  flags.DEFINE_list("batch_sizes", ["1"], "Batch sizes (decode slots) to profile.")
  flags.register_validator("batch_sizes", positive_integers, "expected positive integers, e.g. 1,8,32")
  flags.DEFINE_integer("prompt_tokens", 64, "Tokens in every prompt.", lower_bound=1)
  flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence, timed and traced.", lower_bound=2)
  flags.DEFINE_string("output", None, "Also write the profile as JSON here.")
  _cli.define_cpu_paths_flag("Matmul paths on CPU, as launch.generate's --cpu_paths: auto, default, or a record "
                             "file.")


# ---- the program's HLO, and the trace read against it ---------------------------------------------------------

def _elements(shape: str) -> list[int]:
  """Element counts of the arrays in an HLO shape or parameter list, in order."""
  return [math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", shape)]


def parse_hlo(text: str, weights: dict[str, int] | None = None) -> dict[str, dict]:
  """An optimized HLO module's instructions: name -> {"op", "part"}, the part being the innermost of the model's
  named scopes (PARTS) in the instruction's metadata, or "other".

  XLA's passes make some instructions without metadata (a float32 one-row matmul, rewritten). Such a matmul
  reading an operand as large as a projection's weight (`weights`: part -> elements of one layer's weight) is that
  projection's; where two have that size (q and o, k and v, gate and up), the one whose scope is on an instruction
  next to it (user or operand), else both, joined ("gate/up"). Any other takes its neighbours' part."""
  params, matmuls = {}, set()  # computation -> its parameters' element counts; computations holding a matmul
  for m in re.finditer(r"^%?([\w.\-]+) \((.*)\) -> .* \{$", text, re.M):
    params[m.group(1)] = _elements(m.group(2))
    if " dot(" in text[m.end():text.find("\n}", m.end())]:
      matmuls.add(m.group(1))
  instructions, operands, users, operand_sizes = {}, {}, collections.defaultdict(list), {}
  sizes: dict[str, list[int]] = {}  # instruction -> its result's element counts
  for m in _INSTRUCTION.finditer(text):
    name, shape, op, rest = m.groups()
    scope = re.search(r'op_name="([^"]*)"', rest)
    part = None
    if scope:
      part = next((c for c in reversed(scope.group(1).split("/")) if c in PARTS), "other")
    called = re.search(r"calls=%([\w.\-]+)", rest)
    args = re.findall(r"%([\w.\-]+)", rest.split("), ", 1)[0])
    instructions[name] = {"op": op, "part": part, "matmul": op == "dot" or bool(called and called.group(1) in matmuls)}
    operands[name], sizes[name] = args, _elements(shape)
    operand_sizes[name] = (params.get(called.group(1)) if called else None) or [sum(sizes.get(a, [0])) for a in args]
    for operand in args:
      users[operand].append(name)
  by_size = collections.defaultdict(list)
  for part, elements in (weights or {}).items():
    by_size[elements].append(part)
  for name, inst in instructions.items():
    if inst["part"] is not None:
      continue
    near = [instructions[n]["part"] for n in users[name] + operands[name] if n in instructions]
    candidates = sorted({p for e in operand_sizes[name] for p in by_size.get(e, ())} if inst["matmul"] else (),
                        key=PARTS.index)
    if candidates:
      inst["part"] = next((p for p in near if p in candidates), "/".join(candidates))
    else:
      inst["part"] = next((p for p in near if p not in (None, "other")), "other")
  return instructions


def projection_weights(model) -> tuple[dict[str, int], dict[str, int]]:
  """(bytes of the weights each projection part reads in one step, all layers; elements of one layer's weight per
  part). int8 values and their scales, or float weights; the embedding table is the head when tied (a step gathers
  only B rows of it otherwise)."""
  from qwenjax.model.decoder import weight_declarations  # pylint: disable=g-import-not-at-top
  from qwenjax.parallel.axes import LAYERS  # pylint: disable=g-import-not-at-top

  names = {"q_kernel": "q", "k_kernel": "k", "v_kernel": "v", "o_kernel": "o", "gate": "gate", "up": "up",
           "down": "down", "lm_head": "lm_head"}
  if model.cfg.tie_word_embeddings:
    names["embed"] = "lm_head"
  total: dict[str, int] = collections.Counter()
  elements: dict[str, int] = {}
  for path, var in weight_declarations(model):
    part = next((names[str(c)] for c in path if str(c) in names), None)
    if part is not None:
      total[part] += var[...].nbytes
      if str(path[-1]) != "scale":  # the values (or the float weight), not a quantized weight's scales
        layers = model.cfg.num_layers if var.axes[0] == LAYERS else 1
        elements[part] = var[...].size // layers
  return dict(total), elements


def read_trace(trace_dir: str, module: str = MODULE) -> list[dict]:
  """The thunks of `module` that the profiler recorded: [{"name", "ts", "dur"}] (microseconds)."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}.")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [{"name": e["name"], "ts": e["ts"], "dur": e["dur"]} for e in events
          if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == module]


def attribute(events: list[dict]) -> tuple[list[float], float]:
  """Each event's share of the wall time: every instant split evenly among the events running then (XLA:CPU runs
  independent operations concurrently), so that the shares add up to the time covered (returned second, in the
  events' unit). Nested events (a while loop around its body) share with what they contain: leave them out."""
  bounds = sorted({e["ts"] for e in events} | {e["ts"] + e["dur"] for e in events})
  starts = collections.defaultdict(list)
  ends = collections.defaultdict(list)
  for i, e in enumerate(events):
    starts[e["ts"]].append(i)
    ends[e["ts"] + e["dur"]].append(i)
  share, active, covered = [0.0] * len(events), set(), 0.0
  for t, t_next in zip(bounds, bounds[1:] + [math.inf]):
    active.difference_update(ends.get(t, ()))
    active.update(i for i in starts.get(t, ()) if events[i]["dur"] > 0)
    if active and t_next < math.inf:
      covered += t_next - t
      for i in active:
        share[i] += (t_next - t) / len(active)
  return share, covered


def summarize(events: list[dict], instructions: dict[str, dict], weights: dict[str, int], bandwidth: float) -> dict:
  """Per part: its share of the program's time per step (`attribute`), operations per step, and for projections
  the weight bytes (`projection_weights`) over that time; the program's own time per step."""
  known = [e for e in events if e["name"] in instructions]
  if not known:
    raise RuntimeError("none of the traced operations is in the dumped decode program (another jaxlib's names?).")
  head = collections.Counter(e["name"] for e in known if instructions[e["name"]]["part"] == "lm_head")
  if not head:
    raise RuntimeError("no lm_head operation in the trace: the decode program's scopes are missing.")
  steps = max(head.values())  # the head's matmul runs once per step
  leaves = [e for e in known if instructions[e["name"]]["op"] not in CONTROL]
  shares, covered = attribute(leaves)
  parts: dict[str, dict] = collections.defaultdict(lambda: {"us": 0.0, "ops": 0})
  for e, us in zip(leaves, shares):
    parts[instructions[e["name"]]["part"]]["us"] += us
    parts[instructions[e["name"]]["part"]]["ops"] += 1
  rows = {}
  for name, p in sorted(parts.items(), key=lambda kv: -kv[1]["us"]):
    row = {"ms": p["us"] / 1e3 / steps, "ops": p["ops"] / steps}
    read = sum(weights.get(p, 0) for p in name.split("/"))  # a joined part ("gate/up") reads both weights
    if read and p["us"] > 0:
      row["weight_mb"] = read / 1e6
      row["gb_per_s"] = read / (row["ms"] / 1e3) / 1e9
      row["of_bandwidth"] = row["gb_per_s"] * 1e9 / bandwidth
    rows[name] = row
  total = sum(weights.values())
  return {"steps_traced": steps, "program_ms": covered / 1e3 / steps, "weight_mb": total / 1e6,
          "roofline_ms": total / bandwidth * 1e3, "parts": rows}


# ---- one engine, timed and traced ---------------------------------------------------------------------------

def _decode_module(dump_dir: str, before: set[str], names: set[str]) -> str:
  """The dumped decode program the trace ran: of the files dumped since `before`, the one holding the most of the
  traced operation names."""
  files = set(glob.glob(os.path.join(dump_dir, f"*{MODULE}*after_optimizations.txt"))) - before
  if not files:
    raise RuntimeError(f"XLA dumped no {MODULE} program to {dump_dir}.")
  best = None
  for path in sorted(files):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    found = sum(f"%{n} " in text for n in names)
    if best is None or found > best[0]:
      best = (found, text)
  return best[1]


def profile_batch(model, tokenizer, prompts: list[list[int]], new_tokens: int, dump_dir: str,
                  bandwidth: float, projections: tuple[dict[str, int], dict[str, int]]) -> dict:
  """One batch size: the wall decode step, then the traced run read against the dumped program. projections:
  the model's `projection_weights`."""
  import jax  # pylint: disable=g-import-not-at-top

  from launch.bench.adapters import qwenjax_generate_fn  # pylint: disable=g-import-not-at-top

  before = set(glob.glob(os.path.join(dump_dir, "*")))
  generate = qwenjax_generate_fn(model, tokenizer, max_seq_len=len(prompts[0]) + new_tokens)
  generate(prompts, new_tokens)  # compiles every program the run needs
  start = time.perf_counter()
  _, ttft = generate(prompts, new_tokens)
  step_ms = 1e3 * (time.perf_counter() - start - ttft) / (new_tokens - 1)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    try:
      generate(prompts, new_tokens)
    finally:
      jax.profiler.stop_trace()
    events = read_trace(trace_dir)
  weights, elements = projections
  instructions = parse_hlo(_decode_module(dump_dir, before, {e["name"] for e in events}), elements)
  result = {"batch": len(prompts), "step_ms": step_ms, **summarize(events, instructions, weights, bandwidth)}
  result["host_ms"] = max(0.0, step_ms - result["program_ms"])
  return result


def format_profile(result: dict, bandwidth: float) -> str:
  """A batch size's profile as a text table."""
  lines = [f"batch {result['batch']}: step {result['step_ms']:.2f} ms wall, decode program {result['program_ms']:.2f}"
           f" ms, outside it {result['host_ms']:.2f} ms; weights {result['weight_mb']:.0f} MB a step, roofline "
           f"{result['roofline_ms']:.2f} ms at {bandwidth / 1e9:.1f} GB/s (the step is "
           f"{result['step_ms'] / result['roofline_ms']:.2f}x it)",
           f"  {'part':10s} {'ms/step':>8s} {'share':>6s} {'ops':>6s} {'MB':>7s} {'GB/s':>6s} {'of BW':>6s}"]
  for name, r in result["parts"].items():
    share = r["ms"] / result["program_ms"]
    extra = (f" {r['weight_mb']:7.1f} {r['gb_per_s']:6.1f} {r['of_bandwidth']:6.0%}" if "weight_mb" in r else "")
    lines.append(f"  {name:10s} {r['ms']:8.3f} {share:6.1%} {r['ops']:6.1f}{extra}")
  return "\n".join(lines)


def run(out_dir, *, model: str | None, preset: str | None, dtype: str, quantize: list[str],
        quantize_embeddings: bool, batch_sizes: list[int], prompt_tokens: int, new_tokens: int) -> dict:
  """launch.benchmark's --profile: this module in a process of its own per engine (float weights and each of
  `quantize`), so that its XLA dump flags touch no other measurement. Returns {engine: profile, or {"error"}}."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  results = {}
  for q in [None, *quantize]:
    name = "qwenjax" + (f"-{q}" if q else "")
    output = pathlib.Path(out_dir) / f"decode_profile_{q or 'float'}.json"
    command = [sys.executable, "-m", "launch.bench.decode_profile", f"--dtype={dtype}",
               f"--batch_sizes={','.join(map(str, batch_sizes))}", f"--prompt_tokens={prompt_tokens}",
               f"--new_tokens={new_tokens}", f"--output={output}", f"--quantize={q or 'none'}"]
    command += [f"--preset={preset}"] if preset else [f"--model={model}"]
    if q and quantize_embeddings:
      command.append("--quantize_embeddings")
    logging.info("Decode profile of %s: %s", name, " ".join(command[1:]))
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      lines = [line for line in proc.stderr.splitlines() if line.strip()]
      results[name] = {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
      logging.warning("Decode profile of %s failed: %s", name, results[name]["error"])
      continue
    with open(output, encoding="utf-8") as f:
      results[name] = json.load(f)
  return results


def format_profiles(profiles: dict) -> str:
  """launch.benchmark's text for its --profile section: each engine's tables."""
  blocks = []
  for name, profile in profiles.items():
    if "error" in profile:
      blocks.append(f"decode profile, {name}: failed: {profile['error']}")
      continue
    blocks.append(f"decode profile, {name}:")
    blocks += [format_profile(b, profile["bandwidth_bytes_per_s"]) for b in profile["batches"]]
  return "\n".join(blocks)


def main(argv):
  del argv
  f = flags.FLAGS
  from qwenjax import QwenJaxError  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

  try:
    sizes = [int(b) for b in f.batch_sizes]
    _cli.use_cpu_paths(f.cpu_paths, cpu_paths.mode_of(f.dtype, f.quantize))  # before jax starts its backend
    dump_dir = tempfile.mkdtemp(prefix="qwenjax-decode-hlo-")
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_as_text",
        f"--xla_dump_hlo_module_re={MODULE}"]))
    from launch.bench import probes, workload  # pylint: disable=g-import-not-at-top
    from launch.bench.perplexity import _load  # pylint: disable=g-import-not-at-top

    limits = probes.probe_device(f.dtype)
    bandwidth = probes.device_limits(f.dtype, [limits])["used"]["memory_bandwidth_bytes_per_s"]
    if f.preset:
      from flax import nnx  # pylint: disable=g-import-not-at-top

      import qwenjax  # pylint: disable=g-import-not-at-top
      from qwenjax.config import DTYPES, default_scan_layers  # pylint: disable=g-import-not-at-top

      cfg = workload.tiny_config()
      model = qwenjax.Qwen2(cfg, rngs=nnx.Rngs(0), dtype=DTYPES[f.dtype], param_dtype=DTYPES[f.dtype],
                            quantize=None if f.quantize == "none" else f.quantize,
                            quantize_embeddings=f.quantize_embeddings, scan_layers=default_scan_layers())
      tokenizer, prompts = None, workload.random_prompts(cfg.vocab_size, max(sizes), f.prompt_tokens)
      source = f"--preset={f.preset}"
    else:
      loaded = _load(f.model, f.dtype, f.quantize, f.quantize_embeddings)
      model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
      prompts = workload.chat_prompts(tokenizer, max(sizes), f.prompt_tokens)
    report = {"model": source, "dtype": f.dtype, "quantize": f.quantize,
              "quantize_embeddings": f.quantize_embeddings, "xla_flags": os.environ["XLA_FLAGS"],
              "machine": cpu_paths.machine(), "bandwidth_bytes_per_s": bandwidth, "probes": limits, "batches": []}
    projections = projection_weights(model)
    try:
      for b in sizes:
        result = profile_batch(model, tokenizer, prompts[:b], f.new_tokens, dump_dir, bandwidth, projections)
        report["batches"].append(result)
        print(format_profile(result, bandwidth), flush=True)
    finally:
      shutil.rmtree(dump_dir, ignore_errors=True)
    if f.output:
      with open(f.output, "w", encoding="utf-8") as out:
        json.dump(report, out, indent=1)
      logging.info("Profile in %s.", f.output)
  except QwenJaxError as e:
    _cli.fail(e)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
