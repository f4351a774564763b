r"""llama.cpp's side of the benchmark's batch job: every request served one at a time from a GGUF file.

  python -m launch.bench.llamacpp_job --model=model.gguf --input=job_tokens.jsonl --output=llamacpp.jsonl

Input lines {"id", "prompt_ids", "max_tokens", "stop"}: prompts already rendered with qwenjax's chat template and
tokenized by qwenjax's tokenizer (launch/bench/job.py writes them), so that llama.cpp sees the very tokens the
qwenjax engines see. Greedy (temperature 0, top_k 1, no repetition penalty), stopping at the model's end of
sequence, after max_tokens, or at a stop string (cut from the text, as qwenjax does). Output lines {"id", "text",
"finish_reason", "usage"}, as launch.batch_generate writes them. The benchmark times this whole process.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from launch import _cli
from qwenjax import _files

_MODEL = flags.DEFINE_string("model", None, "The GGUF file.", required=True)
_INPUT = flags.DEFINE_string("input", None, "JSONL of {id, prompt_ids, max_tokens, stop} lines.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSONL of results (overwritten).", required=True)
_N_CTX = flags.DEFINE_integer("n_ctx", 1024, "llama.cpp's context: the longest prompt plus its max_tokens.",
                              lower_bound=1)
_THREADS = flags.DEFINE_integer("threads", None, "Threads (default: every core this process may use).",
                                lower_bound=1)


def main(argv):
  del argv
  try:
    import llama_cpp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    _cli.fail(f"llama-cpp-python is not installed ({e}); pip install -e '.[bench]'")
  requests = []
  with open(_INPUT.value, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      try:
        obj = _files.loads(line)
        requests.append((obj["id"], [int(t) for t in obj["prompt_ids"]], int(obj["max_tokens"]), obj.get("stop")))
      except (ValueError, KeyError, TypeError) as e:
        _cli.fail(f"{_INPUT.value} line {number}: expected {{id, prompt_ids, max_tokens, stop}} ({e})")
  threads = _THREADS.value or len(os.sched_getaffinity(0))
  llm = llama_cpp.Llama(model_path=_MODEL.value, n_ctx=_N_CTX.value, n_batch=512, n_threads=threads,
                        n_threads_batch=threads, n_gpu_layers=0, seed=0, verbose=False)
  with open(_OUTPUT.value, "w", encoding="utf-8") as out:
    for key, prompt, max_tokens, stop in requests:
      llm.reset()  # no reuse of the previous request's cached prefix (the qwenjax engines have none)
      result = llm.create_completion(prompt, max_tokens=max_tokens, stop=stop or None, temperature=0.0, top_k=1,
                                     top_p=1.0, min_p=0.0, repeat_penalty=1.0)
      choice = result["choices"][0]
      out.write(json.dumps({"id": key, "text": choice["text"], "finish_reason": choice["finish_reason"],
                            "usage": result["usage"]}) + "\n")
  llm.close()
  logging.info("Served %d requests into %s.", len(requests), _OUTPUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
