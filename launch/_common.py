"""Flags that the serving launch scripts (generate, batch_generate) share: the model and its dtype, the context, the
default sampling parameters, the device mesh (or a topology file that names it) and multi-host.

    python -m launch.batch_generate --topology=v5e-8 --model=/ckpt/Qwen2.5-7B-Instruct ...
    python -m launch.batch_generate --mesh=data:2,tensor:4 --max_batch_size=64 ...
    python -m launch.batch_generate --coordinator_address=10.0.0.1:8476 --num_processes=4 --process_id=$I ...

With a topology, the model's entry there (matched by architecture) gives the mesh, and the decode batch, context
and prefill chunk unless those flags are given explicitly. A mesh is one replica of the model: the devices of
one host, or of several consecutive hosts (processes) that then serve the same requests in lockstep; replicas
split the work (`qwenjax.parallel.distributed.replica`).
"""

from __future__ import annotations

import dataclasses

from absl import flags, logging

from launch import _cli

MODEL = flags.DEFINE_string("model", "default", "'default' (the embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf "
                            "file, a Hugging Face checkpoint directory, or an Orbax checkpoint from launch.convert.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and weight dtype (float32 is the "
                          "CPU default; bfloat16 for TPU/GPU).")
QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8", "w8a8"], "int8: int8 weights with a float32 "
                             "scale per output channel, quantized as they load (w8a16: the matmul dequantizes tile "
                             "by tile); w8a8: activations quantized per token too, int32 accumulation. Norms, biases "
                             "and logits stay float32. An Orbax checkpoint keeps what it was converted with.")
QUANTIZE_EMBEDDINGS = flags.DEFINE_bool("quantize_embeddings", False, "With --quantize, the embedding and lm_head "
                                        "in int8 too (27% of the 0.5B model's weights).")
MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 4096, "Context per sequence: prompt plus generated tokens.",
                                   lower_bound=1)
DECODE_STEPS = flags.DEFINE_integer("decode_steps", 4, "Decode steps per jitted call while nothing prefills.",
                                    lower_bound=1)
MAX_NUM_BATCHED_TOKENS = flags.DEFINE_integer(
    "max_num_batched_tokens", None, "Prompt tokens one engine step computes, beside a token for each decoding "
    "sequence (longer prompts prefill over several steps). Default: 512, or the topology's max_prefill_chunk.",
    lower_bound=1)
# Sampling: a request's defaults (a batch line's "sampling" object overrides them).
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Most tokens to generate per sequence.", lower_bound=1)
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 means greedy.")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the smallest set of tokens reaching this mass.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens; 0 keeps all.")
MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens less likely than min_p times the most likely one.")
REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "Repetition penalty (1: off).")
PRESENCE_PENALTY = flags.DEFINE_float("presence_penalty", 0.0, "Presence penalty.")
FREQUENCY_PENALTY = flags.DEFINE_float("frequency_penalty", 0.0, "Frequency penalty.")
SEED = flags.DEFINE_integer("seed", None, "Sampling seed: the same seed gives the same sample. Default: fresh "
                            "entropy per request.")
STOP = flags.DEFINE_multi_string("stop", [], "A stop string (repeatable): generation ends before it.")
IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Don't stop at an end-of-sequence token.")
_cli.validate_sampling_flags("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                             "frequency_penalty", "seed", max_new_tokens="max_tokens")

# The KV cache and attention kernels.
KV_CACHE_MEMORY = flags.DEFINE_float("kv_cache_memory", None, "GiB of KV pages per device. Default: 90% of a "
                                     "TPU/GPU's free memory after the weights (a topology's planned pool with "
                                     "--topology); on CPU what the slots fill at --max_seq_len, at most 4 GiB.")
KV_CACHE_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"], "auto: pages in the compute dtype; "
                                   "int8: int8 pages with a float32 scale per token and KV head.")
PAGE_SIZE = flags.DEFINE_integer("page_size", None, "Tokens per KV page (default by backend: 64 on CPU, 16 on GPU, "
                                 "128 on TPU).", lower_bound=1)
PREFIX_CACHING = flags.DEFINE_bool("prefix_caching", True, "Requests that share a prompt prefix (a system prompt, "
                                    "a few-shot header, the n samples of one request) read its KV pages instead of "
                                    "computing them again; released prefix pages stay cached, evicted least "
                                    "recently used first. Outputs are unchanged.")
ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "auto", ["auto", "xla", "pallas"], "Attention kernels: xla (plain "
                                   "JAX) or pallas (ragged paged attention, segment attention for the vision tower; "
                                   "interpret mode on CPU, slow). auto: pallas on TPU/GPU, xla on CPU.")

LORA = flags.DEFINE_multi_string("lora", [], "A LoRA adapter to serve, NAME=PATH (repeatable; PATH a PEFT adapter "
                                 "directory, as peft's save_pretrained or launch.finetune writes it). A request picks "
                                 "its adapter by name (a batch line's \"lora\" field, an OpenAI Batch body's "
                                 "\"model\"); rows with different adapters, or none, share one decode batch.")
MERGE_LORA = flags.DEFINE_bool("merge_lora", False, "Fold the one --lora adapter into the weights instead (every "
                               "request then runs the tuned model; float weights only).")
MESH = flags.DEFINE_string("mesh", None, "Device mesh of each host as comma-separated axis:size pairs over data, "
                           "fsdp, expert (a MoE's experts) and tensor, multiplying to the host's device count (e.g. "
                           "tensor:8, data:2,tensor:4 or expert:4,tensor:2); weights and KV cache are sharded by "
                           "qwenjax.parallel.sharding's rules. Default: one device.")
TOPOLOGY = flags.DEFINE_string("topology", None, "A topology file: a name in tpu_configs/ (e.g. v5e-8, h100-8) "
                               "or a path. It gives the mesh and, unless set by their flags, the decode batch, "
                               "context and prefill chunk planned for this model's size.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-host run "
                                  "(default: $QWENJAX_COORDINATOR_ADDRESS; TPU pods find it themselves).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run "
                                     "(default: $QWENJAX_NUM_PROCESSES).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run "
                                  "(default: $QWENJAX_PROCESS_ID).")
COMPILATION_CACHE = flags.DEFINE_bool("compilation_cache", True, "Keep compiled programs on disk (JAX's persistent "
                                      "compilation cache, a directory per processor) so that a rerun reads them "
                                      "back instead of compiling; --nocompilation_cache turns it off.")
COMPILATION_CACHE_DIR = flags.DEFINE_string("compilation_cache_dir", None, "Where --compilation_cache keeps them. "
                                            "Default: $JAX_COMPILATION_CACHE_DIR, else <qwenjax cache dir>/xla.")
REASONING_CONTENT = flags.DEFINE_bool("reasoning_content", True, "For a model whose chat template thinks (Qwen3): "
                                      "split each chat reply's <think> block into reasoning_content beside its "
                                      "content (tool calls are read from the content); off: the raw text.")
SPECULATIVE_METHOD = flags.DEFINE_enum("speculative_method", "none", ["none", "ngram", "draft"], "Speculative "
                                       "decoding: ngram proposes the tokens that followed the latest earlier "
                                       "occurrence of a sequence's last tokens in its prompt and output (prompt "
                                       "lookup); draft, the continuation of --draft_model (--draft_sampling). none: "
                                       "off.")
DRAFT_MODEL = flags.DEFINE_string("draft_model", None, "With --speculative_method=draft: a smaller model with the "
                                  "same tokenizer (a name or path, as --model), loaded in --dtype.")
DRAFT_SAMPLING = flags.DEFINE_enum("draft_sampling", "greedy", ["greedy", "sampled"], "With --draft_model, how "
                                   "the draft proposes for a sampling request: greedy (outputs equal plain "
                                   "decoding's, seed for seed) or sampled (drawn by the request's temperature and "
                                   "filters and weighed by rejection sampling: plain sampling's distribution, more "
                                   "proposals kept at high temperature).")
NUM_SPECULATIVE_TOKENS = flags.DEFINE_integer("num_speculative_tokens", 4, "Most tokens proposed per sequence and "
                                              "step (with --speculative_method).", lower_bound=1, upper_bound=16)
PROMPT_LOOKUP_MIN = flags.DEFINE_integer("prompt_lookup_min", 2, "Shortest n-gram --speculative_method=ngram "
                                         "matches.", lower_bound=1)
PROMPT_LOOKUP_MAX = flags.DEFINE_integer("prompt_lookup_max", 4, "Longest n-gram --speculative_method=ngram "
                                         "matches (tried first).", lower_bound=1)
SPECULATIVE_DISABLE_BATCH_SIZE = flags.DEFINE_integer(
    "speculative_disable_batch_size", 8, "No step speculates while more sequences than this decode together (0: "
    "never off); past it a step's extra rows cost more than its accepted tokens save.", lower_bound=0)
CPU_PATHS = _cli.define_cpu_paths_flag(
    "Matmul paths on CPU: 'auto' reads this processor's record (python -m launch.bench.cpu_paths writes it; the "
    "first run in a mode with no record probes that mode, a few minutes), 'default' keeps XLA's defaults, anything "
    "else is a record file. Default: $QWENJAX_CPU_PATHS, else auto. An XLA_FLAGS of your own always wins.")


@dataclasses.dataclass(frozen=True)
class Serving:
  """The mesh (None: one device), engine sizes and replica of this process."""

  mesh: object
  max_batch_size: int
  max_seq_len: int
  max_prefill_chunk: int
  replica: object  # qwenjax.parallel.distributed.Replica
  page_size: int | None = None  # the topology's planned pool, unless the flags name one
  kv_cache_memory: float | None = None

  def cache_kwargs(self) -> dict:
    """The Engine's KV cache and attention arguments: the flags, then the topology's plan, then the defaults."""
    return dict(attention_impl=None if ATTENTION_IMPL.value == "auto" else ATTENTION_IMPL.value,
                page_size=PAGE_SIZE.value or self.page_size,
                kv_cache_memory=KV_CACHE_MEMORY.value or self.kv_cache_memory,
                kv_cache_dtype=None if KV_CACHE_DTYPE.value == "auto" else KV_CACHE_DTYPE.value,
                prefix_caching=PREFIX_CACHING.value)


def load_kwargs() -> dict:
  """`qwenjax.load` / `Engine.load` arguments of the model flags (dtype and quantization)."""
  return dict(dtype=DTYPE.value, quantize=None if QUANTIZE.value == "none" else QUANTIZE.value,
              quantize_embeddings=QUANTIZE_EMBEDDINGS.value)


def lora_kwargs() -> dict:
  """The Engine's `lora` / `merge_lora` arguments of --lora and --merge_lora (InputError for a malformed entry)."""
  from qwenjax import InputError  # pylint: disable=g-import-not-at-top

  adapters = {}
  for entry in LORA.value:
    name, sep, path = entry.partition("=")
    if not sep or not name or not path:
      raise InputError(f"--lora={entry}: expected NAME=PATH (a name for requests to use, a PEFT adapter directory).")
    if name in adapters:
      raise InputError(f"--lora: the name {name!r} is given twice.")
    adapters[name] = path
  return dict(lora=adapters or None, merge_lora=MERGE_LORA.value)


def speculative_kwargs() -> dict:
  """The Engine's `speculative` argument of the speculative flags (ConfigError for a bad combination)."""
  from qwenjax import ConfigError  # pylint: disable=g-import-not-at-top

  if SPECULATIVE_METHOD.value == "none":
    if DRAFT_MODEL.value:
      raise ConfigError("--draft_model is the proposer of --speculative_method=draft; pass that too.")
    if DRAFT_SAMPLING.value != "greedy":
      raise ConfigError("--draft_sampling is how --speculative_method=draft's --draft_model proposes; pass those too.")
    return dict(speculative=None)
  from qwenjax.engine.speculative import SpeculativeConfig  # pylint: disable=g-import-not-at-top

  return dict(speculative=SpeculativeConfig(
      method=SPECULATIVE_METHOD.value, num_speculative_tokens=NUM_SPECULATIVE_TOKENS.value,
      prompt_lookup_min=PROMPT_LOOKUP_MIN.value, prompt_lookup_max=PROMPT_LOOKUP_MAX.value,
      disable_batch_size=SPECULATIVE_DISABLE_BATCH_SIZE.value, draft_model=DRAFT_MODEL.value,
      draft_sampling=DRAFT_SAMPLING.value))


def splits_reasoning(tokenizer) -> bool:
  """Whether chat replies are split into reasoning_content and content: --reasoning_content, for a model whose
  chat template knows thinking blocks."""
  from qwenjax.text import reasoning  # pylint: disable=g-import-not-at-top

  return REASONING_CONTENT.value and tokenizer is not None and reasoning.thinks(tokenizer.chat_template)


def sampling_params():
  """The default `qwenjax.SamplingParams` the sampling flags describe."""
  from qwenjax import SamplingParams  # pylint: disable=g-import-not-at-top

  return SamplingParams(
      max_tokens=MAX_NEW_TOKENS.value, temperature=TEMPERATURE.value, top_p=TOP_P.value, top_k=TOP_K.value,
      min_p=MIN_P.value, repetition_penalty=REPETITION_PENALTY.value, presence_penalty=PRESENCE_PENALTY.value,
      frequency_penalty=FREQUENCY_PENALTY.value, seed=SEED.value, stop=tuple(STOP.value), ignore_eos=IGNORE_EOS.value)


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache as the flags say (`qwenjax.engine.compilation_cache`); before any compile."""
  from qwenjax.engine import compilation_cache  # pylint: disable=g-import-not-at-top

  if not COMPILATION_CACHE.value:
    compilation_cache.disable()
    return
  try:
    path = compilation_cache.enable(COMPILATION_CACHE_DIR.value)
  except OSError as e:  # an unwritable place costs the rerun its compiles, never the run
    logging.warning("No compilation cache: %s", e)
    return
  logging.info("Compilation cache: %s", path)


def use_cpu_paths() -> None:
  """The matmul paths --cpu_paths names for the model's mode (--dtype, --quantize): `_cli.use_cpu_paths`; and malloc
  arenas capped at one per core (`profiling.limit_malloc_arenas`). Must run before jax starts its backend (the
  paths' XLA:CPU flags go in XLA_FLAGS, and the cap holds only for arenas made after it)."""
  from qwenjax.engine import profiling  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

  profiling.limit_malloc_arenas()
  _cli.use_cpu_paths(CPU_PATHS.value, cpu_paths.mode_of(DTYPE.value, QUANTIZE.value))


def log_compilation_cache() -> None:
  """One line: programs read back from the cache and compiled, when the cache is on."""
  from qwenjax.engine import compilation_cache  # pylint: disable=g-import-not-at-top

  counts = compilation_cache.counts()
  if counts is not None:
    logging.info("Compilation cache: %d programs read back, %d compiled.", counts["read_back"], counts["compiled"])


def initialize_distributed() -> bool:
  """Joins a multi-host run when the flags or the environment name one; must run before anything touches JAX's
  devices."""
  from qwenjax.parallel import distributed  # pylint: disable=g-import-not-at-top

  return distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)


def explicit(*names: str) -> frozenset[str]:
  """Which of these flags the command line set (they then win over a topology's planned values)."""
  return frozenset(n for n in names if flags.FLAGS[n].present)


def serving(model: str | None, *, max_batch_size: int, max_seq_len: int, max_prefill_chunk: int = 512,
            explicit_sizes: frozenset[str] = frozenset()) -> Serving:
  """--mesh or --topology, resolved for `model`. Sizes come from the topology's entry for the model unless named
  in `explicit_sizes`. QwenJaxError for a bad value or a model the topology lacks."""
  import math  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from qwenjax._errors import ConfigError  # pylint: disable=g-import-not-at-top
  from qwenjax.parallel import (
    distributed,  # pylint: disable=g-import-not-at-top
    sharding,  # pylint: disable=g-import-not-at-top
  )

  def build(mesh_text: str | None, *sizes, **pool) -> Serving:
    size = math.prod(sharding.parse_mesh(mesh_text).values()) if mesh_text else None
    group = distributed.replica(size)
    try:
      mesh = sharding.mesh_from_flags(mesh_text, group.devices) if mesh_text else None
    except ConfigError as e:
      raise ConfigError(f"--mesh={mesh_text}: {e}") from None
    return Serving(mesh, *sizes, group, **pool)

  if TOPOLOGY.value is None:
    return build(MESH.value, max_batch_size, max_seq_len, MAX_NUM_BATCHED_TOKENS.value or max_prefill_chunk)
  if MESH.value:
    raise ConfigError("--mesh and --topology both name a mesh; pass one.")
  from qwenjax.checkpoints import loader  # pylint: disable=g-import-not-at-top
  from qwenjax.engine import topologies  # pylint: disable=g-import-not-at-top

  topology = topologies.load_topology(TOPOLOGY.value)
  name, entry = topologies.serving_entry(topology, loader.read_config(model))
  data = entry.mesh.get("data", 1)
  model_parallel = entry.mesh.get("fsdp", 1) * entry.mesh.get("expert", 1) * entry.mesh.get("tensor", 1)
  local = jax.local_device_count()
  if local % model_parallel and model_parallel % local:
    raise ConfigError(f"{topology.source or topology.name}: {name} is planned with fsdp x expert x tensor = "
                      f"{model_parallel} devices per replica, which does not tile this host's {local} devices.")
  # The topology's data axis spans the slice: a replica takes the host's devices (several replicas' worth of
  # data parallelism) or, for a model larger than a host, fsdp x expert x tensor devices over several hosts; its decode
  # batch is its share of the slice's.
  replica_data = max(1, local // model_parallel)
  shape = dict(entry.mesh, data=replica_data)
  mesh_text = ",".join(f"{axis}:{n}" for axis, n in shape.items() if n > 1)
  if "max_batch_size" not in explicit_sizes:
    max_batch_size = max(1, entry.max_batch_size * replica_data // data)
  if "max_seq_len" not in explicit_sizes:
    max_seq_len = entry.max_seq_len
  return build(mesh_text or None, max_batch_size, max_seq_len, MAX_NUM_BATCHED_TOKENS.value or entry.max_prefill_chunk,
               page_size=entry.page_size, kv_cache_memory=entry.kv_cache_memory_gib)
