r"""Perplexity of a model on a fixed corpus, from the engine's prompt log-probabilities; optionally beside
transformers (float32, the same weights) scoring the same token windows.

  python -m launch.bench.perplexity                                    # the embedded model, float32
  python -m launch.bench.perplexity --reference=transformers           # + transformers on the same GGUF
  python -m launch.bench.perplexity --model=/ckpt/Qwen2.5-7B --dtype=bfloat16 --quantize=int8 --window=2048

    from launch.bench.perplexity import perplexity
    perplexity(qwenjax.load("default"), open("corpus.txt").read(), window=1024)   # or an Engine, or token ids
    # -> {"tokens": 3795, "windows": 4, "scored": 3791, "nll": ..., "ppl": ...}

The corpus is cut into consecutive windows of --window tokens (the last one shorter), each scored on its own from
an empty context: every token but a window's first is scored, by the log-probability the model gives it after the
tokens before it in its window (`SamplingParams.prompt_logprobs`, the engine's prefill; float32 log_softmax of
the raw logits). nll is the mean negative log-likelihood over the scored tokens (nats), ppl = exp(nll). The
reference scores the same token ids (qwenjax's tokenization) with transformers' `AutoModelForCausalLM` in float32:
a GGUF file dequantized to float32 (`from_pretrained(dir, gguf_file=...)`), as tests/model/test_real_model.py
builds it, or a checkpoint directory.

The default corpus, tests/data/perplexity_corpus.txt, is lines 1-411 of CPython 3.11.7's Lib/textwrap.py (the
module docstring through `shorten`), unmodified: 16,971 characters, 3,795 tokens with Qwen2.5's tokenizer.

stdout: one JSON object {"model", "dtype", "quantize", "quantize_embeddings", "corpus", "window", "tokens",
"windows", "scored", "nll", "ppl", "seconds"}, with --reference also "reference" ({"name", "nll", "ppl",
"seconds"}) and "ppl_relative_difference" (|ppl - reference ppl| / reference ppl). Logs go to stderr.

Measured (2-core CPU, float32, the default corpus and window): qwenjax ppl 5.865514 (nll 1.769090), transformers
5.865379 (nll 1.769067), relative difference 2.3e-5.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from launch import _cli

CORPUS = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "perplexity_corpus.txt"
WINDOW = 1024


def windows(token_ids: Sequence[int], window: int) -> list[list[int]]:
  """Consecutive windows of `window` tokens (the last one shorter)."""
  return [list(token_ids[i:i + window]) for i in range(0, len(token_ids), window)]


def _summary(tokens: int, num_windows: int, scored: int, nll_sum: float) -> dict[str, Any]:
  nll = nll_sum / scored
  return {"tokens": tokens, "windows": num_windows, "scored": scored, "nll": nll, "ppl": math.exp(nll)}


def perplexity(model, tokens: str | Sequence[int], *, window: int = WINDOW) -> dict[str, Any]:
  """Perplexity of `tokens` (token ids, or text for the model's tokenizer) under `model`, an Engine or a
  `qwenjax.LoadedModel` (served by an Engine of one slot and a context of window + 1), over `windows(tokens,
  window)` scored independently. Returns {"tokens", "windows", "scored" (tokens - windows), "nll" (mean, nats),
  "ppl"}."""
  from qwenjax import ConfigError, Engine, InputError, Request, SamplingParams  # pylint: disable=g-import-not-at-top

  if window < 2:
    raise ConfigError(f"window must be at least 2 tokens (its first is unscored), got {window}.")
  engine = model if isinstance(model, Engine) else Engine(model.model, model.tokenizer, max_batch_size=1,
                                                          max_seq_len=window + 1, eos_token_ids=())
  if window >= engine.context_len:
    raise ConfigError(f"window={window} needs a context of {window + 1} tokens; the engine holds "
                      f"{engine.context_len}.")
  if isinstance(tokens, str):
    if engine.tokenizer is None:
      raise InputError("perplexity of text needs a tokenizer; this engine has none (pass token ids).")
    tokens = engine.tokenizer.encode(tokens)
  tokens = [int(t) for t in tokens]
  if len(tokens) < 2:
    raise InputError(f"perplexity needs at least 2 tokens, got {len(tokens)}.")
  parts = windows(tokens, window)
  scoring = SamplingParams(max_tokens=1, prompt_logprobs=True)  # the one generated token is not used
  outs = engine.generate([Request(prompt=w, sampling=scoring) for w in parts])
  scores = [lp for out in outs for lp in out.prompt_logprobs[1:]]
  return _summary(len(tokens), len(parts), len(scores), -math.fsum(scores))


def transformers_perplexity(hf_model, tokens: Sequence[int], *, window: int = WINDOW) -> dict[str, Any]:
  """`perplexity` of token ids under a transformers causal LM: float32 log_softmax of its logits at each next
  token, over the same windows."""
  import torch  # pylint: disable=g-import-not-at-top

  parts = windows(tokens, window)
  nll_sum, scored = 0.0, 0
  for w in parts:
    with torch.no_grad():
      logp = torch.log_softmax(hf_model(torch.tensor([w])).logits[0, :-1].float(), -1)  # [T - 1, V]
    picked = logp.gather(-1, torch.tensor(w[1:])[:, None])[:, 0]
    nll_sum -= math.fsum(picked.double().tolist())
    scored += len(w) - 1
  return _summary(len(tokens), len(parts), scored, nll_sum)


def load_transformers(source: str):
  """transformers' float32 model of a qwenjax LoadedModel's source: a GGUF file (dequantized) or a directory."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(source)
  if path.suffix == ".gguf":
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model.eval()


def _load(model: str, dtype: str, quantize: str, quantize_embeddings: bool):
  """qwenjax.checkpoints.loader.load, with the quantization arguments passed only when they are asked for."""
  from qwenjax import ConfigError  # pylint: disable=g-import-not-at-top
  from qwenjax.checkpoints import loader  # pylint: disable=g-import-not-at-top

  kwargs = {}
  if quantize != "none":
    kwargs["quantize"] = quantize
  if quantize_embeddings:
    kwargs["quantize_embeddings"] = True
  for name, value in kwargs.items():
    if name not in inspect.signature(loader.load).parameters:
      raise ConfigError(f"--{name}={value}: this qwenjax's checkpoints.loader.load takes no {name}=.")
  return loader.load(model, dtype=dtype, **kwargs)


def define_flags() -> None:
  """The entry point's flags, defined when it runs: importing this module for `perplexity` defines none (other
  entry points that tests import define --model and --dtype too)."""
  flags.DEFINE_string("model", "default", "'default' (the embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf file or a "
                      "checkpoint directory.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "qwenjax's compute and weight dtype (the reference "
                    "is float32 always).")
  flags.DEFINE_enum("quantize", "none", ["none", "int8", "w8a8"], "Weight quantization, passed to "
                    "qwenjax.checkpoints.loader.load(quantize=...); none: the weights as loaded.")
  flags.DEFINE_bool("quantize_embeddings", False, "With --quantize, the embedding and lm_head in int8 too.")
  flags.DEFINE_string("corpus", str(CORPUS), "A UTF-8 text file to score, tokenized by the model's tokenizer.")
  flags.DEFINE_integer("window", WINDOW, "Tokens per window; windows are scored independently, each one's first "
                       "token unscored.", lower_bound=2)
  flags.DEFINE_enum("reference", "none", ["none", "transformers"], "Also score the same windows with transformers "
                    "in float32 on the same weights.")
  _cli.define_cpu_paths_flag("Matmul paths on CPU, as launch.generate's --cpu_paths: auto, default, or a record "
                             "file.")


def main(argv):
  del argv
  from qwenjax import QwenJaxError  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  try:
    from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

    _cli.use_cpu_paths(f.cpu_paths, cpu_paths.mode_of(f.dtype, f.quantize))  # before jax starts its backend
    try:
      text = pathlib.Path(f.corpus).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise QwenJaxError(f"--corpus={f.corpus}: cannot be read as UTF-8 text ({e}).") from None
    loaded = _load(f.model, f.dtype, f.quantize, f.quantize_embeddings)
    tokens = loaded.tokenizer.encode(text)
    start = time.perf_counter()
    result = perplexity(loaded, tokens, window=f.window)
    result = {"model": loaded.source, "dtype": f.dtype, "quantize": f.quantize, "cpu_paths": f.cpu_paths,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "quantize_embeddings": f.quantize_embeddings, "corpus": f.corpus, "window": f.window, **result,
              "seconds": time.perf_counter() - start}
    logging.info("qwenjax: %s", result)
    if f.reference == "transformers":
      hf_model = load_transformers(loaded.source)
      start = time.perf_counter()
      ref = transformers_perplexity(hf_model, tokens, window=f.window)
      result["reference"] = {"name": "transformers", "nll": ref["nll"], "ppl": ref["ppl"],
                             "seconds": time.perf_counter() - start}
      result["ppl_relative_difference"] = abs(result["ppl"] - ref["ppl"]) / ref["ppl"]
      logging.info("transformers: %s", result["reference"])
  except QwenJaxError as e:
    _cli.fail(e)
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
