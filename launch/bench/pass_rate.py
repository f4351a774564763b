r"""Quality of the model per engine: HumanEval-style pass rate on launch/bench/coding_tasks.py's tasks, greedy
agreement with the first engine, and perplexity (launch.bench.perplexity's corpus and window).

  python -m launch.bench.pass_rate                                           # the embedded model, float32
  python -m launch.bench.pass_rate --engines=float32,bfloat16,w8a16,w8a8 --output=/tmp/quality.json

Engines: float32; bfloat16 (weights and compute, as --dtype=bfloat16); w8a16 (int8 weights, float32 compute, as
--quantize=int8); w8a8. With --quantize_embeddings the int8 engines hold the embedding and head in int8 too. Each
engine runs in a process of its own (one engine: this one), on the matmul paths --cpu_paths gives its mode, since
each XLA:CPU configuration needs its own process.

Per engine, every task's prompt (a chat message asking for one function) is answered greedily by one Engine
(--slots sequences at once, --max_tokens at most, the completion ending at end-of-sequence or at a closing code
fence, "\n```\n"). The answer's code is its first ```python block that defines the function asked for (else its
first block, else the whole text), and it passes when that code followed by the task's hidden assertions runs to
the end in a fresh `python -I` process (--timeout seconds, 2 GiB of address space, an empty working directory) and
prints the random marker appended after the assertions (so code that exits early does not pass).

stdout: one JSON object {"model", "tasks", "engines": {name: {"passed", "pass_rate", "generated_tokens",
"generate_s", "ppl", "nll", "identical_completions" (the fraction of tasks whose completion text equals the first
engine's), "token_agreement" (mean over tasks of the fraction of the first engine's tokens matched before the first
difference), "xla_flags", "results": [{"task", "passed", "error", "text", "tokens"}]}}}, also written to --output.
Logs go to stderr.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags, logging

from launch import _cli
from launch.bench import coding_tasks
from launch.bench.measure import agreement

ENGINES = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "w8a16": ("float32", "int8"),
           "w8a8": ("float32", "w8a8")}  # name -> (--dtype, --quantize)
STOP = "\n```\n"  # a closing code fence (an opening one carries its language, "```python")
_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:\n```|\Z)", re.S)
_ADDRESS_SPACE = 2 << 30


def extract_code(text: str, name: str) -> str:
  """The code of an answer: its first fenced block (python, py or no language) that defines `name`, else its first
  such block, else the whole text."""
  blocks = [code for lang, code in _BLOCK.findall(text) if lang.lower() in ("", "python", "py", "python3")]
  defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", re.M)
  for code in blocks:
    if defines.search(code):
      return code
  return blocks[0] if blocks else text


def _limit_child() -> None:
  resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))


def run_tests(code: str, tests: str, timeout: float = 10.0) -> tuple[bool, str | None]:
  """(passed, error): `code` then `tests` run in a fresh isolated Python (empty working directory, no environment
  but PATH, `timeout` seconds, 2 GiB of address space; its process group killed at the timeout). Passes when it
  exits 0 having printed a random marker that follows the tests. error: the last line of its stderr, "timeout",
  or "exited early" (status 0 without the marker)."""
  marker = secrets.token_hex(8)
  program = f"{code}\n\n{tests}\nprint({marker!r})\n"
  with tempfile.TemporaryDirectory(prefix="qwenjax-task-") as cwd:
    proc = subprocess.Popen([sys.executable, "-I", "-c", program], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={"PATH": os.environ.get("PATH", "")}, preexec_fn=_limit_child)
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      return False, "timeout"
  if proc.returncode == 0 and marker in out.split():
    return True, None
  lines = [line for line in err.splitlines() if line.strip()]
  return False, lines[-1][:200] if lines else ("exited early" if proc.returncode == 0 else f"exit {proc.returncode}")


def grade(task: coding_tasks.Task, text: str, timeout: float = 10.0) -> tuple[bool, str | None]:
  """`run_tests` of the code `text` answers `task` with."""
  return run_tests(extract_code(text, task.name), task.tests, timeout)


def answer(engine, tasks, max_tokens: int) -> list[tuple[str, list[int]]]:
  """(text, token ids) of the greedy answer to each task's prompt, in order."""
  from qwenjax import Request, SamplingParams  # pylint: disable=g-import-not-at-top

  sampling = SamplingParams(max_tokens=max_tokens, stop=(STOP,))
  outs = engine.generate([Request(messages=[{"role": "user", "content": t.prompt}], sampling=sampling)
                          for t in tasks])
  return [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outs]


def evaluate(loaded, tasks, *, slots: int, max_tokens: int, timeout: float, corpus: str | None) -> dict[str, Any]:
  """One engine's answers, their grades and (with a corpus) its perplexity."""
  from launch.bench.perplexity import perplexity  # pylint: disable=g-import-not-at-top
  from qwenjax import Engine  # pylint: disable=g-import-not-at-top

  # The prompts are under 200 tokens with Qwen's chat template: any --max_tokens fits after them.
  engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=slots, max_seq_len=max_tokens + 512)
  start = time.perf_counter()
  answers = answer(engine, tasks, max_tokens)
  seconds = time.perf_counter() - start
  results = []
  for task, (text, tokens) in zip(tasks, answers):
    passed, error = grade(task, text, timeout)
    results.append({"task": task.name, "passed": passed, "error": error, "text": text, "tokens": tokens})
  passed = sum(r["passed"] for r in results)
  out = {"passed": passed, "pass_rate": passed / len(tasks), "generated_tokens": sum(len(r["tokens"]) for r in results),
         "generate_s": seconds, "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results}
  if corpus is not None:
    out.update({k: v for k, v in perplexity(loaded, loaded.tokenizer.encode(corpus)).items() if k in ("ppl", "nll")})
  return out


def compare(engines: dict[str, dict]) -> None:
  """Adds each engine's identical_completions and token_agreement against the first engine's answers."""
  first = next(iter(engines.values()))["results"]
  for result in engines.values():
    pairs = list(zip(result["results"], first))
    result["identical_completions"] = sum(a["text"] == b["text"] for a, b in pairs) / len(pairs)
    result["token_agreement"] = sum(agreement(a["tokens"], b["tokens"]) if b["tokens"] else float(not a["tokens"])
                                    for a, b in pairs) / len(pairs)


def _select(names: list[str]) -> list[coding_tasks.Task]:
  by_name = {t.name: t for t in coding_tasks.TASKS}
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f"--tasks: no task named {', '.join(unknown)} (tasks: {', '.join(by_name)}).")
  return [by_name[n] for n in names] if names else list(coding_tasks.TASKS)


def define_flags() -> None:
  flags.DEFINE_string("model", "default", "'default' (the embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf file or a "
                      "checkpoint directory.")
  flags.DEFINE_list("engines", ["float32"], f"Engines, the first the reference of agreement: {', '.join(ENGINES)}.")
  flags.DEFINE_bool("quantize_embeddings", False, "The int8 engines hold the embedding and head in int8 too.")
  flags.DEFINE_list("tasks", [], "Task names (the functions asked for); default: all of coding_tasks.TASKS.")
  flags.DEFINE_integer("slots", 16, "Sequences answered at once.", lower_bound=1)
  flags.DEFINE_integer("max_tokens", 512, "Tokens per answer at most.", lower_bound=1)
  flags.DEFINE_float("timeout", 10.0, "Seconds each answer's tests may run.", lower_bound=0.1)
  flags.DEFINE_bool("perplexity", True, "Also each engine's perplexity on launch.bench.perplexity's corpus.")
  flags.DEFINE_string("output", None, "Also write the JSON report here.")
  flags.DEFINE_string("worker_output", None, "Internal: evaluate the one engine of --engines in this process and "
                      "write its result here.")
  _cli.define_cpu_paths_flag("Matmul paths on CPU, as launch.generate's --cpu_paths: auto, default, or a record "
                             "file.")


def _worker(name: str, tasks: list[coding_tasks.Task]) -> dict[str, Any]:
  """One engine, in this process: its matmul paths, its weights, its evaluation."""
  from launch.bench.perplexity import CORPUS, _load  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  dtype, quantize = ENGINES[name]
  _cli.use_cpu_paths(f.cpu_paths, cpu_paths.mode_of(dtype, quantize))  # before jax starts its backend
  loaded = _load(f.model, dtype, quantize, f.quantize_embeddings and quantize != "none")
  logging.info("%s: answering %d tasks", name, len(tasks))
  return evaluate(loaded, tasks, slots=f.slots, max_tokens=f.max_tokens, timeout=f.timeout,
                  corpus=CORPUS.read_text(encoding="utf-8") if f.perplexity else None)


def main(argv):
  del argv
  from qwenjax import QwenJaxError  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  try:
    unknown = [e for e in f.engines if e not in ENGINES]
    if unknown or not f.engines:
      raise QwenJaxError(f"--engines={','.join(f.engines)}: each must be one of {', '.join(ENGINES)}.")
    try:
      tasks = _select(f.tasks)
    except ValueError as e:
      raise QwenJaxError(str(e)) from None
    if f.worker_output or len(f.engines) == 1:
      result = _worker(f.engines[0], tasks)
      if f.worker_output:
        with open(f.worker_output, "w", encoding="utf-8") as out:
          json.dump(result, out)
        return
      engines = {f.engines[0]: result}
    else:
      engines = {}
      with tempfile.TemporaryDirectory(prefix="qwenjax-pass-rate-") as tmp:
        for name in f.engines:
          path = os.path.join(tmp, f"{name}.json")
          cmd = [sys.executable, "-m", "launch.bench.pass_rate", f"--engines={name}", f"--worker_output={path}",
                 f"--model={f.model}", f"--tasks={','.join(f.tasks)}", f"--slots={f.slots}",
                 f"--max_tokens={f.max_tokens}", f"--timeout={f.timeout}", f"--cpu_paths={f.cpu_paths}",
                 f"--{'' if f.perplexity else 'no'}perplexity",
                 f"--{'' if f.quantize_embeddings else 'no'}quantize_embeddings"]
          logging.info("%s: %s", name, " ".join(cmd))
          proc = subprocess.run(cmd, check=False, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
              os.path.abspath(__file__)))))
          if proc.returncode != 0:
            raise QwenJaxError(f"engine {name}: its process exited with status {proc.returncode} (its log is above).")
          with open(path, encoding="utf-8") as res:
            engines[name] = json.load(res)
    compare(engines)
    report = {"model": f.model, "tasks": len(tasks), "engines": engines}
    for name, r in engines.items():
      logging.info("%s: %d/%d passed, identical completions %.2f, token agreement %.3f%s", name, r["passed"],
                   len(tasks), r["identical_completions"], r["token_agreement"],
                   f", ppl {r['ppl']:.4f}" if "ppl" in r else "")
  except QwenJaxError as e:
    _cli.fail(e)
  if f.output:
    with open(f.output, "w", encoding="utf-8") as out:
      json.dump(report, out, indent=1)
  print(json.dumps(report))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
