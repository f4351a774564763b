r"""Generates for every line of JSONL files with continuous batching; every line answered exactly once, however
often the job is killed and rerun.

  python -m launch.batch_generate --input=prompts.jsonl --output=out.jsonl --max_batch_size=32
  python -m launch.batch_generate --input='shards/*.jsonl,extra.jsonl' --output=out.jsonl   # several files, globs
  python -m launch.batch_generate --model=/ckpt/Qwen2.5-7B-Instruct --mesh=data:2,tensor:4 --max_batch_size=64 \
      --dtype=bfloat16 --input=batch.jsonl --output=out.jsonl     # OpenAI Batch lines answered in its format
  python -m launch.batch_generate --model=/ckpt/qwen7b-orbax --topology=v5e-8 --dtype=bfloat16 ...  # planned sizes
  # Every host of a pod slice (TPU pods find the coordinator themselves; elsewhere pass it, or set QWENJAX_*):
  python -m launch.batch_generate --coordinator_address=host0:8476 --num_processes=4 --process_id=$I ...

--input: comma-separated files and glob patterns, read in that order (a pattern's matches sorted, each file once;
a pattern never matches the output or its side files). Ids must be unique across all the files (an error before
the model loads; --duplicate_ids=keep_first serves the first line of each instead). Error messages name the line
as <file>:<line>; a line without an id is known as "line-N", or "<file>:line-N" whenever --input is a glob or a
list (even one matching a single file: a glob that gains a file between runs never re-keys a line). A line over
--max_line_bytes (default 8 MiB) is an error record, read past in chunks and never held whole; JSON nested deeper
than 100 levels is that line's error.

Input lines, of either format, mixed freely:
- simple: {"id": ..., "messages": [...]} (OpenAI chat format, rendered with the chat template) or
  {"id": ..., "prompt": "..."} (raw text), with optional "tools" (OpenAI function tools, rendered by the
  template), "tool_choice", "response_format", and "sampling": {...} overrides of the flags (max_tokens,
  temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, stop,
  stop_token_ids, n, seed, logprobs, top_logprobs, prompt_logprobs, ignore_eos).
- OpenAI Batch: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}
  (`qwenjax.engine.openai_batch` lists the body fields); the custom_id is the line's id.
Any line may carry "metadata" (any JSON): it is copied untouched into that line's output record. With a
Qwen2.5-VL model, message content may be a list of OpenAI-style parts: {"type": "text", "text": ...},
{"type": "image_url", "image_url": {"url": <path, file:// or data: URL>}}, {"type": "video", "video": <frame
directory or list of frames>}; images of different sizes share batches. A broken image fails its line alone. Local
files must lie inside --media_root (default: the directory of the line's input file; relative paths start there):
any other path, symlinks resolved, is that line's error, in the same words whatever the file is.

Output lines, in completion order, in the format of their input line (`qwenjax.engine.simple_batch` and
`qwenjax.engine.openai_batch` build them):
- simple: {"id", "text", "token_ids", "finish_reason", "usage"} (with n > 1, "choices" holds every sample;
  "logprobs", "top_logprobs" ([{"token_id", "logprob"}] per generated token) and "prompt_logprobs", null for
  the first prompt token, when the line's sampling asks; "tool_calls",
  OpenAI's {"id", "type", "function": {"name", "arguments"}}, and "tool_call_errors" for malformed blocks, when
  the line has tools; usage's "cached_tokens" when prompt tokens came from shared prefix pages), or
  {"id", "error", "code"} for a line that cannot be served (code: invalid_json for a line that is not UTF-8, not
  JSON, nested deeper than 100 levels or not an object; context_length_exceeded; grammar_error for a constraint
  whose matcher failed mid-decode (the output would not conform); invalid_request for the rest: missing fields,
  bad sampling values, a line over --max_line_bytes, a bad schema or image).
- OpenAI Batch: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}, a 400 status and
  "error": {"code", "message"} for a line that cannot be served.
A line that cannot be served is recorded, keyed by its id, and the job goes on.

Exactly once. The output is only ever appended to, one record per line, each written whole and flushed as it
completes; a rerun with the same --output (and --input) skips the ids already there (errors included), so a job
killed at any moment (SIGKILL while loading, decoding, writing or merging) resumes where it stopped, with any
number of hosts. Durability: --fsync_every_lines / --fsync_every_seconds fsync the output (and on close): a file
system that uploads only on fsync or close (gcsfuse and other object-store mounts) keeps what was fsynced when a
host is lost, and the next run redoes the rest; each fsync there uploads, so it is not done per line. An existing
file that holds no results (a notes file, the input itself) is refused before the model loads, untouched. A
corrupt region in it (a record torn by a kill, garbage) is moved to <output>.corrupt, never deleted, and only the
ids it lacks are redone. One job at a time per output file, whatever path names it (a symlink, a second mount):
an flock on <real output>.qwenjax-lock (the second job is refused naming the holder), taken over from a killed
job. Files beside the output are written or removed only when they are the job's own (a name and a content
marker of qwenjax's: `qwenjax._files`): a file of the user's, or a link, at <output>.corrupt, .summary.json,
.progress.json, .part-<i> is refused untouched, and <output>.lock is never opened. Ctrl-C or SIGTERM: the
output is flushed, the lock released, one line says how to resume, exit status 130 / 143. A full disk: one
`error:` line; nothing half-written is left (the output and .corrupt as they were, no temporary); if every
record was written but the summary or progress file could not be, exit status 1 with a line saying so, and a
rerun (which adds no record) writes them.

Reports. <output>.progress.json, rewritten every --progress_every_seconds while the job runs: lines done of this
run's total over every host, rates, the time left. <output>.summary.json when the job ends, counted from the
output file itself: lines answered and failed (by error code), finish reasons, prompt / cached / generated tokens,
missing lines, and "this_run": the records this run added, its wall, serve and compile time (jax.monitoring's
compile events), tokens per second and per chip. The progress bar on stderr shows requests, tokens/s and the
share of prompt tokens read from cached prefixes.

Multi-host: process i of n serves the lines whose position (over all the files) is i modulo n, on its own devices
(--mesh / --topology describe one host), into <output>.part-i; when every process is done, process 0 merges the
parts into --output (once per id), fsyncs it, and only then removes them. Before anything is served, process 0
locks the output, recovers it and merges every part it finds there, left by a run with any number of hosts; what
is then answered is broadcast, so all agree.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from absl import app, flags, logging

from launch import _cli, _common

_INPUT = flags.DEFINE_list("input", None, "JSONL files of requests: comma-separated paths and glob patterns.",
                           required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSONL file of results (appended to; resumable).", required=True)
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 8, "Decode slots: sequences generated at once.",
                                       lower_bound=1)
_DUPLICATE_IDS = flags.DEFINE_enum("duplicate_ids", "error", ["error", "keep_first"], "An id on several input "
                                   "lines: stop before loading the model (error), or serve its first line only.")
_FSYNC_EVERY_LINES = flags.DEFINE_integer("fsync_every_lines", 10000, "fsync the output after this many records "
                                          "(0: off). Every record is flushed anyway; fsync is what a network file "
                                          "system that uploads on fsync or close keeps if the host is lost.",
                                          lower_bound=0)
_FSYNC_EVERY_SECONDS = flags.DEFINE_float("fsync_every_seconds", 30.0, "fsync the output when this many seconds "
                                          "passed since the last fsync, at the next record (0: off).",
                                          lower_bound=0)
_MEDIA_ROOT = flags.DEFINE_string("media_root", None, "The directory whose files lines may name as images, videos "
                                  "and frame directories (relative paths are taken from it); any other local path, "
                                  "symlinks resolved, is that line's error. Default: the directory of the input file "
                                  "the line came from.")
_MAX_LINE_BYTES = flags.DEFINE_integer("max_line_bytes", 8 << 20, "An input line longer than this (bytes) is an "
                                      "error record, read past in chunks and never held whole: memory per line "
                                      "stays bounded. Default 8 MiB.", lower_bound=1)
_WARM_UP = flags.DEFINE_bool("warm_up", True, "Before serving, compile every step and decode program of the job's "
                              "default sampling variant (at the default sizes 9 programs: one per prefill bucket, "
                              "the decode block, the slot reset, the page copy), so that no line waits on a compile; "
                              "a variant only some lines use compiles when the first of them runs.")
_PROGRESS_EVERY_SECONDS = flags.DEFINE_float("progress_every_seconds", 30.0, "Rewrite <output>.progress.json "
                                             "this often (0: only at the end).", lower_bound=0)


def _error_record(line, message: str, code: str) -> dict:
  """The record of a line that cannot be served, in its format."""
  from qwenjax.engine import openai_batch, simple_batch  # pylint: disable=g-import-not-at-top

  if line.openai and isinstance(line.key, str) and line.key:
    return openai_batch.error_line(line.key, code, message, obj=line.obj)
  return simple_batch.error_line(line.key, code, message, obj=line.obj)


def _requests(paths: list[str], skip: set[str], errors: list[dict], engine, default, share: tuple[int, int],
              skipped_lines: frozenset, *, keyed_by_path: bool | None = None,
              max_line_bytes: int | None = None) -> Iterator[tuple[Any, Any, list]]:
  """(input line, request, prompt) for each servable line of this process's share (positions congruent to its
  index modulo the process count); a line that cannot be served lands in `errors`, keyed by its id (or line
  number) so that a rerun, which skips the ids in `skip`, does not record it again. keyed_by_path and
  max_line_bytes: as `job_input.read_input` takes them (the defaults: its own)."""
  from qwenjax import InputError, QwenJaxError  # pylint: disable=g-import-not-at-top
  from qwenjax._errors import INVALID_REQUEST  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import job_input, jobs, openai_batch  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.requests import as_request  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.sampling_params import SamplingParams  # pylint: disable=g-import-not-at-top

  bound = {} if max_line_bytes is None else {"max_line_bytes": max_line_bytes}
  for line in job_input.read_input(paths, share, keyed_by_path=keyed_by_path, **bound):
    if (line.path, line.number) in skipped_lines or jobs.record_key(line.key) in skip:
      continue
    if line.error is not None:
      errors.append(_error_record(line, line.error, line.code))
      continue
    obj = line.obj
    try:
      if line.openai:
        request = openai_batch.to_request(obj, default, engine.lora_names)
      else:
        if "prompt" not in obj and "messages" not in obj:
          raise QwenJaxError("needs a 'prompt' or 'messages' field.")
        sampling = obj.get("sampling")
        if sampling is not None and not isinstance(sampling, dict):
          raise QwenJaxError("'sampling' must be an object.")
        fields = {k: v for k, v in obj.items() if k != "metadata"}
        request = as_request({**fields, "id": line.key, "sampling": None})
        request.sampling = SamplingParams.from_dict(sampling, base=default) if sampling else default
      media_root = _MEDIA_ROOT.value or os.path.dirname(os.path.abspath(line.path))
      yield line, request, engine.prepare(request, media_root=media_root)
    except QwenJaxError as e:
      code = e.code if isinstance(e, InputError) else INVALID_REQUEST
      errors.append(_error_record(line, f"{line.where}: {e}", code))


def _record(line, request, result, engine, reasoning: bool = False) -> dict:
  """The output record of a served line, in its format; reasoning: chat replies' thinking blocks split
  (`_common.splits_reasoning`)."""
  from qwenjax.engine import openai_batch, simple_batch  # pylint: disable=g-import-not-at-top

  if line.openai:
    return openai_batch.result_line(line.obj, result, model=_model_name(), tokenizer=engine.tokenizer,
                                    reasoning=reasoning)
  return simple_batch.result_line(line, request, result, reasoning=reasoning)


def _model_name() -> str:
  """The model as OpenAI output lines name it: the checkpoint's file or directory name."""
  model = _common.MODEL.value
  if model == "default":
    return "Qwen2.5-Coder-0.5B-Instruct"
  return os.path.basename(os.path.normpath(model)).removesuffix(".gguf")


class _Bar:
  """One status line on stderr: requests done of total, generated tokens/s, the share of prompt tokens read from
  shared prefix pages (RequestOutput.cached_tokens), estimated time left."""

  def __init__(self, total: int, speculation=None):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    self.start, self.tokens, self.prompt, self.cached = time.perf_counter(), 0, 0, 0
    self.speculation = speculation  # a speculative engine's `Proposer.stats`, or None

  def update(self, tokens: int = 0, prompt: int = 0, cached: int = 0) -> None:
    self.tokens, self.prompt, self.cached = self.tokens + tokens, self.prompt + prompt, self.cached + cached
    rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
    line = f"{rate:.1f} tok/s, cached {100 * self.cached / max(self.prompt, 1):.0f}%"
    if self.speculation is not None:
      spec = self.speculation()
      line += (f", accepted {spec['spec_accepted_tokens']}/{spec['spec_proposed_tokens']} "
               f"(mean length {spec['spec_mean_accepted_length']:.2f})")
    self.bar.set_postfix_str(line)
    self.bar.update(1)

  def close(self) -> None:
    self.bar.close()


def _prepare_files(output: str) -> tuple[set[str], Any]:
  """On process 0, before the model loads: the output is locked and recovered, and the parts any earlier
  multi-host run left (with any number of hosts) are merged into it; returns the ids answered and the lock.
  InputError, nothing touched, for an output that is not this job's to write."""
  from qwenjax.engine import job_parts, jobs, reports  # pylint: disable=g-import-not-at-top

  lock = jobs.OutputLock(output).acquire()
  try:
    # First what refuses a file that is not the job's, before anything is written: a summary or progress file,
    # a part that is a link.
    reports.prepare(output)
    parts = job_parts.existing_parts(output)
    done = jobs.recover(output).ids
    for part in parts:
      jobs.recover(part)  # refuses (untouched) a part that is not results before anything is merged
    if parts:
      added = job_parts.merge_parts(output, parts, **_fsync_policy())
      logging.info("Merged %d record(s) of %d part(s) an earlier run left: %s.", added, len(parts), ", ".join(parts))
      done = jobs.recover(output).ids
  except BaseException:
    lock.release()
    raise
  return done, lock


def _write_reports(output: str, write: Callable[[], Any]) -> Any:
  """`write()` (which writes the job's progress and summary files, after every record is in the output); if that
  fails (a full disk), an InputError that says the records are safe and how to get the reports."""
  from qwenjax import InputError  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import reports  # pylint: disable=g-import-not-at-top

  try:
    return write()
  except InputError as e:
    every, _ = reports.count_results(output)
    raise InputError(f"--output={output}: every record is written ({every['answered']} answered, "
                     f"{every['failed']} failed), but its report files are not: {e} Rerun the same command once "
                     "there is space: it adds no record and writes them.") from None


def _fsync_policy() -> dict:
  return dict(fsync_every_lines=_FSYNC_EVERY_LINES.value, fsync_every_seconds=_FSYNC_EVERY_SECONDS.value)


def main(argv):
  del argv
  started = time.monotonic()
  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import job_input, jobs, profiling  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.engine import Engine  # pylint: disable=g-import-not-at-top
  from qwenjax.parallel import distributed  # pylint: disable=g-import-not-at-top

  lock = None
  served = failed = 0
  try:
    compile_timer = profiling.CompileTimer()
    _common.initialize_distributed()
    _common.use_cpu_paths()
    _common.enable_compilation_cache()
    model = _common.MODEL.value
    serving = _common.serving(model, max_batch_size=_MAX_BATCH_SIZE.value, max_seq_len=_common.MAX_SEQ_LEN.value,
                              explicit_sizes=_common.explicit("max_batch_size", "max_seq_len"))
    inputs = jobs.expand_inputs(_INPUT.value, _OUTPUT.value)
    jobs.check_paths(inputs, _OUTPUT.value)
    lora = _common.lora_kwargs()  # a malformed --lora fails before the model loads
    speculative = _common.speculative_kwargs()
    if _MEDIA_ROOT.value is not None and not os.path.isdir(_MEDIA_ROOT.value):
      raise qwenjax.InputError(f"--media_root={_MEDIA_ROOT.value}: not a directory.")
    default = _common.sampling_params()
    # Replicas (a host each, or several hosts in lockstep for a model larger than one) split the lines; each
    # replica's rank-0 process writes its part, merged into --output at the end. What is already answered must
    # be the same everywhere: process 0 locks and recovers the output (merging any parts left there) and
    # broadcasts it (or why the job cannot write there), before any model is loaded.
    verdict: dict[str, Any] = {}
    if distributed.process_index() == 0:
      try:
        done, lock = _prepare_files(_OUTPUT.value)
        verdict = {"done": sorted(done)}
      except qwenjax.QwenJaxError as e:
        verdict = {"error": str(e)}
    verdict = distributed.broadcast(verdict)
    if "error" in verdict:
      raise qwenjax.InputError(verdict["error"])
    done = set(verdict["done"])
    scanned = job_input.scan_input(inputs, keep_first=_DUPLICATE_IDS.value == "keep_first",
                                   keyed_by_path=jobs.keyed_by_path(_INPUT.value), max_line_bytes=_MAX_LINE_BYTES.value)
    # Requests without a seed draw one from the engine's generator: the same on every process of a replica.
    job_seed = distributed.broadcast(secrets.randbits(63) if distributed.process_index() == 0 else None)
    engine = Engine.load(model, **_common.load_kwargs(), max_batch_size=serving.max_batch_size,
                         max_seq_len=serving.max_seq_len, max_prefill_chunk=serving.max_prefill_chunk,
                         decode_steps=_common.DECODE_STEPS.value, mesh=serving.mesh, seed=job_seed,
                         **serving.cache_kwargs(), **lora, **speculative)
    if jobs.crash_point("load"):
      jobs.crash()
    _cli.check_interrupted()
    if _WARM_UP.value and len(done) < scanned.lines - len(scanned.skipped):
      began = time.monotonic()
      count = engine.warm_up(sampling=[default])
      logging.info("Warm-up: %d programs compiled in %.1f s.", count, time.monotonic() - began)
      _cli.check_interrupted()
    served, failed = _serve(engine, default, inputs, done, scanned, serving.replica, compile_timer, started)
    logging.info("Engine stats: %s", json.dumps(engine.stats()))  # read by launch.benchmark --job
    _common.log_compilation_cache()
  except qwenjax.QwenJaxError as e:
    _cli.fail(e)
  finally:
    if lock is not None:
      lock.release()
  logging.info("Done: %d answered, %d errors.", served, failed)


def _serve(engine, default, inputs: list[str], done: set[str], scanned, group, compile_timer,
           started: float) -> tuple[int, int]:
  """Serves this process's share of the input into its results file; process 0 merges the parts at the end and
  writes the summary. Returns (answered, errors) of this process."""
  import jax  # pylint: disable=g-import-not-at-top

  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import job_parts, jobs, reports  # pylint: disable=g-import-not-at-top
  from qwenjax.parallel import distributed  # pylint: disable=g-import-not-at-top

  output = _OUTPUT.value
  index, count = group.index, group.count
  target = job_parts.part_path(output, index) if count > 1 else output
  if distributed.process_count() > 1:
    logging.info("Multi-host: process %d of %d, rank %d of replica %d of %d, serves lines %d, %d + %d, ...; "
                 "results merge into %s.", distributed.process_index(), distributed.process_count(), group.rank,
                 index, count, index + 1, index + 1, count, output)
  if done:
    logging.info("Resuming: %d lines already answered in %s.", len(done), output)
  lines = scanned.lines - len(scanned.skipped)
  todo = max(0, lines - len(done))
  errors: list[dict] = []
  speculation = engine.proposer.stats if engine.proposer is not None else None
  bar = _Bar(todo // count + (index < todo % count), speculation)
  progress = reports.Progress(output, replica=index, replicas=count, total=todo,
                              every=_PROGRESS_EVERY_SECONDS.value, compile_timer=compile_timer,
                              writes=group.rank == 0, speculation=speculation)
  serve_start = time.monotonic()
  served = failed = 0
  reasoning = _common.splits_reasoning(engine.tokenizer)
  # The output may be a link the user made; a part is a file of the job's own, never written through one.
  out = jobs.ResultWriter(target, follow_links=count == 1, **_fsync_policy()) if group.rank == 0 else None

  def drain_errors() -> None:
    nonlocal failed
    _cli.check_interrupted()
    while errors:
      record = errors.pop(0)
      if out is not None:
        out.write(record)
      failed += 1
      progress.add(failed=1)
      bar.update()

  try:
    items = _requests(inputs, done, errors, engine, default, (index, count), scanned.skipped,
                      keyed_by_path=jobs.keyed_by_path(_INPUT.value), max_line_bytes=_MAX_LINE_BYTES.value)
    keyed = (((line, request), request, prompt) for line, request, prompt in items)
    for (line, request), result in engine.serve(keyed):
      drain_errors()
      record = _record(line, request, result, engine, reasoning)
      if out is not None:
        out.write(record)
      generated = result.usage["completion_tokens"]
      if record.get("error") is not None:  # a grammar that failed mid-decode: the line failed, not answered
        failed += 1
        progress.add(failed=1)
      else:
        served += 1
        progress.add(answered=1, prompt_tokens=result.prompt_tokens, cached_tokens=result.cached_tokens,
                     generated_tokens=generated)
      bar.update(generated, result.prompt_tokens, result.cached_tokens)
    drain_errors()
  finally:
    progress.stop()
    bar.close()
    if out is not None:
      out.close()
  logging.info("Served %d, %d errors, into %s.", served, failed, target)
  serve_seconds = time.monotonic() - serve_start
  if index != 0:
    try:
      progress.close()
    except qwenjax.InputError as e:  # process 0 counts the summary from the output, and must not wait for us
      logging.warning("%s", e)
  if distributed.process_count() > 1:
    distributed.barrier("batch_generate-served")
  if distributed.process_index() == 0:
    if count > 1:
      added = job_parts.merge_parts(output, job_parts.existing_parts(output), **_fsync_policy())
      logging.info("Merged %d records of %d parts into %s.", added, count, output)

    def summarize() -> dict:
      progress.close()
      others = progress.replica_reports()
      run = {"processes": distributed.process_count(), "replicas": count, "chips": jax.device_count(),
             "wall_seconds": time.monotonic() - started, "serve_seconds": serve_seconds,
             "compile_seconds": compile_timer.seconds, "compilations": compile_timer.count,
             "compile_seconds_max_over_replicas": max([compile_timer.seconds] + [
                 r.get("compile_seconds") or 0.0 for r in others])}
      if speculation is not None:
        run["speculation"] = reports.speculation_totals([progress.own()] + others)
      summary = reports.summary(output, lines=lines, done_before=done, run=run)
      reports.write_summary(output, summary)
      reports.remove_replica_files(output)
      return summary

    summary = _write_reports(output, summarize)
    logging.info("Summary in %s: %d answered, %d failed, %d missing.", output + reports.SUMMARY_SUFFIX,
                 summary["answered"], summary["failed"], summary["missing"])
  if distributed.process_count() > 1:
    distributed.barrier("batch_generate-merged")
  return served, failed


if __name__ == "__main__":
  app.run(_cli.interruptible(main, "rerun the same command to resume"), flags_parser=_cli.parse_flags)
