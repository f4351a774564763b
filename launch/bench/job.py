"""The batch job: one JSONL of mixed requests served whole-process by `python -m launch.batch_generate` (float
weights, and each --quantize) and by llama.cpp (`python -m launch.bench.llamacpp_job`), and how their completions agree.

  source, tokenizer = model_tokenizer(model)        the --model's path and tokenizer, no weights loaded
  files = prepare(directory, requests, tokenizer)   the inputs: requests for batch_generate, token ids for llama.cpp
  serve(files, source, ...)                          the report's "job" section: each engine's whole-process figures

Each engine is a subprocess of its own, timed from its start to its exit: Python and JAX starting, the model
loading, every compilation (none read back from a compilation cache, unless $JAX_COMPILATION_CACHE_DIR names one)
and the whole job. The engines run one after another, never side by side, and before the benchmark process loads
anything onto the device.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from absl import logging

from qwenjax import _files

if TYPE_CHECKING:
  from qwenjax import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]  # the checkout: the subprocesses run `python -m` from here
# batch_generate's log line with the engine's counters (`Engine.stats()` as JSON), read when it logs one.
STATS_LINE = re.compile(r"Engine stats: (\{.*\})\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class JobFiles:
  """The job's inputs and sizes."""

  requests: pathlib.Path  # batch_generate's input: {"id", "messages", "sampling"} lines
  tokens: pathlib.Path  # llama.cpp's input: {"id", "prompt_ids", "max_tokens", "stop"} lines
  directory: pathlib.Path  # where the outputs and logs go
  prompt_tokens: list[int]  # each request's prompt, chat template applied
  max_tokens: list[int]
  stops: int  # requests with stop strings

  @property
  def max_seq_len(self) -> int:
    """The context every engine gets: the longest prompt plus the largest max_tokens, rounded up to 128."""
    return -(-(max(self.prompt_tokens) + max(self.max_tokens)) // 128) * 128


def model_tokenizer(model: str) -> tuple[str, Tokenizer]:
  """The file or directory a --model value names, and its qwenjax Tokenizer: no weights loaded, no device touched
  (the job runs before the benchmark's own measurements, so that its subprocesses find the device's memory free)."""
  from qwenjax import CheckpointError, Tokenizer  # pylint: disable=g-import-not-at-top
  from qwenjax.checkpoints import embedded  # pylint: disable=g-import-not-at-top
  from qwenjax.checkpoints.gguf_file import GGUFCheckpoint  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(embedded.resolve_model_arg(model))
  if path.is_file() and path.suffix == ".gguf":
    return str(path), GGUFCheckpoint(path).tokenizer()
  if path.is_dir():
    return str(path), Tokenizer.from_directory(path)
  raise CheckpointError(f"{path}: neither a .gguf file nor a checkpoint directory.")


def prepare(directory: pathlib.Path, requests: list[dict], tokenizer: Tokenizer) -> JobFiles:
  """Writes the job's two input files into `directory`; the prompts are rendered and tokenized as
  `qwenjax.Engine.prepare` does, with the model's own tokenizer and chat template."""
  directory.mkdir(parents=True, exist_ok=True)
  prompts = [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)
             for r in requests]
  requests_path, tokens_path = directory / "job.jsonl", directory / "job_tokens.jsonl"
  requests_path.write_text("".join(json.dumps(r) + "\n" for r in requests))
  tokens_path.write_text("".join(json.dumps({"id": r["id"], "prompt_ids": p, "max_tokens": r["sampling"]["max_tokens"],
                                             "stop": r["sampling"].get("stop")}) + "\n"
                                 for r, p in zip(requests, prompts)))
  return JobFiles(requests_path, tokens_path, directory, [len(p) for p in prompts],
                  [r["sampling"]["max_tokens"] for r in requests], sum("stop" in r["sampling"] for r in requests))


def llamacpp_unavailable(source: str | None) -> str | None:
  """Why llama.cpp cannot serve the job here (it runs the GGUF file itself), or None."""
  if source is None or pathlib.Path(source).suffix != ".gguf":
    return "needs a .gguf --model (llama.cpp runs the GGUF file itself)"
  if importlib.util.find_spec("llama_cpp") is None:
    return "llama-cpp-python is not installed; pip install -e '.[bench]'"
  return None


def read_results(path: pathlib.Path) -> dict[str, dict]:
  """The records of a results file by id (as a string); {} when there is none."""
  if not path.exists():
    return {}
  records = {}
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    try:
      record = _files.loads(line)
      records[str(record["id"])] = record
    except (ValueError, KeyError, TypeError) as e:
      raise RuntimeError(f"{path} line {number} is not a result record ({e}).") from None
  return records


def identical_fraction(records: dict[str, dict], reference: dict[str, dict]) -> float | None:
  """Fraction of the reference's answered requests whose completion text `records` matches exactly."""
  ids = [k for k, r in reference.items() if "text" in r]
  if not ids:
    return None
  return sum(records.get(k, {}).get("text") == reference[k]["text"] for k in ids) / len(ids)


def _run(name: str, command: list[str], output: pathlib.Path, log: pathlib.Path, expected: int) -> dict:
  """Runs one engine's subprocess to its end (stdout and stderr into `log`) and sums up its results file."""
  output.unlink(missing_ok=True)  # batch_generate resumes a results file: every run starts from none
  logging.info("Job, %s: %s", name, shlex.join(command))
  start = time.perf_counter()
  with log.open("w") as f:
    proc = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # its own rusage: the peak resident memory of this run alone
    proc.returncode = returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - start
  records = read_results(output)
  answered = [r for r in records.values() if "error" not in r]
  generated = sum(r["usage"]["completion_tokens"] for r in answered)
  entry = {"command": shlex.join(command), "wall_s": seconds, "answered": len(answered),
           "errors": len(records) - len(answered), "generated_tokens": generated,
           "generated_tokens_per_s": generated / seconds, "peak_rss_gib": usage.ru_maxrss / 2**20,
           "finish_reasons": dict(collections.Counter(r["finish_reason"] for r in answered)),
           "output": str(output), "log": str(log)}
  if returncode != 0 or len(answered) != expected:
    lines = log.read_text(errors="replace").strip().splitlines()
    last = ([line for line in lines if line.startswith("error:")] or lines or [""])[-1]  # the script's error line
    entry["failed"] = (f"exit status {returncode}, {len(answered)} of {expected} requests answered; see {log} "
                       f"({last[:300]})")
    logging.warning("Job, %s failed: %s", name, entry["failed"])
  logging.info("Job, %s: %.1f s, %d tokens generated.", name, seconds, generated)
  return entry


def serve(files: JobFiles, source: str, *, slots: int, dtype: str,
          quantize: list[str] = (), quantize_embeddings: bool = False) -> dict:
  """Serves the job with batch_generate (`slots` decode slots), with float weights and with each of `quantize`
  ("int8", "w8a8"), then with llama.cpp one request at a time when it can run here. Returns the report's "job"
  section."""
  n = len(files.prompt_tokens)
  engines, results = {}, {}
  for q in [None, *quantize]:
    name, tag = "qwenjax" + (f"-{q}" if q else ""), "paged" + (f"_{q}" if q else "")
    output, log = files.directory / f"job_{tag}.jsonl", files.directory / f"job_{tag}.log"
    command = [sys.executable, "-m", "launch.batch_generate", f"--model={source}", f"--input={files.requests}",
               f"--output={output}", f"--max_batch_size={slots}", f"--max_seq_len={files.max_seq_len}",
               f"--dtype={dtype}"]
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # unless the user names a cache, every run compiles
      command.append("--nocompilation_cache")
    if q:
      command += [f"--quantize={q}"] + (["--quantize_embeddings"] if quantize_embeddings else [])
    engines[name] = _run(name, command, output, log, n)
    stats = STATS_LINE.findall(log.read_text(errors="replace"))
    engines[name]["stats"] = _files.loads(stats[-1]) if stats else None
    results[name] = read_results(output)
  why = llamacpp_unavailable(source)
  if why is None:
    output, log = files.directory / "job_llamacpp.jsonl", files.directory / "job_llamacpp.log"
    command = [sys.executable, "-m", "launch.bench.llamacpp_job", f"--model={source}", f"--input={files.tokens}",
               f"--output={output}", f"--n_ctx={files.max_seq_len}"]
    engines["llamacpp"] = _run("llama.cpp", command, output, log, n)
    results["llamacpp"] = read_results(output)
  else:
    logging.warning("Job, llama.cpp is skipped: %s", why)
    engines["llamacpp"] = {"skipped": why}
  reference = results.get("qwenjax", {})
  agreement = {name: identical_fraction(r, reference) for name, r in results.items() if name != "qwenjax"}
  spread = lambda xs: {"total": sum(xs), "min": min(xs), "max": max(xs), "mean": sum(xs) / len(xs)}
  return {"requests": n, "slots": slots, "max_seq_len": files.max_seq_len, "input": str(files.requests),
          "prompt_tokens": spread(files.prompt_tokens), "max_tokens": spread(files.max_tokens),
          "requests_with_stop_strings": files.stops, "engines": engines,
          "identical_completions_with_qwenjax": agreement if reference else {}}
