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

import gc
import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app, flags, logging

from launch import _cli
from launch.bench import adapters, costs, probes, workload
from launch.bench.measure import add_fractions, agreement, measure, peak_rss_gib
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
_OUTPUT_DIR = flags.DEFINE_string("output_dir", os.path.join(tempfile.gettempdir(), "qwenjax-benchmark"),
                                  "Where report.json and tokens_per_s.png go.")


def _positive_integers(values: list[str]) -> bool:
  try:
    return bool(values) and all(int(v) >= 1 for v in values)
  except ValueError:
    return False


def _known_preset(name: str | None) -> bool:
  from qwenjax.config import PRESETS  # pylint: disable=g-import-not-at-top  (--help stays fast)

  if name is None or name == workload.TINY or name in PRESETS:
    return True
  raise flags.ValidationError(f"expected one of {', '.join(sorted(PRESETS) + [workload.TINY])}")


flags.register_validator("batch_sizes", _positive_integers, "expected positive integers, e.g. 1,8,32")
flags.register_validator("compare_with", lambda engines: set(engines) <= set(adapters.ENGINES),
                         f"expected engines among {', '.join(adapters.ENGINES)}")
flags.register_validator("preset", _known_preset)


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.config import DTYPES, default_scan_layers  # pylint: disable=g-import-not-at-top

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
  scan = {"auto": default_scan_layers(), "true": True, "false": False}[_SCAN_LAYERS.value]
  wall_start = time.perf_counter()
  load_before = os.getloadavg()[0]  # other processes on the machine skew every figure: recorded

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
  generate = adapters.qwenjax_generate_fn(model, tokenizer, max_seq_len=max_seq_len)
  engines["qwenjax"] = {"load_s": load_s, "scan_layers": model.scan_layers, "max_seq_len": max_seq_len,
                        "runs": [measure("qwenjax", generate, prompts[:b], n_new, float_costs, compiles=True)
                                 for b in batches],
                        "peak_host_memory_gib": peak_rss_gib()}
  reference = engines["qwenjax"]["runs"][0]["_tokens"][0]
  del generate
  gc.collect()

  for engine in compare_with:
    if engine == "transformers":
      engines[engine] = adapters.run_transformers(source, model, dtype, tokenizer, prompts, batches, n_new, float_costs)
    elif engine == "llamacpp":
      engines[engine] = adapters.run_llamacpp(source, cfg, prompts, n_prompt, n_new)
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
      "ratios": compute_ratios(engines, batches),
      "peak_host_memory_gib": peak_rss_gib(),
      "wall_s": time.perf_counter() - wall_start,
  }
  report = round_figures(report)
  (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  plot(report, out_dir / "tokens_per_s.png")
  print(format_table(report))
  print(f"report: {out_dir / 'report.json'}  plot: {out_dir / 'tokens_per_s.png'}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
