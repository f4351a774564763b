r"""Measures load time, peak host memory, compile time, prefill and greedy decode speed.

  python -m launch.benchmark                           # the embedded model, float32, batch 1
  python -m launch.benchmark --batch_sizes=1,8 --output=bench.json

Every figure is wall-clock on this process, after one warm-up run per shape (compile time is reported on its
own). Decode tokens/s counts generated tokens over the decode loop at a fixed batch, greedy, ignoring EOS.
"""

from __future__ import annotations

import json
import resource
import time

from absl import app, flags, logging

_MODEL = flags.DEFINE_string("model", "default", "'default', a .gguf file, or a Hugging Face checkpoint dir.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and weight dtype.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1"], "Decode batch sizes to measure.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 128, "Prompt length for prefill and decode runs.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence in decode runs.")
_SCAN_LAYERS = flags.DEFINE_enum("scan_layers", "auto", ["auto", "true", "false"],
                                 "Scanned (stacked) or unrolled layers; auto: unrolled on CPU only.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the report as JSON here too.")


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top

  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.profiling import count_compilations  # pylint: disable=g-import-not-at-top

  scan = {"auto": None, "true": True, "false": False}[_SCAN_LAYERS.value]
  rss_before = _peak_rss_gib()
  start = time.perf_counter()
  loaded = qwenjax.load(_MODEL.value, dtype=_DTYPE.value, scan_layers=scan)
  load_s = time.perf_counter() - start
  report = {"model": loaded.source, "dtype": _DTYPE.value, "scan_layers": loaded.model.scan_layers,
            "load_seconds": round(load_s, 2), "peak_host_memory_gib_after_load": round(_peak_rss_gib(), 2),
            "host_memory_gib_before_load": round(rss_before, 2), "runs": []}
  rng = np.random.default_rng(0)
  vocab = min(loaded.config.vocab_size, loaded.tokenizer.vocab_size)
  n_prompt, n_new = _PROMPT_TOKENS.value, _NEW_TOKENS.value
  greedy = qwenjax.SamplingParams(max_tokens=n_new, ignore_eos=True)
  one = qwenjax.SamplingParams(max_tokens=1, ignore_eos=True)
  gen = qwenjax.Generator(loaded.model, (), max_seq_len=max(256, 1 << (n_prompt + n_new - 1).bit_length()))
  for b in map(int, _BATCH_SIZES.value):
    prompts = [rng.integers(0, vocab, n_prompt).tolist() for _ in range(b)]
    with count_compilations() as compiled:
      start = time.perf_counter()
      gen.generate(prompts, greedy)  # warm-up: compiles prefill and decode for this shape
      warm_s = time.perf_counter() - start
    start = time.perf_counter()
    gen.generate(prompts, one)  # prefill plus the first token: time to first token
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    outs = gen.generate(prompts, greedy)
    total = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outs)
    decode_s = total - ttft
    run = {"batch": b, "prompt_tokens": n_prompt, "new_tokens": n_new,
           "compilations": sum(compiled.values()), "first_run_seconds_incl_compile": round(warm_s, 2),
           "time_to_first_token_s": round(ttft, 3), "prefill_tokens_per_s": round(b * n_prompt / ttft, 1),
           "decode_tokens_per_s": round((generated - b) / decode_s, 2),
           "decode_step_ms": round(1000 * decode_s / (n_new - 1), 1)}
    logging.info("%s", run)
    report["runs"].append(run)
  report["peak_host_memory_gib"] = round(_peak_rss_gib(), 2)
  text = json.dumps(report, indent=2)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
