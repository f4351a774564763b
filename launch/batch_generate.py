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
stop_token_ids, n, seed, logprobs, ignore_eos). A line without "id" is known by its line number. With a
Qwen2.5-VL model, message content may be a list of OpenAI-style parts: {"type": "text", "text": ...},
{"type": "image_url", "image_url": {"url": <path, file:// or data: URL>}}, {"type": "video", "video": <frame
directory or list of frames>}; images of different sizes share batches. A broken image fails its line alone.

Output lines, in completion order: {"id", "text", "token_ids", "finish_reason", "usage"} (with n > 1, "choices"
holds every sample), or {"id", "error"} for a line that cannot be served (malformed JSON, missing fields, bad
sampling values, a prompt longer than the context): it is recorded and the job goes on. Every line is flushed as
it completes; a rerun with the same --output skips the ids already answered, so a killed job resumes where it
stopped. Progress (requests done, tokens/s, time left) goes to stderr.

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
from typing import Any, Iterator

from absl import app, flags, logging

from launch import _common

_MODEL = flags.DEFINE_string("model", "default", "'default', a .gguf file, or a Hugging Face checkpoint dir.")
_INPUT = flags.DEFINE_string("input", None, "JSONL file of requests.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSONL file of results (appended to; resumable).", required=True)
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 8, "Decode slots: sequences generated at once.",
                                       lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Default max_tokens per request.", lower_bound=1)
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 4096, "Context per sequence: prompt plus generated tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Default temperature; 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Default nucleus mass.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Default top-k; 0 keeps all tokens.")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Default min-p (relative to the most likely token).")
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "Default repetition penalty (1: off).")
_PRESENCE_PENALTY = flags.DEFINE_float("presence_penalty", 0.0, "Default presence penalty.")
_FREQUENCY_PENALTY = flags.DEFINE_float("frequency_penalty", 0.0, "Default frequency penalty.")
_SEED = flags.DEFINE_integer("seed", None, "Default seed; each line's output is then reproducible.")
_STOP = flags.DEFINE_multi_string("stop", [], "Default stop string (repeatable).")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Don't stop at end-of-sequence tokens.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and weight dtype.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 4, "Decode steps per jitted call.", lower_bound=1)


def _answered(path: str) -> set[str]:
  """Ids already in the output; a torn last line (the job was killed mid-write) is cut off."""
  if not os.path.exists(path):
    return set()
  done = set()
  with open(path, "rb+") as f:
    good_end = 0
    for line in f:
      try:
        done.add(json.dumps(json.loads(line)["id"]))
        good_end = f.tell()
      except (ValueError, KeyError):
        break
    f.truncate(good_end)
  return done


def _lines(path: str, skip: set[str], errors: list[dict], engine, default, share: tuple[int, int] = (0, 1)
           ) -> Iterator[tuple[Any, Any, list]]:
  """(id, request, prompt) for each servable line of this process's share (line numbers congruent to its index
  modulo the process count); malformed lines land in `errors` with their id."""
  from qwenjax import InputError, QwenJaxError  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import as_request  # pylint: disable=g-import-not-at-top

  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip() or (number - 1) % share[1] != share[0]:
        continue
      key: Any = f"line-{number}"
      try:
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise InputError(f"line {number}: malformed JSON ({e.msg} at column {e.colno}).") from None
        if not isinstance(obj, dict):
          raise InputError(f"line {number}: expected a JSON object, got {type(obj).__name__}.")
        key = obj.get("id", key)
        if json.dumps(key) in skip:
          continue
        if "prompt" not in obj and "messages" not in obj:
          raise InputError(f"line {number}: needs a 'prompt' or 'messages' field.")
        sampling = obj.get("sampling")
        if sampling is not None and not isinstance(sampling, dict):
          raise InputError(f"line {number}: 'sampling' must be an object.")
        request = as_request({**obj, "id": key, "sampling": None})
        from qwenjax.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
        request.sampling = SamplingParams.from_dict(sampling, base=default) if sampling else default
        yield key, request, engine.prepare(request)
      except QwenJaxError as e:
        msg = str(e) if str(e).startswith(f"line {number}") else f"line {number}: {e}"
        errors.append({"id": key, "error": msg})


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
  present = _answered(output)
  with open(output, "a", encoding="utf-8") as out:
    for part in parts:
      if not os.path.exists(part):
        continue
      with open(part, encoding="utf-8") as f:
        for line in f:
          key = json.dumps(json.loads(line)["id"])
          if key not in present:
            out.write(line)
            present.add(key)
      out.flush()
      os.fsync(out.fileno())
  for part in parts:
    if os.path.exists(part):
      os.remove(part)


def main(argv):
  del argv
  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax import distributed  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import Engine  # pylint: disable=g-import-not-at-top
  from qwenjax.sampling import SamplingParams  # pylint: disable=g-import-not-at-top

  try:
    _common.initialize_distributed()
    serving = _common.serving(_MODEL.value, max_batch_size=_MAX_BATCH_SIZE.value, max_seq_len=_MAX_SEQ_LEN.value,
                              explicit_sizes=_common.explicit("max_batch_size", "max_seq_len"))
    default = SamplingParams(
        max_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
        min_p=_MIN_P.value, repetition_penalty=_REPETITION_PENALTY.value, presence_penalty=_PRESENCE_PENALTY.value,
        frequency_penalty=_FREQUENCY_PENALTY.value, seed=_SEED.value, stop=tuple(_STOP.value),
        ignore_eos=_IGNORE_EOS.value)
    if not os.path.exists(_INPUT.value):
      raise qwenjax.InputError(f"{_INPUT.value}: no such input file.")
    # Requests without a seed draw one from the engine's generator: the same on every process of a replica.
    job_seed = distributed.broadcast(secrets.randbits(63) if distributed.process_index() == 0 else None)
    engine = Engine.load(_MODEL.value, dtype=_DTYPE.value, max_batch_size=serving.max_batch_size,
                         max_seq_len=serving.max_seq_len, max_prefill_chunk=serving.max_prefill_chunk,
                         decode_steps=_DECODE_STEPS.value, mesh=serving.mesh, seed=job_seed)
  except qwenjax.QwenJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)

  # Replicas (a host each, or several hosts in lockstep for a model larger than one) split the lines; each
  # replica's rank-0 process writes its part, merged into --output at the end. What is already answered must be
  # the same everywhere: process 0 reads the output and the parts and broadcasts it.
  group = serving.replica
  index, count = group.index, group.count
  parts = [f"{_OUTPUT.value}.part-{i}" for i in range(count)] if count > 1 else []
  target = parts[index] if parts else _OUTPUT.value
  done = set()
  if distributed.process_index() == 0:
    for path in [_OUTPUT.value, *parts]:
      done |= _answered(path)
  done = set(distributed.broadcast(sorted(done)))
  if distributed.process_count() > 1:
    logging.info("Multi-host: process %d of %d, rank %d of replica %d of %d, serves lines %d, %d + %d, ...; "
                 "results merge into %s.", distributed.process_index(), distributed.process_count(), group.rank,
                 index, count, index + 1, index + 1, count, _OUTPUT.value)
  with open(_INPUT.value, encoding="utf-8") as f:
    total = sum(1 for number, line in enumerate(f) if line.strip() and number % count == index)
  if done:
    logging.info("Resuming: %d lines already answered in %s.", len(done), _OUTPUT.value)
  errors: list[dict] = []
  progress = _Progress(max(0, total - len(done) // count))
  served = failed = 0
  with open(target if group.rank == 0 else os.devnull, "a", encoding="utf-8") as out:

    def write(record: dict) -> None:
      out.write(json.dumps(record, ensure_ascii=False) + "\n")
      out.flush()

    def drain_errors() -> None:
      nonlocal failed
      while errors:
        write(errors.pop(0))
        failed += 1
        progress.update(0)

    items = _lines(_INPUT.value, done, errors, engine, default, share=(index, count))
    for key, result in engine.serve(items):
      drain_errors()
      record = {"id": key, "text": result.text, "token_ids": result.token_ids,
                "finish_reason": result.finish_reason, "usage": result.usage}
      if len(result.outputs) > 1:
        record["choices"] = [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason} for c in result.outputs]
      if result.outputs[0].logprobs is not None:
        record["logprobs"] = result.outputs[0].logprobs
      write(record)
      served += 1
      progress.update(result.usage["completion_tokens"])
    drain_errors()
  progress.close()
  logging.info("Done: %d answered, %d errors, %s.", served, failed, target)
  if distributed.process_count() > 1:
    distributed.barrier("batch_generate-served")
    if distributed.process_index() == 0 and parts:
      _merge(_OUTPUT.value, parts)
      logging.info("Merged %d parts into %s.", count, _OUTPUT.value)
    distributed.barrier("batch_generate-merged")


if __name__ == "__main__":
  app.run(main)
