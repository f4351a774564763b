"""The engines, each behind a GenerateFn (launch/bench/measure.py): qwenjax, transformers on torch, llama.cpp.

  qwenjax_generate_fn(model, tokenizer, max_seq_len=...)   the continuous-batching Engine, one slot per prompt
  run_transformers(...)   the same weights in a transformers Qwen2ForCausalLM, batched greedy `generate`
  run_llamacpp(...)       llama-cpp-python on the same GGUF, quantized as it is, one sequence at a time

Every engine decodes greedily and ignores end-of-sequence. A runner loads its engine, measures every batch size
and returns the engine's report entry: {"runs": [...], ...}, or {"skipped": why} when it cannot run here.
"""

from __future__ import annotations

import os
import pathlib
import time

from absl import logging

from launch.bench.costs import gguf_streamed_bytes, model_costs
from launch.bench.measure import FirstTokens, GenerateFn, measure

ENGINES = ("transformers", "llamacpp")  # the engines qwenjax is compared with (--compare_with)


def qwenjax_generate_fn(model, tokenizer, *, max_seq_len: int) -> GenerateFn:
  """The qwenjax side of every measurement: the continuous-batching Engine, one decode slot per prompt, its KV
  page pool of the engine's default size on this backend.

  `stream` is `generate` with events: the same scheduler loop, which also shows when first tokens arrive. Prefix
  caching is off: the timed run repeats the warm-up's prompts, which it would otherwise read from cached pages
  (--prefix measures sharing on its own job)."""
  import qwenjax  # pylint: disable=g-import-not-at-top

  engines: dict[int, qwenjax.Engine] = {}  # batch size -> its engine (a KV cache of that many slots)

  def generate(prompts, new_tokens):
    if len(prompts) not in engines:
      engines.clear()
      engines[len(prompts)] = qwenjax.Engine(model, tokenizer, max_batch_size=len(prompts), max_seq_len=max_seq_len,
                                             prefix_caching=False)
    clock, tokens = FirstTokens(len(prompts)), [[] for _ in prompts]
    for event in engines[len(prompts)].stream(prompts, qwenjax.SamplingParams(max_tokens=new_tokens,
                                                                              ignore_eos=True)):
      tokens[event.request_index] += event.token_ids
      clock.got(event.request_index)
    return tokens, clock.seconds

  return generate


def _torch_dtype(dtype: str):
  import torch  # pylint: disable=g-import-not-at-top

  return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def transformers_from_qwenjax(model, dtype: str):
  """A transformers Qwen2ForCausalLM holding the same weights as a (random-weight) qwenjax model."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from qwenjax.checkpoints.hf import checkpoint_names  # pylint: disable=g-import-not-at-top
  from qwenjax.model.decoder import weight_declarations  # pylint: disable=g-import-not-at-top
  from qwenjax.parallel.axes import LAYERS  # pylint: disable=g-import-not-at-top

  cfg = model.cfg
  hf_cfg = transformers.Qwen2Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
      tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings)
  state = {}
  for path, var in weight_declarations(model):
    value = np.asarray(var[...].astype("float32"))
    layers = value if var.axes[0] == LAYERS else value[None]
    for name, array in zip(checkpoint_names(path, var), layers):
      state[name] = torch.from_numpy(np.array(var.hf.to_checkpoint(array)))  # a writable, contiguous copy
  with torch.device("cpu"):
    hf_model = transformers.Qwen2ForCausalLM(hf_cfg)
  hf_model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
  if cfg.tie_word_embeddings:
    hf_model.tie_weights()
  return hf_model.to(_torch_dtype(dtype)).eval()


def _transformers_model(source: str | None, model, dtype: str):
  """transformers' model of the same weights: the same GGUF or directory, or a copy of random weights."""
  import transformers  # pylint: disable=g-import-not-at-top

  if source is None:
    return transformers_from_qwenjax(model, dtype)
  path = pathlib.Path(source)
  if path.suffix == ".gguf":
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=_torch_dtype(dtype))
  else:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
  return hf_model.eval()


def transformers_generate_fn(hf_model, pad_id: int) -> GenerateFn:
  """Batched greedy `generate`, prompts left-padded with an attention mask, no end-of-sequence token."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.generation.streamers import BaseStreamer  # pylint: disable=g-import-not-at-top

  # generate() fills unset fields of a passed config from the model's own, eos_token_id included: clear it there.
  hf_model.generation_config.eos_token_id = None

  class Clock(BaseStreamer):  # generate() puts the prompt, then each step's new tokens [B]
    def __init__(self, count):
      super().__init__()
      self.count, self.puts, self.first_tokens = count, 0, FirstTokens(count)

    def put(self, value):
      del value
      self.puts += 1
      if self.puts == 2:
        self.first_tokens.got(*range(self.count))

    def end(self):
      pass

  def generate(prompts, new_tokens):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, T], left-padded
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, T]
    for i, p in enumerate(prompts):
      ids[i, width - len(p):] = torch.tensor(p)
      mask[i, width - len(p):] = 1
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                           eos_token_id=None, pad_token_id=pad_id)
    clock = Clock(len(prompts))
    with torch.inference_mode():
      out = hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=clock)
    return out[:, width:].tolist(), clock.first_tokens.seconds

  return generate


def llamacpp_generate_fn(llm) -> GenerateFn:
  """llama.cpp, one sequence after another; greedy, and its generate() never stops on its own."""

  def generate(prompts, new_tokens):
    clock, outs = FirstTokens(len(prompts)), []
    for i, prompt in enumerate(prompts):
      llm.reset()  # no reuse of a cached prefix from the previous run
      tokens = []
      for token in llm.generate(list(prompt), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        clock.got(i)
        if len(tokens) == new_tokens:
          break
      outs.append(tokens)
    return outs, clock.seconds

  return generate


def run_transformers(source, model, dtype, tokenizer, prompts, batches, n_new, costs) -> dict:
  """transformers on the weights of `source` (None: a copy of the random-weight `model`), every batch size."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    logging.warning("transformers is skipped: %s", e)
    return {"skipped": f"not installed ({e}); pip install -e '.[bench]'"}
  logging.info("Loading transformers' model.")
  start = time.perf_counter()
  hf_model = _transformers_model(source, model, dtype)
  load_s = time.perf_counter() - start
  pad_id = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
  generate = transformers_generate_fn(hf_model, pad_id)
  runs = [measure("transformers", generate, prompts[:b], n_new, costs) for b in batches]
  result = {"load_s": load_s, "torch_threads": torch.get_num_threads(), "runs": runs}
  del hf_model, generate
  return result


def run_llamacpp(source, cfg, prompts, n_prompt, n_new) -> dict:
  """llama.cpp on the GGUF file `source`, batch 1 (its single-stream speed); skipped for any other source."""
  if source is None or pathlib.Path(source).suffix != ".gguf":
    return {"skipped": "needs a .gguf --model (llama.cpp runs the GGUF file itself)"}
  try:
    import llama_cpp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning("llama.cpp is skipped: %s", e)
    return {"skipped": f"llama-cpp-python is not installed ({e}); pip install -e '.[bench]'"}
  threads = len(os.sched_getaffinity(0))
  start = time.perf_counter()
  llm = llama_cpp.Llama(model_path=source, n_ctx=max(512, n_prompt + n_new), n_batch=512, n_threads=threads,
                        n_threads_batch=threads, n_gpu_layers=0, seed=0, verbose=False)
  load_s = time.perf_counter() - start
  costs = model_costs(cfg, gguf_streamed_bytes(source), 2)  # KV cache in float16, llama.cpp's default
  run = measure("llama.cpp", llamacpp_generate_fn(llm), prompts[:1], n_new, costs)
  result = {"load_s": load_s, "threads": threads, "weight_bytes_per_decode_step": costs.weight_bytes_per_step,
            "note": "single stream (batch 1), the GGUF's own quantized weights", "runs": [run]}
  llm.close()
  return result
