r"""Side-by-side benchmark: qwenjax against transformers and llama.cpp, each figure against the device's limits.

  python -m launch.benchmark                                       # the embedded model, batch 1, 8, 32
  python -m launch.benchmark --compare --output_dir=/tmp/bench     # + transformers and llama.cpp, same GGUF
  python -m launch.benchmark --preset=qwen2.5-1.5b --batch_sizes=1,8   # random weights of a preset size
  python -m launch.benchmark --compare --job --concurrency --output_dir=/tmp/bench   # + the batch job, 32K contexts
  python -m launch.benchmark --compare --job --quantize=none,int8,w8a8   # + int8 weights
  python -m launch.benchmark --profile --quantize=none,w8a8   # + where each engine's decode step spends its time

Every engine runs the same job: the same prompts (chat-formatted coding questions tokenized with the model's
tokenizer and cut to exactly --prompt_tokens tokens; random token ids for a random-weight --preset), greedy,
end-of-sequence ignored, --new_tokens generated per sequence. "qwenjax" is the Engine (a KV page pool of its
default size, packed prefill of several prompts per call). Each --quantize other than none adds an engine
"qwenjax-int8" / "qwenjax-w8a8" over the same weights quantized to int8 as they load
(`qwenjax.load(quantize=...)`; --quantize_embeddings: the embedding and head too); its weight_bytes are what it
holds (int8 values and float32 scales), and the decode fraction counts those bytes.
transformers runs on torch (CPU) with the same weights (the same GGUF, dequantized to --dtype) and batched
`generate`; llama.cpp (llama-cpp-python) runs the same GGUF file, quantized as it is, one sequence at a time (its
single-stream speed, batch 1 only).

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

Ratios ("ratios" in report.json): qwenjax over each other engine, per batch size and as the two targets (batch-1
decode, whole-job throughput at the largest batch).

--job, the batch job ("job"): --job_requests chat requests (launch/bench/workload.py's job_requests: coding
questions, 1 to 12 per request with openers, closers and code snippets, prompts of ~30 to ~400 tokens; max_tokens
drawn from 16..256; every fourth request with stop strings; end-of-sequence NOT ignored; greedy), written to
<output_dir>/job.jsonl and served first (before this process puts anything on the device, whose memory the
subprocesses then find free), one engine after another, by
  qwenjax                       `python -m launch.batch_generate`, --job_slots slots, --max_seq_len the longest
                                prompt plus the largest max_tokens (rounded up to 128); again per --quantize;
  llamacpp                      `python -m launch.bench.llamacpp_job`: llama.cpp on the same GGUF file, one request
                                at a time, the prompt tokens qwenjax's tokenizer made (chat template applied), the
                                same max_tokens and stop strings, greedy; skipped, with the reason, when
                                llama-cpp-python is not installed or the model is not a GGUF file.
Per engine:
  wall_s                  the whole subprocess, start to exit: Python and JAX starting, load, compile, serve
  generated_tokens        completion tokens summed over the answered requests (each engine stops where its own
                          greedy completion ends, so these differ between engines)
  generated_tokens_per_s  generated_tokens / wall_s
  finish_reasons, errors  counts of "stop" / "length", and of requests answered with an error record
  stats                   the engine's counters (Engine.stats(): peak_sequences, preemptions, ...) from
                          batch_generate's "Engine stats: {...}" log line; null when it logs none
identical_completions_with_qwenjax: per engine, the fraction of requests whose completion text equals
qwenjax's exactly. ratios["job"]: paged_speedup_over_llamacpp, llama.cpp's wall_s over qwenjax's (the same
requests; above 1: qwenjax finishes first), and per --quantize,
<q>_speedup_over_llamacpp and <q>_speedup_over_float. Each subprocess's peak_rss_gib is its peak resident memory
(os.wait4's ru_maxrss). ratios["quantized"]: per quantized engine, weight_bytes over the float engine's and over
bfloat16's (the float weights at 2 bytes each), and its decode and throughput over float qwenjax's per batch size.

--concurrency ("concurrency"): how many sequences --concurrency_kv_memory GiB of KV cache keeps decoding at once at
--concurrency_seq_len positions. contiguous_sequences is computed, for comparison: what a cache of one
max_seq_len row per slot (the engine before the page pool) would hold, the budget over one slot's row, rounded
down, L layers x 2 x K KV heads x H head dim x itemsize (of --dtype) x (seq_len + 512, the prefill chunk's
headroom) bytes. The paged figure is measured: an Engine with --concurrency_max_batch_size slots and a page pool
of the budget serves the batch job's first --concurrency_requests prompts, --concurrency_new_tokens tokens each
(end-of-sequence ignored); peak_sequences is its stats["peak_sequences"], limited_by says what bounded it
(pages, slots or the requests there were), pool_holds_sequences_of_this_job is the pool's pages over the mean
pages a request takes. ratios["concurrency"]["paged_over_contiguous"]: peak_sequences / contiguous_sequences.

--prefix ("prefix"): --prefix_requests chat requests sharing a system message of ~--prefix_tokens tokens, a
question each, --prefix_new_tokens greedy tokens (end-of-sequence ignored), --job_slots slots, served by a paged
engine with prefix caching and by one without, one after the other: seconds, prompt tokens computed and read
from cached pages, against the job's unique prompt tokens, and whether the completions are identical.

stdout holds a table and the ratios; --output_dir gets report.json (every figure, the limits, versions, machine)
and tokens_per_s.png (tokens/s against batch size, one line per engine; beside it, when measured, the batch job's
whole-process seconds and the concurrency bars). The batch job's inputs, outputs and logs land there too
(job*.jsonl, job_*.log). Logs go to stderr.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app, flags, logging

from launch import _cli
from launch.bench import adapters, concurrency, costs, decode_profile, job, prefix, probes, serve, speculative, workload
from launch.bench.measure import add_fractions, agreement, measure, peak_rss_gib, positive_integers
from launch.bench.report import compute_ratios, format_table, machine, plot, round_figures, versions

_MODEL = flags.DEFINE_string("model", "default", "'default' (the embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf "
                             "file, or a Hugging Face checkpoint directory.")
_PRESET = flags.DEFINE_string("preset", None, "Instead of --model: random weights of a qwenjax.PRESETS size "
                              f"(e.g. qwen2.5-0.5b), or '{workload.TINY}' for a smoke test. Prompts are random token "
                              "ids.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and weight dtype (also "
                           "transformers').")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes to measure.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 64, "Tokens in every prompt.", lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence.", lower_bound=2)
_COMPARE = flags.DEFINE_bool("compare", False, "Also run the engines of --compare_with on the same job.")
_COMPARE_WITH = flags.DEFINE_list("compare_with", list(adapters.ENGINES), "Engines to compare with under --compare: "
                                  f"{', '.join(adapters.ENGINES)}.")
_SCAN_LAYERS = flags.DEFINE_enum("scan_layers", "auto", ["auto", "true", "false"],
                                 "Scanned (stacked) or unrolled layers; auto: unrolled on CPU only.")
_JOB = flags.DEFINE_bool("job", False, "Also serve the batch job (--job_requests mixed chat requests) whole-process "
                         "with launch.batch_generate, and with llama.cpp when it can run.")
_JOB_REQUESTS = flags.DEFINE_integer("job_requests", 128, "Requests in the batch job.", lower_bound=1)
_JOB_SLOTS = flags.DEFINE_integer("job_slots", 32, "batch_generate's --max_batch_size in the batch job.",
                                  lower_bound=1)
_CONCURRENCY = flags.DEFINE_bool("concurrency", False, "Also measure how many sequences --concurrency_kv_memory of "
                                 "KV cache keeps decoding at once at --concurrency_seq_len, against one row per slot.")
_CONCURRENCY_KV_MEMORY = flags.DEFINE_float("concurrency_kv_memory", 4.0, "The KV cache budget, GiB.",
                                            lower_bound=1e-6)
_CONCURRENCY_SEQ_LEN = flags.DEFINE_integer("concurrency_seq_len", 32768, "The engines' max_seq_len there.",
                                            lower_bound=1)
_CONCURRENCY_SLOTS = flags.DEFINE_integer("concurrency_max_batch_size", 256, "The engine's decode slots there.",
                                          lower_bound=1)
_CONCURRENCY_REQUESTS = flags.DEFINE_integer("concurrency_requests", 128, "Requests served there: the batch job's "
                                             "first ones (the same prompts).", lower_bound=1)
_CONCURRENCY_NEW_TOKENS = flags.DEFINE_integer("concurrency_new_tokens", 8, "Tokens generated per request there "
                                               "(end-of-sequence ignored).", lower_bound=2)
_PREFIX = flags.DEFINE_bool("prefix", False, "Also serve a job of --prefix_requests requests sharing a "
                            "--prefix_tokens header with prefix caching on and off (launch/bench/prefix.py).")
_PREFIX_REQUESTS = flags.DEFINE_integer("prefix_requests", 64, "Requests in the shared-prefix job.", lower_bound=1)
_PREFIX_TOKENS = flags.DEFINE_integer("prefix_tokens", 1500, "Tokens of their shared header.", lower_bound=1)
_PREFIX_NEW_TOKENS = flags.DEFINE_integer("prefix_new_tokens", 16, "Tokens generated per request there.",
                                          lower_bound=1)
_QUANTIZE = flags.DEFINE_list("quantize", ["none"], "Weights of the qwenjax engines: none (--dtype), int8 (w8a16), "
                               "w8a8; each one besides none is one more engine, and one more batch job run.")
_QUANTIZE_EMBEDDINGS = flags.DEFINE_bool("quantize_embeddings", False, "The quantized engines' embedding and head "
                                         "in int8 too.")
_CPU_PATHS = _cli.define_cpu_paths_flag(
    "The qwenjax engines' matmul paths on CPU, as launch.generate's --cpu_paths: 'auto' (this processor's record, "
    "probed on first use), 'default' (XLA's), or a record file. With a record, each qwenjax engine also runs on "
    "XLA's default paths ('qwenjax-default-paths', 'qwenjax-int8-default-paths') and the report holds the record's "
    "table and choices.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Also serve input-grounded code edits and open-ended chat "
                                  "at --batch_sizes with plain decoding and n-gram speculation, and llama.cpp's "
                                  "single stream on the code (launch/bench/speculative.py), for the float model and "
                                  "each --quantize mode.")
_SPECULATIVE_NEW_TOKENS = flags.DEFINE_integer("speculative_new_tokens", 256, "Most tokens per request there.",
                                               lower_bound=1)
_SPECULATIVE_K = flags.DEFINE_integer("speculative_k", 4, "num_speculative_tokens there.", lower_bound=1)
_SERVE = flags.DEFINE_bool("serve", False, "Also serve through launch.serve's app over loopback with the openai "
                          "client: 8 requests one after another and at once, the time to first token idle and under "
                          "16 streams, and --serve_requests requests from --serve_clients clients against the same "
                          "as a batch job (launch/bench/serve.py), for the float model.")
_SERVE_REQUESTS = flags.DEFINE_integer("serve_requests", 128, "Requests of the server's load test.", lower_bound=4)
_SERVE_CLIENTS = flags.DEFINE_integer("serve_clients", 16, "Concurrent clients of the server's load test.",
                                      lower_bound=1)
_SERVE_MAX_BATCH_SIZE = flags.DEFINE_integer("serve_max_batch_size", 16, "The served engine's decode slots.",
                                             lower_bound=1)
_PROFILE = flags.DEFINE_bool("profile", False, "Also profile each qwenjax engine's decode step at --batch_sizes "
                              "(launch.bench.decode_profile, a process per engine): the time of each part of the "
                              "model, and each projection's weight bytes over it against the measured bandwidth.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", os.path.join(tempfile.gettempdir(), "qwenjax-benchmark"),
                                  "Where report.json and tokens_per_s.png go.")


def _known_preset(name: str | None) -> bool:
  from qwenjax.config import PRESETS  # pylint: disable=g-import-not-at-top  (--help stays fast)

  if name is None or name == workload.TINY or name in PRESETS:
    return True
  raise flags.ValidationError(f"expected one of {', '.join(sorted(PRESETS) + [workload.TINY])}")


flags.register_validator("batch_sizes", positive_integers, "expected positive integers, e.g. 1,8,32")
flags.register_validator("compare_with", lambda engines: set(engines) <= set(adapters.ENGINES),
                         f"expected engines among {', '.join(adapters.ENGINES)}")
flags.register_validator("preset", _known_preset)
flags.register_validator("quantize", lambda qs: bool(qs) and set(qs) <= {"none", "int8", "w8a8"},
                         "expected values among none, int8, w8a8")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.config import DTYPES, default_scan_layers  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

  batches = sorted({int(b) for b in _BATCH_SIZES.value})
  try:  # before jax starts its backend: the chosen XLA:CPU flags go in XLA_FLAGS
    path_record = _cli.use_cpu_paths(_CPU_PATHS.value, cpu_paths.float_mode(_DTYPE.value))
  except qwenjax.QwenJaxError as e:
    _cli.fail(e)
  os.environ[_cli.CPU_PATHS_ENV] = _CPU_PATHS.value  # the batch job's launch scripts take the same
  preset = _PRESET.value
  if preset is not None and flags.FLAGS["model"].present:
    _cli.fail("--model and --preset both name a model; pass one")
  if preset is not None and (_JOB.value or _CONCURRENCY.value):
    _cli.fail(f"--{'job' if _JOB.value else 'concurrency'} serves chat requests with a checkpoint and its tokenizer: "
              "pass --model, not --preset")
  quantized = [q for q in dict.fromkeys(_QUANTIZE.value) if q != "none"]
  n_prompt, n_new, dtype = _PROMPT_TOKENS.value, _NEW_TOKENS.value, _DTYPE.value
  compare_with = list(dict.fromkeys(_COMPARE_WITH.value)) if _COMPARE.value else []
  out_dir = pathlib.Path(_OUTPUT_DIR.value)
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    _cli.fail(f"--output_dir={out_dir}: cannot create the directory ({e.strerror})")
  scan = {"auto": default_scan_layers(), "true": True, "false": False}[_SCAN_LAYERS.value]
  wall_start = time.perf_counter()
  load_before = os.getloadavg()[0]  # other processes on the machine skew every figure: recorded

  sections = {}
  if _JOB.value:  # first, before this process takes device memory: the subprocesses find it free
    logging.info("The batch job: %d requests, %d slots.", _JOB_REQUESTS.value, _JOB_SLOTS.value)
    try:
      job_source, job_tokenizer = job.model_tokenizer(_MODEL.value)
      files = job.prepare(out_dir, workload.job_requests(_JOB_REQUESTS.value), job_tokenizer)
    except qwenjax.QwenJaxError as e:
      _cli.fail(e)
    except OSError as e:
      _cli.fail(f"--output_dir={out_dir}: cannot write the batch job's input ({e.strerror})")
    sections["job"] = job.serve(files, job_source, slots=_JOB_SLOTS.value, dtype=dtype,
                                quantize=quantized, quantize_embeddings=_QUANTIZE_EMBEDDINGS.value)
    del job_tokenizer

  if _PROFILE.value:  # in processes of their own, like the job, before this one takes memory
    if preset not in (None, workload.TINY):
      sections["decode_profile"] = {"skipped": f"--preset={preset}: profiles run --model or --preset=tiny"}
    else:
      sections["decode_profile"] = decode_profile.run(
          out_dir, model=_MODEL.value, preset=preset, dtype=dtype, quantize=quantized,
          quantize_embeddings=_QUANTIZE_EMBEDDINGS.value, batch_sizes=batches, prompt_tokens=n_prompt,
          new_tokens=n_new)

  logging.info("Probing the device's limits.")
  probe_runs = [probes.probe_device(dtype)]

  start = time.perf_counter()
  if preset is None:
    try:
      loaded = qwenjax.load(_MODEL.value, dtype=dtype, scan_layers=scan)
      prompts = workload.chat_prompts(loaded.tokenizer, max(batches), n_prompt)
    except qwenjax.QwenJaxError as e:
      _cli.fail(e)
    model, tokenizer, source, model_name = loaded.model, loaded.tokenizer, loaded.source, _MODEL.value
    if model_name in ("", "default"):
      model_name = pathlib.Path(source).name
    prompt_kind = f"chat: {workload.SYSTEM_MESSAGE!r} + coding questions cut to {n_prompt} tokens"
  else:
    cfg = workload.tiny_config() if preset == workload.TINY else qwenjax.PRESETS[preset]
    model = qwenjax.Qwen2(cfg, rngs=nnx.Rngs(0), dtype=DTYPES[dtype], param_dtype=DTYPES[dtype],
                          scan_layers=scan)
    tokenizer, source, model_name = None, None, f"{preset} (random weights)"
    prompts = workload.random_prompts(cfg.vocab_size, max(batches), n_prompt)
    prompt_kind = f"random token ids, {n_prompt} per prompt"
  cfg = model.cfg
  load_s = time.perf_counter() - start
  max_seq_len = -(-(n_prompt + n_new) // 128) * 128
  param_bytes = np.dtype(DTYPES[dtype]).itemsize
  float_costs = costs.model_costs(cfg, costs.streamed_params(cfg) * param_bytes, param_bytes)

  engines: dict[str, dict] = {}
  # With a record, each engine on XLA's default paths too, side by side ("-default-paths").
  variants = [(q, chosen) for q in [None, *quantized] for chosen in ((True, False) if path_record else (True,))]
  for quantize, chosen_paths in variants:
    name = "qwenjax" + (f"-{quantize}" if quantize else "") + ("" if chosen_paths else "-default-paths")
    jax.clear_caches()  # programs traced on other paths must not be reused
    paths_scope = contextlib.nullcontext() if chosen_paths else cpu_paths.using()
    with paths_scope:
      run_model, run_costs, run_load_s = model, float_costs, load_s
      if quantize:
        start = time.perf_counter()
        try:
          run_model = _quantized_model(model, quantize, _QUANTIZE_EMBEDDINGS.value, source, dtype, scan)
        except qwenjax.QwenJaxError as e:
          _cli.fail(e)
        run_load_s = time.perf_counter() - start
        run_costs = costs.model_costs(cfg, costs.streamed_bytes(run_model), param_bytes)
      generate = adapters.qwenjax_generate_fn(run_model, tokenizer, max_seq_len=max_seq_len)
      engines[name] = {"load_s": run_load_s, "quantize": quantize or "none",
                       "weight_bytes": costs.weight_bytes(run_model), "scan_layers": run_model.scan_layers,
                       "max_seq_len": max_seq_len,
                       "runs": [measure(name, generate, prompts[:b], n_new, run_costs, compiles=True)
                                for b in batches],
                       "peak_host_memory_gib": peak_rss_gib()}
    del generate, run_model
    gc.collect()
  reference = engines["qwenjax"]["runs"][0]["_tokens"][0]

  for engine in compare_with:
    if engine == "transformers":
      engines[engine] = adapters.run_transformers(source, model, dtype, tokenizer, prompts, batches, n_new, float_costs)
    elif engine == "llamacpp":
      engines[engine] = adapters.run_llamacpp(source, cfg, prompts, n_prompt, n_new)
    gc.collect()

  if _CONCURRENCY.value:
    logging.info("Concurrency at %d positions.", _CONCURRENCY_SEQ_LEN.value)
    try:
      sections["concurrency"] = concurrency.measure(
          model, tokenizer, workload.job_requests(_CONCURRENCY_REQUESTS.value),
          memory_gib=_CONCURRENCY_KV_MEMORY.value, max_seq_len=_CONCURRENCY_SEQ_LEN.value,
          max_batch_size=_CONCURRENCY_SLOTS.value, new_tokens=_CONCURRENCY_NEW_TOKENS.value)
    except qwenjax.QwenJaxError as e:
      _cli.fail(f"--concurrency (--concurrency_kv_memory={_CONCURRENCY_KV_MEMORY.value:g}, --concurrency_seq_len="
                f"{_CONCURRENCY_SEQ_LEN.value}): {e}")
    gc.collect()

  if _PREFIX.value:
    if tokenizer is None:
      _cli.fail("--prefix serves chat requests: pass --model, not --preset")
    sections["prefix"] = prefix.measure(model, tokenizer, count=_PREFIX_REQUESTS.value,
                                        header_tokens=_PREFIX_TOKENS.value, new_tokens=_PREFIX_NEW_TOKENS.value,
                                        max_batch_size=_JOB_SLOTS.value)
    gc.collect()

  if _SPECULATIVE.value:
    if tokenizer is None:
      _cli.fail("--speculative serves chat requests: pass --model, not --preset")
    spec_models = {"qwenjax": model}
    for quantize in quantized:
      spec_models[f"qwenjax-{quantize}"] = _quantized_model(model, quantize, _QUANTIZE_EMBEDDINGS.value, source, dtype,
                                                            scan)
    sections["speculative"] = speculative.measure(spec_models, tokenizer, batch_sizes=batches,
                                                  new_tokens=_SPECULATIVE_NEW_TOKENS.value,
                                                  num_speculative_tokens=_SPECULATIVE_K.value, source=source)
    del spec_models
    gc.collect()

  if _SERVE.value:
    if tokenizer is None:
      _cli.fail("--serve serves chat requests: pass --model, not --preset")
    sections["serve"] = {"qwenjax": serve.measure(model, tokenizer, max_batch_size=_SERVE_MAX_BATCH_SIZE.value,
                                                  load_requests=_SERVE_REQUESTS.value,
                                                  clients=_SERVE_CLIENTS.value)}
    gc.collect()

  logging.info("Probing the device's limits again.")
  probe_runs.append(probes.probe_device(dtype))
  limits = probes.device_limits(dtype, probe_runs)
  for engine in engines.values():
    for r in engine.get("runs", []):
      r["greedy_agreement_with_qwenjax"] = agreement(r.pop("_tokens")[0], reference)
      add_fractions(r, limits)

  report = {
      "benchmark": {"model_name": model_name, "source": source, "preset": preset, "dtype": dtype,
                    "prompt_tokens": n_prompt, "new_tokens": n_new, "batch_sizes": batches, "prompts": prompt_kind,
                    "decoding": "greedy, end-of-sequence ignored", "params": cfg.num_params()},
      "machine": dict(machine(), load_average_1min_at_start=load_before),
      "versions": versions(),
      "device_limits": limits,
      "model_costs": {
          "float_weight_bytes_per_decode_step": float_costs.weight_bytes_per_step,
          "float_kv_bytes_per_position": float_costs.kv_bytes_per_token,
          "prefill_flops_per_prompt": float_costs.prefill_flops(1, n_prompt),
          "counting": "decode: weights streamed per step (all but the embedding table; a tied one counts once, as "
                      "the head) + KV cache at the mean decode context T + n/2; prefill: 2 FLOPs per matmul weight "
                      "per token, the head at each prompt's last token, causal attention"},
      "engines": engines,
      **({"cpu_paths": {"processor": path_record.get("processor"), "configs": path_record.get("configs"),
                        "chosen": cpu_paths.describe_choices(path_record).splitlines(),
                        "table": cpu_paths.format_table(path_record).splitlines()}} if path_record else {}),
      **sections,
      "ratios": compute_ratios(engines, batches, sections.get("job"), sections.get("concurrency"), dtype=dtype),
      "peak_host_memory_gib": peak_rss_gib(),
      "wall_s": time.perf_counter() - wall_start,
  }
  report = round_figures(report)
  (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  plot(report, out_dir / "tokens_per_s.png")
  print(format_table(report))
  if "speculative" in report:
    print(speculative.format_table(report["speculative"]))
  if "serve" in report:
    print(serve.format_table(report["serve"]))
  if "decode_profile" in report and "skipped" not in report["decode_profile"]:
    print(decode_profile.format_profiles(report["decode_profile"]))
  print(f"report: {out_dir / 'report.json'}  plot: {out_dir / 'tokens_per_s.png'}")
  sys.stdout.flush()


def _quantized_model(model, quantize: str, embeddings: bool, source: str | None, dtype: str, scan: bool):
  """The benchmark's model with int8 weights: loaded again from `source` (quantized one tensor at a time), or, for a
  random-weight preset (no source), built again from the same seed with `quantize` (the same random draws,
  quantized as they are made)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.config import DTYPES  # pylint: disable=g-import-not-at-top

  if source is not None:
    return qwenjax.load(source, dtype=dtype, scan_layers=scan, quantize=quantize,
                        quantize_embeddings=embeddings).model
  return qwenjax.Qwen2(model.cfg, rngs=nnx.Rngs(0), dtype=DTYPES[dtype], param_dtype=DTYPES[dtype], scan_layers=scan,
                       quantize=quantize, quantize_embeddings=embeddings)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
