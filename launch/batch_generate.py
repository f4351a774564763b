r"""Generates for every line of a JSONL file with continuous batching; survives being killed.

  python -m launch.batch_generate --input=prompts.jsonl --output=out.jsonl --max_batch_size=32

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
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Iterator

from absl import app, flags, logging

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


def _lines(path: str, skip: set[str], errors: list[dict], engine, default) -> Iterator[tuple[Any, Any, list]]:
  """(id, request, prompt ids) for each servable line; malformed lines land in `errors` with their id."""
  from qwenjax import InputError, QwenJaxError  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import as_request  # pylint: disable=g-import-not-at-top

  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
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


def main(argv):
  del argv
  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import Engine  # pylint: disable=g-import-not-at-top
  from qwenjax.sampling import SamplingParams  # pylint: disable=g-import-not-at-top

  try:
    default = SamplingParams(
        max_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
        min_p=_MIN_P.value, repetition_penalty=_REPETITION_PENALTY.value, presence_penalty=_PRESENCE_PENALTY.value,
        frequency_penalty=_FREQUENCY_PENALTY.value, seed=_SEED.value, stop=tuple(_STOP.value),
        ignore_eos=_IGNORE_EOS.value)
    if not os.path.exists(_INPUT.value):
      raise qwenjax.InputError(f"{_INPUT.value}: no such input file.")
    engine = Engine.load(_MODEL.value, dtype=_DTYPE.value, max_batch_size=_MAX_BATCH_SIZE.value,
                         max_seq_len=_MAX_SEQ_LEN.value, decode_steps=_DECODE_STEPS.value)
  except qwenjax.QwenJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)

  done = _answered(_OUTPUT.value)
  with open(_INPUT.value, encoding="utf-8") as f:
    total = sum(1 for line in f if line.strip())
  if done:
    logging.info("Resuming: %d of %d lines already answered in %s.", len(done), total, _OUTPUT.value)
  errors: list[dict] = []
  progress = _Progress(total - len(done))
  served = failed = 0
  with open(_OUTPUT.value, "a", encoding="utf-8") as out:

    def write(record: dict) -> None:
      out.write(json.dumps(record, ensure_ascii=False) + "\n")
      out.flush()

    def drain_errors() -> None:
      nonlocal failed
      while errors:
        write(errors.pop(0))
        failed += 1
        progress.update(0)

    items = _lines(_INPUT.value, done, errors, engine, default)
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
  logging.info("Done: %d answered, %d errors, %s.", served, failed, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
