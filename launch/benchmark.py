r"""Side-by-side benchmark: qwenjax against transformers and llama.cpp, each figure against the device's limits.

  python -m launch.benchmark                                       # the embedded model, batch 1, 8, 32
  python -m launch.benchmark --compare --output_dir=/tmp/bench     # + transformers and llama.cpp, same GGUF
  python -m launch.benchmark --preset=qwen2.5-1.5b --batch_sizes=1,8   # random weights of a preset size

Every engine runs the same job: the same prompts (chat-formatted coding questions tokenized with the model's
tokenizer and cut to exactly --prompt_tokens tokens; random token ids for a random-weight --preset), greedy,
end-of-sequence ignored, --new_tokens generated per sequence. transformers runs on torch (CPU) with the same
weights (the same GGUF, dequantized to --dtype) and batched `generate`; llama.cpp (llama-cpp-python) runs the same
GGUF file, quantized as it is, one sequence at a time (its single-stream speed, batch 1 only).

For each engine and batch size B (prompts of T tokens, n new tokens each), wall-clock on this process (other
processes on the machine skew every figure: the report records the load average at the start and the end):
  first_run_s             the warm-up: the whole job for qwenjax (compiling); 16-token prompts, 2 tokens for others
  time_to_first_token_s   from the start of the job until every sequence has its first token (prefill included)
  prefill_tokens_per_s    B*T / time_to_first_token_s
  decode_tokens_per_s     B*(n-1) / (job time - time_to_first_token_s): the decode loop alone
  throughput_tokens_per_s B*n / job time: the whole job, prefill included
  compile_s               qwenjax: first_run_s minus the timed run (compilations are counted too)
Device fractions:
  decode: decode_tokens_per_s / B * bytes read per decode step / memory bandwidth. Bytes read per step are the
    weights every step streams (all weights but the embedding table, whose B rows are gathered; a tied
    embedding counts once, as the output head), at the engine's storage type (float32 or bfloat16; llama.cpp: the
    GGUF's quantized tensor bytes), plus the KV cache entries attended, at the mean context length of the decode
    steps (T + n/2), float32/bfloat16 for qwenjax and transformers, float16 for llama.cpp.
  prefill: model FLOPs / time_to_first_token_s / peak FLOP/s. Model FLOPs are 2 per weight per token for the
    layers' matmuls, the output head at each prompt's last token, and causal attention (QK and PV).
The limits are measured here, before and after the engines run (the best of both, so that other processes slowing
one probe do not lower them): peak FLOP/s as the best of a jitted 2048^3 matmul (JAX and, if installed, torch),
memory bandwidth as the best of 512 MiB reductions and a batch-1 matvec over a 512 MiB matrix. On an H200 the
looked-up figures (4.8 TB/s, 989 TFLOP/s bf16 dense) are used instead.

stdout holds a table and the ratios; --output_dir gets report.json (every figure, the limits, versions, machine)
and tokens_per_s.png (tokens/s against batch size, one line per engine). Logs go to stderr.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time
from typing import Callable, Sequence

from absl import app, flags, logging

from launch import _cli

_TINY = "tiny"  # a few-layer random model for smoke tests (tests/test_benchmark.py)
_ENGINES = ("transformers", "llamacpp")

_MODEL = flags.DEFINE_string("model", "default", "'default' (the embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf "
                             "file, or a Hugging Face checkpoint directory.")
_PRESET = flags.DEFINE_string("preset", None, "Instead of --model: random weights of a qwenjax.PRESETS size "
                              f"(e.g. qwen2.5-0.5b), or '{_TINY}' for a smoke test. Prompts are random token ids.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and weight dtype (also "
                           "transformers').")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes to measure.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 64, "Tokens in every prompt.", lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence.", lower_bound=2)
_COMPARE = flags.DEFINE_bool("compare", False, "Also run the engines of --compare_with on the same job.")
_COMPARE_WITH = flags.DEFINE_list("compare_with", list(_ENGINES), "Engines to compare with under --compare: "
                                  f"{', '.join(_ENGINES)}.")
_SCAN_LAYERS = flags.DEFINE_enum("scan_layers", "auto", ["auto", "true", "false"],
                                 "Scanned (stacked) or unrolled layers; auto: unrolled on CPU only.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", os.path.join(tempfile.gettempdir(), "qwenjax-benchmark"),
                                  "Where report.json and tokens_per_s.png go.")


def _positive_integers(values: list[str]) -> bool:
  try:
    return bool(values) and all(int(v) >= 1 for v in values)
  except ValueError:
    return False


def _known_preset(name: str | None) -> bool:
  from qwenjax.config import PRESETS  # pylint: disable=g-import-not-at-top  (--help stays fast)

  if name is None or name == _TINY or name in PRESETS:
    return True
  raise flags.ValidationError(f"expected one of {', '.join(sorted(PRESETS) + [_TINY])}")


flags.register_validator("batch_sizes", _positive_integers, "expected positive integers, e.g. 1,8,32")
flags.register_validator("compare_with", lambda engines: set(engines) <= set(_ENGINES),
                         f"expected engines among {', '.join(_ENGINES)}")
flags.register_validator("preset", _known_preset)

# The prompts' user messages: coding questions, combined and cut to the prompt length.
_QUESTIONS = (
    "Write a Python function that checks whether a number is prime, and explain its complexity.",
    "How do I reverse a linked list in place in C? Show the code and walk through one example.",
    "What is the difference between a process and a thread? When would you use each in a web server?",
    "Implement binary search in Rust over a sorted slice and return the index or None.",
    "Explain Python's GIL and how it affects CPU-bound code that uses threads.",
    "Write a SQL query that returns the three highest-paid employees of every department.",
    "How does a hash map handle collisions? Compare chaining with open addressing.",
    "Write a JavaScript debounce function and show how to use it on a search box.",
    "Refactor this loop into a list comprehension: result = []; for x in xs: if x % 2: result.append(x * x)",
    "Explain the time complexity of quicksort in the best, average and worst cases, and how to avoid the worst.",
    "Write a bash one-liner that counts the lines of every .py file under a directory, sorted by count.",
    "How do I read a large CSV file in pandas in chunks and compute the mean of one column?",
)
_SYSTEM_MESSAGE = "You are a helpful coding assistant."

# Looked-up limits of an NVIDIA H200 (SXM): HBM3e bandwidth and dense bfloat16 tensor-core FLOP/s.
_H200 = {"memory_bandwidth_bytes_per_s": 4.8e12, "peak_flops_per_s": 989e12, "peak_flops_dtype": "bfloat16 dense"}

# (prompts, new tokens) -> (generated token ids, seconds until every sequence had its first token)
GenerateFn = Callable[[Sequence[Sequence[int]], int], tuple[list[list[int]], float]]


def _tiny_config():
  from qwenjax import QwenConfig  # pylint: disable=g-import-not-at-top

  return QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, rope_theta=1e4, tie_word_embeddings=True,
                    max_position_embeddings=1024)


# --- The engines: each is a GenerateFn, greedy, end-of-sequence ignored. ---


class _FirstTokens:
  """Times when every sequence of a job has its first token: the batch's time to first token."""

  def __init__(self, count: int):
    self.start, self.waiting, self.seconds = time.perf_counter(), set(range(count)), None

  def got(self, *indices: int) -> None:
    self.waiting.difference_update(indices)
    if not self.waiting and self.seconds is None:
      self.seconds = time.perf_counter() - self.start


def qwenjax_generate_fn(model, tokenizer, *, max_seq_len: int) -> GenerateFn:
  """The qwenjax side of every measurement: the continuous-batching Engine, one decode slot per prompt.

  `stream` is `generate` with events: the same scheduler loop, which also shows when first tokens arrive."""
  import qwenjax  # pylint: disable=g-import-not-at-top

  engines: dict[int, qwenjax.Engine] = {}  # batch size -> its engine (a KV cache of that many slots)

  def generate(prompts, new_tokens):
    if len(prompts) not in engines:
      engines.clear()
      engines[len(prompts)] = qwenjax.Engine(model, tokenizer, max_batch_size=len(prompts), max_seq_len=max_seq_len)
    clock, tokens = _FirstTokens(len(prompts)), [[] for _ in prompts]
    for event in engines[len(prompts)].stream(prompts, qwenjax.SamplingParams(max_tokens=new_tokens,
                                                                              ignore_eos=True)):
      tokens[event.request_index] += event.token_ids
      clock.got(event.request_index)
    return tokens, clock.seconds

  return generate


def _torch_dtype(dtype: str):
  import torch  # pylint: disable=g-import-not-at-top

  return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _transformers_from_qwenjax(model, dtype: str):
  """A transformers Qwen2ForCausalLM holding the same weights as a (random-weight) qwenjax model."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from qwenjax.checkpoints.hf import _tensor_names  # pylint: disable=g-import-not-at-top  (checkpoint names)
  from qwenjax.model.decoder import LAYERS, weight_declarations  # pylint: disable=g-import-not-at-top

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
    for name, array in zip(_tensor_names(path, var), layers):
      hf = var.hf  # the inverse of HFTensor.to_param: checkpoint layout from param layout
      array = array.reshape(hf.shape[::-1]).T if hf.transpose else array.reshape(hf.shape)
      state[name] = torch.from_numpy(np.array(array))  # a writable, contiguous copy
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
    return _transformers_from_qwenjax(model, dtype)
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
      self.count, self.puts, self.first_tokens = count, 0, _FirstTokens(count)

    def put(self, value):
      del value
      self.puts += 1
      if self.puts == 2:
        self.first_tokens.got(*range(self.count))

    def end(self):
      pass

  def generate(prompts, new_tokens):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
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
    clock, outs = _FirstTokens(len(prompts)), []
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


# --- Device limits and model costs. ---


def _best_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (and compilation)
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def probe_device(dtype: str) -> dict:
  """Short probes of the device's peak matmul FLOP/s and memory bandwidth (float32 on CPU), best of 10 each."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  backend = jax.default_backend()
  probe_dtype = jnp.float32 if backend == "cpu" else jnp.dtype(dtype)
  n, repeats, stream_bytes = (2048 if backend == "cpu" else 8192), 10, 512 << 20
  a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(probe_dtype)
          for k in jax.random.split(jax.random.key(0), 2))
  matmul = jax.jit(lambda x, y: x @ y)
  probes = {"jax_matmul_flops_per_s": 2 * n**3 / _best_seconds(lambda: matmul(a, b).block_until_ready(), repeats)}
  del a, b
  x = jnp.ones((stream_bytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  probes["jax_reduction_bytes_per_s"] = stream_bytes / _best_seconds(lambda: total(x).block_until_ready(), repeats)
  del x
  w, v = jnp.ones((stream_bytes // 4 // 4096, 4096), jnp.float32), jnp.ones((4096,), jnp.float32)
  matvec = jax.jit(lambda m, y: m @ y)
  probes["jax_matvec_bytes_per_s"] = stream_bytes / _best_seconds(lambda: matvec(w, v).block_until_ready(), repeats)
  del w
  if backend == "cpu":
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      return probes
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    probes["torch_matmul_flops_per_s"] = 2 * n**3 / _best_seconds(lambda: ta @ tb, repeats)
    del ta, tb
    tx = torch.ones(stream_bytes // 4)
    probes["torch_reduction_bytes_per_s"] = stream_bytes / _best_seconds(tx.sum, repeats)
  return probes


def device_limits(dtype: str, probe_runs: list[dict]) -> dict:
  """The limits the fractions use: the best of the probes (run before and after the engines, so that a probe
  slowed by other processes does not lower the limit), or an H200's looked-up figures on an H200."""
  import jax  # pylint: disable=g-import-not-at-top

  best = {k: max(run[k] for run in probe_runs) for k in probe_runs[0]}
  flops = max(v for k, v in best.items() if k.endswith("flops_per_s"))
  bandwidth = max(v for k, v in best.items() if k.endswith("bytes_per_s"))
  backend, device_kind = jax.default_backend(), jax.devices()[0].device_kind
  limits = {"backend": backend, "device_kind": device_kind,
            "measured": {"peak_flops_per_s": flops, "memory_bandwidth_bytes_per_s": bandwidth,
                         "probe_dtype": "float32" if backend == "cpu" else dtype, "probe_runs": probe_runs},
            "h200": dict(_H200, status="not measured in this run")}
  if "H200" in device_kind:
    limits["h200"]["status"] = "this device; looked up, used for the fractions"
    limits["used"] = dict(source="looked up (H200)", **_H200)
  else:
    limits["used"] = {"source": "measured here", "peak_flops_per_s": flops, "memory_bandwidth_bytes_per_s": bandwidth}
  if backend == "cpu":
    limits["nominal_cpu"] = _nominal_cpu_peak()
  return limits


def _nominal_cpu_peak() -> dict:
  """Cores x clock x float32 FLOPs per cycle from /proc/cpuinfo (two FMA units per core assumed)."""
  info = _cpuinfo()
  flags_ = set(info.get("flags", "").split())
  per_cycle = 64 if "avx512f" in flags_ else 32 if {"avx2", "fma"} <= flags_ else 8
  mhz = float(info.get("cpu MHz", 0) or 0)
  cores = len(os.sched_getaffinity(0))
  return {"peak_flops_per_s": cores * mhz * 1e6 * per_cycle, "cores": cores, "mhz": mhz,
          "float32_flops_per_cycle": per_cycle, "note": "nominal, from the reported clock; not used for fractions"}


def _cpuinfo() -> dict:
  info = {}
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      key, _, value = line.partition(":")
      info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return info


@dataclasses.dataclass(frozen=True)
class ModelCosts:
  """What one step of the model reads and computes (see the module docstring for what is counted)."""

  weight_bytes_per_step: float  # weights streamed by every decode step
  kv_bytes_per_token: float  # KV cache bytes per attended position of one sequence
  matmul_params: int  # the layers' matmul weights
  head_params: int  # the output head (V x D)
  attention_flops_unit: int  # 2 * 2 * L * N * H: attention FLOPs per (query, key) pair

  def prefill_flops(self, batch: int, prompt: int) -> float:
    causal_pairs = prompt * (prompt + 1) / 2
    return batch * (2 * self.matmul_params * prompt + 2 * self.head_params
                    + self.attention_flops_unit * causal_pairs)

  def decode_bytes_per_step(self, batch: int, context: float) -> float:
    return self.weight_bytes_per_step + batch * context * self.kv_bytes_per_token


def model_costs(cfg, weight_bytes: float, kv_bytes_per_element: int) -> ModelCosts:
  d, f, v, l = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return ModelCosts(weight_bytes_per_step=weight_bytes, kv_bytes_per_token=2 * l * kv * kv_bytes_per_element,
                    matmul_params=l * (2 * d * q + 2 * d * kv + 3 * d * f), head_params=v * d,
                    attention_flops_unit=4 * l * q)


def _streamed_params(cfg) -> int:
  """Weights a decode step reads: all but the embedding table (a tied one is read whole, as the head)."""
  return cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def _gguf_streamed_bytes(path: str) -> int:
  """The quantized bytes llama.cpp streams per decode step: every tensor but an untied token embedding."""
  import gguf  # pylint: disable=g-import-not-at-top

  reader = gguf.GGUFReader(path)
  sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
  if "output.weight" in sizes:
    sizes.pop("token_embd.weight", None)
  return sum(sizes.values())


# --- Measuring. ---


def measure(name: str, generate: GenerateFn, prompts: list[list[int]], new_tokens: int, costs: ModelCosts,
            compiles: bool = False) -> dict:
  """The same protocol for every engine: a warm-up run, then the timed run of the whole job.

  compiles: the engine compiles programs (qwenjax). Its warm-up is then the whole job, so that every program the
  job needs is compiled before the timed run (a test holds that run to zero compilations), and compile time is
  the warm-up minus the timed run. Otherwise the warm-up is short: prompts of at most 16 tokens, 2 new tokens.
  """
  from qwenjax.engine.profiling import count_compilations  # pylint: disable=g-import-not-at-top

  b, t = len(prompts), len(prompts[0])
  with count_compilations() as compiled:
    start = time.perf_counter()
    if compiles:
      generate(prompts, new_tokens)
    else:
      generate([p[:16] for p in prompts], 2)
    first = time.perf_counter() - start
  with count_compilations() as compiled_after:
    start = time.perf_counter()
    outs, ttft = generate(prompts, new_tokens)
    total = time.perf_counter() - start
  short = [i for i, o in enumerate(outs) if len(o) != new_tokens]
  if len(outs) != b or short:
    raise RuntimeError(f"{name} generated {len(outs[short[0]]) if short else '?'} tokens for prompt "
                       f"{short[0] if short else '?'} of {b}, expected {new_tokens}.")
  decode_s = total - ttft
  run = {"batch": b, "prompt_tokens": t, "new_tokens": new_tokens,
         "first_run_s": first, "time_to_first_token_s": ttft, "prefill_tokens_per_s": b * t / ttft,
         "decode_tokens_per_s": b * (new_tokens - 1) / decode_s, "decode_step_ms": 1000 * decode_s / (new_tokens - 1),
         "throughput_tokens_per_s": b * new_tokens / total, "total_s": total,
         "prefill_flops": costs.prefill_flops(b, t),
         # the mean decode step attends T + n/2 positions
         "decode_bytes_per_step": costs.decode_bytes_per_step(b, t + new_tokens / 2)}
  if compiles:
    run["compile_s"] = max(0.0, first - total)
    run["compilations"] = dict(compiled)
    run["compilations_after_warmup"] = sum(compiled_after.values())
  run["_tokens"] = outs
  logging.info("%s batch %d: %s", name, b, {k: v for k, v in run.items() if k != "_tokens"})
  return run


def add_fractions(run: dict, limits: dict) -> None:
  """Each run's fraction of the device's limits: bandwidth for decode, peak FLOP/s for prefill."""
  used = limits["used"]
  run["prefill_flops_fraction"] = run["prefill_flops"] / run["time_to_first_token_s"] / used["peak_flops_per_s"]
  step_s = run["decode_step_ms"] / 1000
  run["decode_bandwidth_fraction"] = run["decode_bytes_per_step"] / step_s / used["memory_bandwidth_bytes_per_s"]
  if max(run["prefill_flops_fraction"], run["decode_bandwidth_fraction"]) > 1:
    logging.warning("A fraction above 1 (batch %d): the probes underestimated the device's limits (other "
                    "processes running while they ran?).", run["batch"])


def chat_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
  """`count` different chat prompts of exactly `length` tokens: questions combined, the user message cut."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from qwenjax import InputError  # pylint: disable=g-import-not-at-top

  marker = "\x00QUESTION\x00"
  text = tokenizer.apply_chat_template([{"role": "system", "content": _SYSTEM_MESSAGE},
                                        {"role": "user", "content": marker}])
  head, tail = (tokenizer.encode(s, add_special_tokens=False) for s in text.split(marker))
  room = length - len(head) - len(tail)
  if room < 1:
    raise InputError(f"--prompt_tokens={length} is too short for a chat prompt: the template alone takes "
                     f"{len(head) + len(tail)} tokens.")
  prompts = []
  for i in range(count):
    order = np.random.default_rng(i).permutation(len(_QUESTIONS))
    body: list[int] = []
    while len(body) < room:
      body += tokenizer.encode(" ".join(_QUESTIONS[j] for j in order), add_special_tokens=False)
    prompts.append(head + body[:room] + tail)
  return prompts


def random_prompts(vocab_size: int, count: int, length: int) -> list[list[int]]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  return [rng.integers(0, vocab_size, length).tolist() for _ in range(count)]


def _agreement(tokens: list[int], reference: list[int]) -> float:
  """Fraction of the reference's greedy tokens matched before the first difference."""
  same = 0
  for a, b in zip(tokens, reference):
    if a != b:
      break
    same += 1
  return same / len(reference)


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a and b else None


def compute_ratios(engines: dict, batches: list[int]) -> dict:
  """qwenjax over the others: batch-1 decode, throughput at the largest batch, and per batch size."""

  def run(engine, batch):
    runs = engines.get(engine, {}).get("runs", [])
    return next((r for r in runs if r["batch"] == batch), None)

  def get(engine, batch, key):
    r = run(engine, batch)
    return r[key] if r else None

  q1, t1 = get("qwenjax", 1, "decode_tokens_per_s"), get("transformers", 1, "decode_tokens_per_s")
  single_stream = get("llamacpp", 1, "decode_tokens_per_s")
  big = max(batches)
  qb, tb = get("qwenjax", big, "throughput_tokens_per_s"), get("transformers", big, "throughput_tokens_per_s")
  decode = {"qwenjax_tokens_per_s": q1, "transformers_tokens_per_s": t1,
            "qwenjax_over_transformers": _ratio(q1, t1), "target": 2.0,
            "llamacpp_tokens_per_s": single_stream, "qwenjax_over_llamacpp": _ratio(q1, single_stream)}
  throughput = {"batch": big, "qwenjax_tokens_per_s": qb, "transformers_tokens_per_s": tb,
                "qwenjax_over_transformers": _ratio(qb, tb), "target": 3.0,
                "llamacpp_single_stream_decode_tokens_per_s": single_stream,
                "qwenjax_over_llamacpp_single_stream": _ratio(qb, single_stream)}
  for r in (decode, throughput):
    r["met"] = None if r["qwenjax_over_transformers"] is None else r["qwenjax_over_transformers"] >= r["target"]
  per_batch = []
  for b in batches:
    row = {"batch": b}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "throughput_tokens_per_s"):
      for other in _ENGINES:
        row[f"{key}_qwenjax_over_{other}"] = _ratio(get("qwenjax", b, key), get(other, b, key))
    per_batch.append(row)
  return {"decode_batch_1": decode, "throughput_largest_batch": throughput, "per_batch": per_batch}


# --- Report: table, JSON, plot. ---

_LABELS = {"qwenjax": "qwenjax", "transformers": "transformers", "llamacpp": "llama.cpp"}
_COLORS = {"qwenjax": (31, 119, 180), "transformers": (214, 39, 40), "llamacpp": (44, 160, 44)}


def format_table(report: dict) -> str:
  cols = ("engine", "batch", "prefill tok/s", "TTFT s", "decode tok/s", "job tok/s", "compile s", "%BW", "%FLOPs")
  lines = ["{:<13}{:>6}{:>15}{:>9}{:>14}{:>11}{:>11}{:>7}{:>8}".format(*cols)]
  for name, engine in report["engines"].items():
    if "skipped" in engine:
      lines.append(f"{_LABELS[name]:<13}  skipped: {engine['skipped']}")
      continue
    for r in engine["runs"]:
      compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
      lines.append("{:<13}{:>6}{:>15.1f}{:>9.2f}{:>14.2f}{:>11.2f}{:>11}{:>6.1f}%{:>7.1f}%".format(
          _LABELS[name], r["batch"], r["prefill_tokens_per_s"], r["time_to_first_token_s"],
          r["decode_tokens_per_s"], r["throughput_tokens_per_s"], compile_s, 100 * r["decode_bandwidth_fraction"],
          100 * r["prefill_flops_fraction"]))
  used = report["device_limits"]["used"]
  lines.append(f"limits ({used['source']}): {used['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
               f"{used['peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
  ratios = report["ratios"]
  fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"
  d, t = ratios["decode_batch_1"], ratios["throughput_largest_batch"]
  lines.append(f"batch-1 decode, qwenjax / transformers: {fmt(d['qwenjax_over_transformers'])} "
               f"(target {d['target']:.0f}x{'' if d['met'] is None else ': met' if d['met'] else ': not met'}); "
               f"qwenjax / llama.cpp: {fmt(d['qwenjax_over_llamacpp'])}")
  lines.append(f"batch-{t['batch']} job throughput, qwenjax / transformers: {fmt(t['qwenjax_over_transformers'])} "
               f"(target {t['target']:.0f}x{'' if t['met'] is None else ': met' if t['met'] else ': not met'}); "
               f"qwenjax / llama.cpp single stream: {fmt(t['qwenjax_over_llamacpp_single_stream'])}")
  return "\n".join(lines)


def _nice_step(span: float) -> float:
  raw = span / 5
  base = 10 ** math.floor(math.log10(raw))
  return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def plot(report: dict, path: pathlib.Path) -> None:
  """tokens/s against batch size (log-2 axis): decode solid, whole-job throughput dashed, one color per engine."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top

  width, height, left, right, top, bottom = 900, 560, 80, 220, 56, 60
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default(size=14)
  small = ImageFont.load_default(size=12)
  engines = {n: e for n, e in report["engines"].items() if "runs" in e}
  batches = sorted(report["benchmark"]["batch_sizes"])
  ymax = max([r[k] for e in engines.values() for r in e["runs"]
              for k in ("decode_tokens_per_s", "throughput_tokens_per_s")] + [1e-9])
  step = _nice_step(ymax)
  ytop = step * math.ceil(ymax * 1.05 / step)
  lo, hi = math.log2(batches[0]), math.log2(batches[-1])
  hi = hi if hi > lo else lo + 1
  x_of = lambda b: left + (math.log2(b) - lo) / (hi - lo) * (width - left - right)
  y_of = lambda v: height - bottom - v / ytop * (height - top - bottom)
  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for i in range(int(round(ytop / step)) + 1):
    y = y_of(i * step)
    draw.line([left, y, width - right, y], fill=(225, 225, 225))
    draw.text((left - 8, y), f"{i * step:g}", fill="black", font=small, anchor="rm")
  for b in batches:
    draw.text((x_of(b), height - bottom + 8), str(b), fill="black", font=small, anchor="mt")
  draw.text(((left + width - right) / 2, height - 22), "batch size", fill="black", font=font, anchor="mm")
  draw.text((left, top - 4), "tokens/s", fill="black", font=font, anchor="lb")
  bench = report["benchmark"]
  draw.text((left, 18), f"{bench['model_name']}, {bench['dtype']}, {bench['prompt_tokens']}-token prompts, "
            f"{bench['new_tokens']} new tokens, on {report['machine']['description']}", fill="black", font=font)

  def polyline(points, color, dashed):
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
      if not dashed:
        draw.line([x0, y0, x1, y1], fill=color, width=3)
        continue
      n = max(1, int(math.hypot(x1 - x0, y1 - y0) / 8))
      for k in range(0, n, 2):
        draw.line([x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n,
                   x0 + (x1 - x0) * (k + 1) / n, y0 + (y1 - y0) * (k + 1) / n], fill=color, width=3)
    for x, y in points:
      draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)

  legend_y = top + 4
  for name, engine in engines.items():
    color = _COLORS[name]
    for key, dashed, what in (("decode_tokens_per_s", False, "decode"), ("throughput_tokens_per_s", True, "job")):
      points = [(x_of(r["batch"]), y_of(r[key])) for r in engine["runs"]]
      polyline(points, color, dashed)
      if len(points) == 1:  # a single-stream engine: its speed as a thin level line across the batch sizes
        draw.line([points[0][0], points[0][1], width - right, points[0][1]], fill=color, width=1)
      lx = width - right + 16
      polyline([(lx, legend_y + 7), (lx + 36, legend_y + 7)], color, dashed)
      draw.text((lx + 44, legend_y), f"{_LABELS[name]} {what}", fill="black", font=small)
      legend_y += 20
  image.save(path)


def _versions() -> dict:
  out = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "llama_cpp_python", "gguf", "pillow"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = None
  return out


def _machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  info = _cpuinfo()
  cores = len(os.sched_getaffinity(0))
  mem_kib = 0
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal:"):
        mem_kib = int(line.split()[1])
  except OSError:
    pass
  cpu = info.get("model name") or platform.processor() or "unknown CPU"
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  return {"cpu_model": cpu, "cores": cores, "memory_gib": round(mem_kib / 2**20, 1), "platform": platform.platform(),
          "load_average_1min_at_end": os.getloadavg()[0],
          "jax_backend": backend, "jax_device": device, "jax_device_count": jax.device_count(),
          "description": f"{cpu}, {cores} cores" if backend == "cpu" else f"{jax.device_count()}x {device}"}


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _round(value, digits: int = 4):
  if isinstance(value, float):
    return float(f"{value:.{digits}g}")
  if isinstance(value, dict):
    return {k: _round(v, digits) for k, v in value.items()}
  if isinstance(value, list):
    return [_round(v, digits) for v in value]
  return value


def _run_transformers(source, model, dtype, tokenizer, prompts, batches, n_new, costs) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
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


def _run_llamacpp(source, cfg, prompts, n_prompt, n_new) -> dict:
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
  costs = model_costs(cfg, _gguf_streamed_bytes(source), 2)  # KV cache in float16, llama.cpp's default
  run = measure("llama.cpp", llamacpp_generate_fn(llm), prompts[:1], n_new, costs)
  result = {"load_s": load_s, "threads": threads, "weight_bytes_per_decode_step": costs.weight_bytes_per_step,
            "note": "single stream (batch 1), the GGUF's own quantized weights", "runs": [run]}
  llm.close()
  return result


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.checkpoints import loader  # pylint: disable=g-import-not-at-top

  batches = sorted({int(b) for b in _BATCH_SIZES.value})
  preset = _PRESET.value
  if preset is not None and flags.FLAGS["model"].present:
    _cli.fail("--model and --preset both name a model; pass one")
  n_prompt, n_new, dtype = _PROMPT_TOKENS.value, _NEW_TOKENS.value, _DTYPE.value
  compare_with = list(dict.fromkeys(_COMPARE_WITH.value)) if _COMPARE.value else []
  out_dir = pathlib.Path(_OUTPUT_DIR.value)
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    _cli.fail(f"--output_dir={out_dir}: cannot create the directory ({e.strerror})")
  scan = {"auto": loader.default_scan_layers(), "true": True, "false": False}[_SCAN_LAYERS.value]
  wall_start = time.perf_counter()
  load_before = os.getloadavg()[0]  # other processes on the machine skew every figure: recorded

  logging.info("Probing the device's limits.")
  probe_runs = [probe_device(dtype)]

  start = time.perf_counter()
  if preset is None:
    try:
      loaded = qwenjax.load(_MODEL.value, dtype=dtype, scan_layers=scan)
      prompts = chat_prompts(loaded.tokenizer, max(batches), n_prompt)
    except qwenjax.QwenJaxError as e:
      _cli.fail(e)
    model, tokenizer, source, model_name = loaded.model, loaded.tokenizer, loaded.source, _MODEL.value
    if model_name in ("", "default"):
      model_name = pathlib.Path(source).name
    prompt_kind = f"chat: {_SYSTEM_MESSAGE!r} + coding questions cut to {n_prompt} tokens"
  else:
    cfg = _tiny_config() if preset == _TINY else qwenjax.PRESETS[preset]
    model = qwenjax.Qwen2(cfg, rngs=nnx.Rngs(0), dtype=loader.DTYPES[dtype], param_dtype=loader.DTYPES[dtype],
                          scan_layers=scan)
    tokenizer, source, model_name = None, None, f"{preset} (random weights)"
    prompts = random_prompts(cfg.vocab_size, max(batches), n_prompt)
    prompt_kind = f"random token ids, {n_prompt} per prompt"
  cfg = model.cfg
  load_s = time.perf_counter() - start
  max_seq_len = -(-(n_prompt + n_new) // 128) * 128
  param_bytes = np.dtype(loader.DTYPES[dtype]).itemsize
  float_costs = model_costs(cfg, _streamed_params(cfg) * param_bytes, param_bytes)

  engines: dict[str, dict] = {}
  generate = qwenjax_generate_fn(model, tokenizer, max_seq_len=max_seq_len)
  engines["qwenjax"] = {"load_s": load_s, "scan_layers": model.scan_layers, "max_seq_len": max_seq_len,
                        "runs": [measure("qwenjax", generate, prompts[:b], n_new, float_costs, compiles=True)
                                 for b in batches],
                        "peak_host_memory_gib": _peak_rss_gib()}
  reference = engines["qwenjax"]["runs"][0]["_tokens"][0]
  del generate
  gc.collect()

  for engine in compare_with:
    if engine == "transformers":
      engines[engine] = _run_transformers(source, model, dtype, tokenizer, prompts, batches, n_new, float_costs)
    elif engine == "llamacpp":
      engines[engine] = _run_llamacpp(source, cfg, prompts, n_prompt, n_new)
    gc.collect()

  logging.info("Probing the device's limits again.")
  probe_runs.append(probe_device(dtype))
  limits = device_limits(dtype, probe_runs)
  for engine in engines.values():
    for r in engine.get("runs", []):
      r["greedy_agreement_with_qwenjax"] = _agreement(r.pop("_tokens")[0], reference)
      add_fractions(r, limits)

  report = {
      "benchmark": {"model_name": model_name, "source": source, "preset": preset, "dtype": dtype,
                    "prompt_tokens": n_prompt, "new_tokens": n_new, "batch_sizes": batches, "prompts": prompt_kind,
                    "decoding": "greedy, end-of-sequence ignored", "params": cfg.num_params()},
      "machine": dict(_machine(), load_average_1min_at_start=load_before),
      "versions": _versions(),
      "device_limits": limits,
      "model_costs": {
          "float_weight_bytes_per_decode_step": float_costs.weight_bytes_per_step,
          "float_kv_bytes_per_position": float_costs.kv_bytes_per_token,
          "prefill_flops_per_prompt": float_costs.prefill_flops(1, n_prompt),
          "counting": "decode: weights streamed per step (all but the embedding table; a tied one counts once, as "
                      "the head) + KV cache at the mean decode context T + n/2; prefill: 2 FLOPs per matmul weight "
                      "per token, the head at each prompt's last token, causal attention"},
      "engines": engines,
      "ratios": compute_ratios(engines, batches),
      "peak_host_memory_gib": _peak_rss_gib(),
      "wall_s": time.perf_counter() - wall_start,
  }
  report = _round(report)
  (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  plot(report, out_dir / "tokens_per_s.png")
  print(format_table(report))
  print(f"report: {out_dir / 'report.json'}  plot: {out_dir / 'tokens_per_s.png'}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
