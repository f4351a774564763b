r"""Generates for every line of a JSONL file with continuous batching; survives being killed.

  python -m launch.batch_generate --input=prompts.jsonl --output=out.jsonl --max_batch_size=32
  python -m launch.batch_generate --model=/ckpt/Qwen2.5-7B-Instruct --mesh=data:2,tensor:4 --max_batch_size=64 \
      --dtype=bfloat16 --input=prompts.jsonl --output=out.jsonl
  python -m launch.batch_generate --model=/ckpt/qwen7b-orbax --topology=v5e-8 --dtype=bfloat16 ...  # planned sizes
  # Every host of a pod slice (TPU pods find the coordinator themselves; elsewhere pass it, or set QWENJAX_*):
  python -m launch.batch_generate --coordinator_address=host0:8476 --num_processes=4 --process_id=$I ...

Input lines: {"id": ..., "messages": [...]} (OpenAI chat format, rendered with the chat template) or
{"id": ..., "prompt": "..."} (raw text), each with optional "sampling": {...} overrides of the flags
(max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, stop,
stop_token_ids, n, seed, logprobs, prompt_logprobs, ignore_eos). A line without "id" is known by its line number.
With a Qwen2.5-VL model, message content may be a list of OpenAI-style parts: {"type": "text", "text": ...},
{"type": "image_url", "image_url": {"url": <path, file:// or data: URL>}}, {"type": "video", "video": <frame
directory or list of frames>}; images of different sizes share batches. A broken image fails its line alone.

Output lines, in completion order: {"id", "text", "token_ids", "finish_reason", "usage"} (with n > 1, "choices"
holds every sample; "logprobs" and "prompt_logprobs", null for the first prompt token, when the line's sampling
asks), or {"id", "error"} for a line that cannot be served (not UTF-8, malformed JSON, not an object, missing
fields, bad sampling values, a prompt longer than the context): it is recorded, keyed by its id or "line-N", and
the job goes on. Every record is written whole and flushed as it completes; a rerun with the same --output skips
the ids already there (errors included), so a killed job resumes where it stopped.

The output is only ever appended to, and only if it is this job's: an existing file that holds no results (a notes
file, the input itself) is refused before the model loads, untouched. A corrupt region in it (a record torn by a
kill, garbage) is moved to <output>.corrupt, never deleted, and only the ids it lacks are redone. One job at a time
per output: <output>.lock, taken over from a killed job. Ids must be unique (--duplicate_ids=keep_first serves the
first line of each). Progress (requests done, tokens/s, time left) goes to stderr.

Multi-host: process i of n serves the lines whose number is i modulo n, on its own devices (--mesh / --topology
describe one host), into --output.part-i; when every process is done, process 0 merges the parts into --output
(once per id) and removes them. What is already answered is read by process 0 and broadcast, so all agree.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from typing import Any

from absl import app, flags, logging

from launch import _cli, _common

_INPUT = flags.DEFINE_string("input", None, "JSONL file of requests.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSONL file of results (appended to; resumable).", required=True)
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 8, "Decode slots: sequences generated at once.",
                                       lower_bound=1)
_DUPLICATE_IDS = flags.DEFINE_enum("duplicate_ids", "error", ["error", "keep_first"], "An id on several input "
                                   "lines: stop before loading the model (error), or serve its first line only.")


def _requests(path: str, skip: set[str], errors: list[dict], engine, default, share: tuple[int, int],
              skipped_lines: frozenset[int]) -> Iterator[tuple[Any, Any, list]]:
  """(id, request, prompt) for each servable line of this process's share (line numbers congruent to its index
  modulo the process count); a line that cannot be served lands in `errors`, keyed by its id (or line number)
  so that a rerun, which skips the ids in `skip`, does not record it again."""
  from qwenjax import QwenJaxError  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import jobs  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.requests import as_request  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.sampling import SamplingParams  # pylint: disable=g-import-not-at-top

  for line in jobs.read_input(path, share):
    if line.number in skipped_lines or jobs.record_key(line.key) in skip:
      continue
    if line.error is not None:
      errors.append({"id": line.key, "error": line.error})
      continue
    number, obj = line.number, line.obj
    try:
      if "prompt" not in obj and "messages" not in obj:
        raise QwenJaxError("needs a 'prompt' or 'messages' field.")
      sampling = obj.get("sampling")
      if sampling is not None and not isinstance(sampling, dict):
        raise QwenJaxError("'sampling' must be an object.")
      request = as_request({**obj, "id": line.key, "sampling": None})
      request.sampling = SamplingParams.from_dict(sampling, base=default) if sampling else default
      yield line.key, request, engine.prepare(request)
    except QwenJaxError as e:
      errors.append({"id": line.key, "error": f"line {number}: {e}"})


class _Progress:
  """One status line on stderr: requests done of total, generated tokens/s, estimated time left."""

  def __init__(self, total: int):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    self.start, self.tokens = time.perf_counter(), 0

  def update(self, tokens: int) -> None:
    self.tokens += tokens
    self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.1f} tok/s")
    self.bar.update(1)

  def close(self) -> None:
    self.bar.close()


def _merge(output: str, parts: list[str]) -> None:
  """Appends each process's part to the output (ids already there skipped: a merge cut short is redone
  safely), then removes the parts."""
  from qwenjax.engine import jobs  # pylint: disable=g-import-not-at-top

  present = jobs.recover(output).ids
  with jobs.ResultWriter(output) as out:
    for part in parts:
      if not os.path.exists(part):
        continue
      jobs.recover(part)
      for record, key in jobs.iter_records(part):
        if key not in present:
          out.write_raw(record)
          present.add(key)
  for part in parts:
    if os.path.exists(part):
      os.remove(part)


def _prepare_files(parts: list[str]) -> tuple[set[str], Any]:
  """On process 0, before the model loads: the output is locked and recovered, its parts too; returns the ids
  already answered and the lock. InputError, nothing touched, for an output that is not this job's to write."""
  from qwenjax.engine import jobs  # pylint: disable=g-import-not-at-top

  lock = jobs.OutputLock(_OUTPUT.value).acquire()
  try:
    done: set[str] = set()
    for path in [_OUTPUT.value, *parts]:
      done |= jobs.recover(path).ids
  except BaseException:
    lock.release()
    raise
  return done, lock


def main(argv):
  del argv
  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import jobs  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.engine import Engine  # pylint: disable=g-import-not-at-top
  from qwenjax.parallel import distributed  # pylint: disable=g-import-not-at-top

  lock = None
  try:
    _common.initialize_distributed()
    model = _common.MODEL.value
    serving = _common.serving(model, max_batch_size=_MAX_BATCH_SIZE.value, max_seq_len=_common.MAX_SEQ_LEN.value,
                              explicit_sizes=_common.explicit("max_batch_size", "max_seq_len"))
    jobs.check_paths(_INPUT.value, _OUTPUT.value)
    default = _common.sampling_params()
    # Replicas (a host each, or several hosts in lockstep for a model larger than one) split the lines; each
    # replica's rank-0 process writes its part, merged into --output at the end. What is already answered must
    # be the same everywhere: process 0 locks and recovers the output and the parts and broadcasts it (or why
    # the job cannot write there), before any model is loaded.
    group = serving.replica
    count = group.count
    parts = [f"{_OUTPUT.value}.part-{i}" for i in range(count)] if count > 1 else []
    verdict: dict[str, Any] = {}
    if distributed.process_index() == 0:
      try:
        done, lock = _prepare_files(parts)
        verdict = {"done": sorted(done)}
      except qwenjax.QwenJaxError as e:
        verdict = {"error": str(e)}
    verdict = distributed.broadcast(verdict)
    if "error" in verdict:
      raise qwenjax.InputError(verdict["error"])
    done = set(verdict["done"])
    scanned = jobs.scan_input(_INPUT.value, keep_first=_DUPLICATE_IDS.value == "keep_first")
    # Requests without a seed draw one from the engine's generator: the same on every process of a replica.
    job_seed = distributed.broadcast(secrets.randbits(63) if distributed.process_index() == 0 else None)
    engine = Engine.load(model, **_common.load_kwargs(), max_batch_size=serving.max_batch_size,
                         max_seq_len=serving.max_seq_len, max_prefill_chunk=serving.max_prefill_chunk,
                         decode_steps=_common.DECODE_STEPS.value, mesh=serving.mesh, seed=job_seed,
                         **serving.cache_kwargs())
    served, failed = _serve(engine, default, done, scanned, group, parts)
    logging.info("Engine stats: %s", json.dumps(engine.stats))  # read by launch.benchmark --job
  except qwenjax.QwenJaxError as e:
    _cli.fail(e)
  finally:
    if lock is not None:
      lock.release()
  logging.info("Done: %d answered, %d errors.", served, failed)


def _serve(engine, default, done: set[str], scanned, group, parts: list[str]) -> tuple[int, int]:
  """Serves this process's share of the input into its results file; process 0 merges the parts at the end.
  Returns (answered, errors) of this process."""
  from qwenjax.engine import jobs  # pylint: disable=g-import-not-at-top
  from qwenjax.parallel import distributed  # pylint: disable=g-import-not-at-top

  index, count = group.index, group.count
  target = parts[index] if parts else _OUTPUT.value
  if distributed.process_count() > 1:
    logging.info("Multi-host: process %d of %d, rank %d of replica %d of %d, serves lines %d, %d + %d, ...; "
                 "results merge into %s.", distributed.process_index(), distributed.process_count(), group.rank,
                 index, count, index + 1, index + 1, count, _OUTPUT.value)
  if done:
    logging.info("Resuming: %d lines already answered in %s.", len(done), _OUTPUT.value)
  errors: list[dict] = []
  progress = _Progress(max(0, (scanned.lines - len(scanned.skipped) - len(done)) // count))
  served = failed = 0
  out = jobs.ResultWriter(target) if group.rank == 0 else None

  def write(record: dict) -> None:
    if out is not None:
      out.write(record)

  def drain_errors() -> None:
    nonlocal failed
    while errors:
      write(errors.pop(0))
      failed += 1
      progress.update(0)

  try:
    items = _requests(_INPUT.value, done, errors, engine, default, (index, count), scanned.skipped)
    for key, result in engine.serve(items):
      drain_errors()
      record = {"id": key, "text": result.text, "token_ids": result.token_ids,
                "finish_reason": result.finish_reason, "usage": result.usage}
      if len(result.outputs) > 1:
        record["choices"] = [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason} for c in result.outputs]
      if result.outputs[0].logprobs is not None:
        record["logprobs"] = result.outputs[0].logprobs
      if result.prompt_logprobs is not None:
        record["prompt_logprobs"] = result.prompt_logprobs
      write(record)
      served += 1
      progress.update(result.usage["completion_tokens"])
    drain_errors()
  finally:
    if out is not None:
      out.close()
    progress.close()
  logging.info("Served %d, %d errors, into %s.", served, failed, target)
  if distributed.process_count() > 1:
    distributed.barrier("batch_generate-served")
    if distributed.process_index() == 0 and parts:
      _merge(_OUTPUT.value, parts)
      logging.info("Merged %d parts into %s.", count, _OUTPUT.value)
    distributed.barrier("batch_generate-merged")
  return served, failed


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
