r"""The prepared device check: every Pallas kernel against its XLA reference and the memory roofline, at
Qwen2.5-7B's shapes, plus batch-1 decode of a 7B-shaped model in bfloat16 against int8 weights.

  python -m launch.bench.kernels --output=kernels.json        # on a GPU (an H200) or a TPU: the real shapes
  python -m launch.bench.kernels --smoke                      # tiny shapes, Pallas interpret mode (CPU; a test)

Per case: the kernel's and the reference's seconds (best of --repeats after a warm-up, which compiles), their
ratio, the bytes the op must move at least (weights or KV pages read once, activations in and out) and that over
the kernel's time as a fraction of the device's memory bandwidth (an H200's 4.8 TB/s looked up; elsewhere the
bandwidth `launch.bench.probes` measures), and the largest difference from the reference (the correctness check
on the real backend). The decode case times `qwenjax.engine.programs.decode_step` of a random-weight
Qwen2.5-7B (bfloat16 weights against `quantize="int8"`, w8a16, each with its XLA matmuls and with the Pallas
kernel) at batch 1: the issue's bar is int8 >= 1.6x bfloat16.

Cases (7B: 28 query heads, 4 KV heads, head dim 128, hidden 3584, MLP 18944, vocabulary 152064; the vision
tower's 16 heads of 80):
  rpa_decode       ragged paged attention, 32 decode rows over 2,048 cached tokens each (pages of 16)
  rpa_decode_int8  the same over int8 pages
  rpa_mixed        4 prefill chunks of 256 tokens (over 1,024 cached) and 28 decode rows in one call
  segment_attn     the vision tower's window attention: 4,096 patches in windows of 64
  w8a16_{up,down,lm_head}_m{1,32}, w8a8_... int8 matmuls: the Pallas kernel against XLA's own int8 formulation
                   (`int8_matmul(impl="xla")`) and against the bfloat16 matmul of the same weight
  gmm_{decode,prefill}  the MoE grouped matmul (`grouped_matmul(impl="pallas")`: the Mosaic kernel on TPU, the
                   generic one on GPU) against `jax.lax.ragged_dot`, at Qwen3-30B-A3B's gate projection (128
                   experts of 2048 x 768, top 8): one decode token's 8 assignments, and 512 prefill tokens' 4,096
                   routed at random (bytes: only the chosen experts' weights)
  spec_7b_batch1_{plain,draft}  speculative decoding's step cost: a 7B-shaped target's verify step with a
                   0.5B-shaped draft (k = 4) against its plain decode step, batch 1, random weights
stdout: one JSON object {"device", "jax", "cases": [...]} (also written to --output).
"""

from __future__ import annotations

import json
import math
import time

from absl import app, flags, logging

from launch import _cli

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes in float32 (Pallas interpret mode on CPU): checks that every "
                           "case runs and matches its reference, times nothing meaningful.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per kernel (the best counts).", lower_bound=1)
_CASES = flags.DEFINE_list("cases", [], "Only these cases (prefixes of their names); default all.")
_DECODE = flags.DEFINE_bool("decode", True, "Also time 7B batch-1 decode, bfloat16 vs int8 weights.")
_SPECULATIVE = flags.DEFINE_bool("speculative", True, "Also time a 7B-shaped target's verify step with a "
                                  "0.5B-shaped draft against its plain decode step, batch 1.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON report here.")

H200_BYTES_PER_S = 4.8e12


def _best(fn, repeats: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top

  jax.block_until_ready(fn())  # warm-up: compiles
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def _shapes(smoke: bool) -> dict:
  if smoke:
    return dict(n=8, k=2, h=16, hidden=64, mlp=96, vocab=160, seqs=4, ctx=40, page=16, chunk=24, patches=128,
                window=32, vn=2, vh=16, rows=(1, 3), experts=8, top_k=2, moe_hidden=64, moe_mlp=32, moe_tokens=24)
  return dict(n=28, k=4, h=128, hidden=3584, mlp=18944, vocab=152064, seqs=32, ctx=2048, page=16, chunk=256,
              patches=4096, window=64, vn=16, vh=80, rows=(1, 32), experts=128, top_k=8, moe_hidden=2048,
              moe_mlp=768, moe_tokens=512)


def _paged_case(s, dtype, *, int8: bool, mixed: bool):
  """(kernel fn, reference fn, bytes moved) of one ragged paged attention call."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from qwenjax.kernels.paged_attention import quantize_kv, ragged_paged_attention_reference  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels.ragged_paged_attention import ragged_paged_attention  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu  # pylint: disable=g-import-not-at-top

  seqs, ctx, page = s["seqs"], s["ctx"], s["page"]
  prefills = min(4, seqs // 2) if mixed else 0
  q_lens = [s["chunk"]] * prefills + [1] * (seqs - prefills)
  kv_lens = [ctx // 2 + s["chunk"]] * prefills + [ctx] * (seqs - prefills)
  pages_per_seq = -(-max(kv_lens) // page)
  num_pages = seqs * pages_per_seq
  keys = jax.random.split(jax.random.key(0), 3)
  t = sum(q_lens)
  q = jax.random.normal(keys[0], (t, s["n"], s["h"]), jnp.float32).astype(dtype)
  k_pages = jax.random.normal(keys[1], (num_pages, page, s["k"], s["h"]), jnp.float32).astype(dtype)
  v_pages = jax.random.normal(keys[2], (num_pages, page, s["k"], s["h"]), jnp.float32).astype(dtype)
  k_scale = v_scale = None
  if int8:
    (k_pages, k_scale), (v_pages, v_scale) = quantize_kv(k_pages.astype(jnp.float32)), quantize_kv(
        v_pages.astype(jnp.float32))
  table = jnp.asarray(jax.random.permutation(keys[0], num_pages).reshape(seqs, pages_per_seq), jnp.int32)
  cu = jnp.asarray([0, *jnp.cumsum(jnp.asarray(q_lens)).tolist()], jnp.int32)
  lens = jnp.asarray(kv_lens, jnp.int32)
  args = (q, k_pages, v_pages, lens, table, cu, seqs)
  kw = dict(k_scale=k_scale, v_scale=v_scale)
  ragged = ragged_paged_attention_tpu if jax.default_backend() == "tpu" else ragged_paged_attention
  kernel = jax.jit(lambda *a: ragged(*a, **kw), static_argnums=6)
  reference = jax.jit(lambda *a: ragged_paged_attention_reference(*a, **kw), static_argnums=6)
  item = jnp.dtype(k_pages.dtype).itemsize
  scale_bytes = 4 if int8 else 0
  moved = sum(kv_lens) * s["k"] * (s["h"] * item + scale_bytes) * 2 + 2 * q.size * q.dtype.itemsize
  return (lambda: kernel(*args)), (lambda: reference(*args)), moved


def _segment_case(s, dtype):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from qwenjax.kernels.attention import vision_attention_reference  # pylint: disable=g-import-not-at-top
  from qwenjax.kernels.segment_attention import segment_attention  # pylint: disable=g-import-not-at-top

  p = s["patches"]
  q, k, v = (jax.random.normal(key, (p, s["vn"], s["vh"]), jnp.float32).astype(dtype)
             for key in jax.random.split(jax.random.key(1), 3))
  segments = jnp.arange(p, dtype=jnp.int32) // s["window"]
  kernel = jax.jit(segment_attention)
  reference = jax.jit(lambda *a: vision_attention_reference(*a, block_q=min(64, p), kv_span=s["window"]))
  return (lambda: kernel(q, k, v, segments)), (lambda: reference(q, k, v, segments)), 4 * q.size * q.dtype.itemsize


def _matmul_case(s, dtype, mode: str, shape: str, m: int):
  """(Pallas kernel, XLA int8 formulation, float matmul, bytes): x [m, K] by the int8 weight of `shape`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from qwenjax.kernels.int8_matmul import int8_matmul, quantize_per_channel  # pylint: disable=g-import-not-at-top

  k, n, transpose = {"up": (s["hidden"], s["mlp"], False), "down": (s["mlp"], s["hidden"], False),
                     "lm_head": (s["hidden"], s["vocab"], True)}[shape]
  kx, kw = jax.random.split(jax.random.key(2))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (n, k) if transpose else (k, n), jnp.float32) * 0.02
  values, scale = quantize_per_channel(w, 1 if transpose else 0)
  dense = w.astype(dtype)
  del w
  call = lambda impl: jax.jit(lambda x_: int8_matmul(x_, values, scale, mode=mode, impl=impl, transpose_rhs=transpose,
                                                     out_dtype=dtype))
  kernel, xla = call("pallas"), call("xla")
  float_mm = jax.jit(lambda x_: (x_ @ (dense.T if transpose else dense)).astype(dtype))
  moved = k * n + 4 * n + 2 * m * (k + n) * jnp.dtype(dtype).itemsize
  return (lambda: kernel(x)), (lambda: xla(x)), (lambda: float_mm(x)), moved


def _grouped_case(s, dtype, tokens: int):
  """(Pallas grouped matmul, ragged_dot, bytes): `tokens` tokens' top-k assignments, routed at random, sorted by
  expert, times the experts' [hidden, moe_mlp] gate weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from qwenjax.kernels.grouped_matmul import grouped_matmul  # pylint: disable=g-import-not-at-top

  e, k, n = s["experts"], s["moe_hidden"], s["moe_mlp"]
  rng = np.random.default_rng(3)
  chosen = np.stack([rng.choice(e, s["top_k"], replace=False) for _ in range(tokens)])  # [tokens, top_k]
  sizes = jnp.asarray(np.bincount(chosen.reshape(-1), minlength=e), jnp.int32)  # [E]
  kx, kw = jax.random.split(jax.random.key(4))
  x = jax.random.normal(kx, (chosen.size, k), jnp.float32).astype(dtype)  # [A, K], sorted by expert
  w = (jax.random.normal(kw, (e, k, n), jnp.float32) * 0.02).astype(dtype)  # [E, K, N]
  call = lambda impl: jax.jit(lambda x_: grouped_matmul(x_, w, sizes, impl=impl))
  kernel, reference = call("pallas"), call("xla")
  moved = (len(np.unique(chosen)) * k * n + chosen.size * (k + n)) * jnp.dtype(dtype).itemsize
  return (lambda: kernel(x)), (lambda: reference(x)), moved


def _decode_case(smoke: bool, repeats: int) -> list[dict]:
  """Batch-1 decode of a random 7B-shaped model through the engine (paged cache), bfloat16 weights against int8
  (w8a16) ones, each with attention_impl xla and pallas (which also picks the int8 matmul kernel): seconds per
  token from the difference of a 65-token and a 1-token generation (prefill and first token cancel out), each the
  best of `repeats` runs, interleaved so that a slow spell of the machine hits both lengths alike."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from qwenjax import PRESETS, Engine, QwenConfig, SamplingParams  # pylint: disable=g-import-not-at-top
  from qwenjax.model.decoder import Qwen2  # pylint: disable=g-import-not-at-top

  cfg, dtype, n = PRESETS["qwen2.5-7b"], jnp.bfloat16, 64
  if smoke:
    cfg = QwenConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=2,
                     head_dim=16)
    dtype, n = jnp.float32, 16  # 16 steps of a tiny model stay well above the timer's noise on a loaded CPU
  results, base = [], None
  for label, quantize in (("float", None), ("int8", "int8")):
    model = Qwen2(cfg, dtype=dtype, param_dtype=dtype, scan_layers=True, quantize=quantize, rngs=nnx.Rngs(0))
    weight_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(model)))
    for impl in ("xla", "pallas"):
      engine = Engine(model, None, max_batch_size=1, max_seq_len=256, eos_token_ids=(), attention_impl=impl,
                      prefix_caching=False)
      run = lambda tokens, engine=engine: engine.generate([[1] * 32], SamplingParams(max_tokens=tokens))
      run(n + 1)  # compiles every program both calls use
      times = {1: float("inf"), n + 1: float("inf")}
      for _ in range(repeats):
        for tokens in times:
          start = time.perf_counter()
          run(tokens)
          times[tokens] = min(times[tokens], time.perf_counter() - start)
      seconds = (times[n + 1] - times[1]) / n
      base = base or seconds
      entry = {"name": f"decode_7b_batch1_{label}_{impl}", "dtype": str(jnp.dtype(dtype)), "quantize": quantize,
               "seconds_per_token": seconds, "weight_bytes": int(weight_bytes),
               "speedup_over_float_xla": base / seconds}
      logging.info("%s", json.dumps(entry))
      results.append(entry)
      del engine
    del model
  return results


def _speculative_case(smoke: bool, repeats: int) -> list[dict]:
  """Batch-1 speculation's cost on a random 7B-shaped target (bfloat16) drafted by a random 0.5B-shaped model
  (the target's vocabulary width): seconds per step of plain decoding (decode_steps 1) against seconds per verify
  step with the draft (k = 4: the draft's 5 greedy steps and the target's forward over 5 tokens), each from the
  difference of a 33-token and a 1-token generation. Random weights agree little, so this measures what a verify
  step costs against a plain one, not the speed-up a real draft gives (that is the cost ratio over the mean
  accepted length)."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from qwenjax import PRESETS, Engine, QwenConfig, SamplingParams  # pylint: disable=g-import-not-at-top
  from qwenjax.model.decoder import Qwen2  # pylint: disable=g-import-not-at-top

  cfg, dtype, n = PRESETS["qwen2.5-7b"], jnp.bfloat16, 32
  draft_cfg = dataclasses.replace(PRESETS["qwen2.5-0.5b"], vocab_size=cfg.vocab_size)
  if smoke:
    cfg = QwenConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=2,
                     head_dim=16)
    draft_cfg = dataclasses.replace(cfg, num_layers=1)
    dtype, n = jnp.float32, 16
  model = Qwen2(cfg, dtype=dtype, param_dtype=dtype, scan_layers=True, rngs=nnx.Rngs(0))
  draft = Qwen2(draft_cfg, dtype=dtype, param_dtype=dtype, scan_layers=True, rngs=nnx.Rngs(1))
  results, plain_step = [], None
  for label, spec in (("plain", None), ("draft", dict(method="draft", draft_model=draft, num_speculative_tokens=4))):
    engine = Engine(model, None, max_batch_size=1, max_seq_len=256, eos_token_ids=(), decode_steps=1,
                    prefix_caching=False, speculative=spec)
    run = lambda tokens, engine=engine: engine.generate([[1] * 32], SamplingParams(max_tokens=tokens))
    run(n + 1)  # compiles every program both calls use
    times, calls = {1: float("inf"), n + 1: float("inf")}, {}
    for _ in range(repeats):
      for tokens in times:
        before = engine.stats()["decode_calls"]
        start = time.perf_counter()
        run(tokens)
        times[tokens] = min(times[tokens], time.perf_counter() - start)
        calls[tokens] = engine.stats()["decode_calls"] - before
    steps = max(calls[n + 1] - calls[1], 1)
    seconds = (times[n + 1] - times[1]) / steps
    plain_step = plain_step or seconds
    entry = {"name": f"spec_7b_batch1_{label}", "dtype": str(jnp.dtype(dtype)), "seconds_per_step": seconds,
             "tokens_per_step": n / steps, "step_cost_over_plain": seconds / plain_step}
    if spec is not None:
      entry.update({k: v for k, v in engine.stats().items() if k.startswith("spec_")})
    logging.info("%s", json.dumps(entry))
    results.append(entry)
    del engine
  return results


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  smoke = _SMOKE.value
  s = _shapes(smoke)
  dtype = jnp.float32 if smoke else jnp.bfloat16
  repeats = 1 if smoke else _REPEATS.value
  on_h200 = "H200" in str(jax.devices()[0].device_kind)
  bandwidth = H200_BYTES_PER_S if on_h200 else None
  if bandwidth is None and not smoke:
    from launch.bench.probes import probe_device  # pylint: disable=g-import-not-at-top

    bandwidth = probe_device("bfloat16")["jax_reduction_bytes_per_s"]
  wanted = lambda name: not _CASES.value or any(name.startswith(c) for c in _CASES.value)
  cases = []

  def record(name, kernel, reference, moved, extra=None):
    out, ref = np.asarray(kernel(), np.float32), np.asarray(reference(), np.float32)
    entry = {"name": name, "max_abs_diff": float(np.max(np.abs(out - ref))),
             "max_abs_reference": float(np.max(np.abs(ref))), "bytes": int(moved)}
    entry["kernel_s"] = _best(kernel, repeats)
    entry["reference_s"] = _best(reference, repeats)
    entry["speedup_over_reference"] = entry["reference_s"] / entry["kernel_s"]
    if bandwidth:
      entry["roofline_fraction"] = moved / entry["kernel_s"] / bandwidth
    entry.update(extra or {})
    logging.info("%s", json.dumps(entry))
    cases.append(entry)

  for name, int8, mixed in (("rpa_decode", False, False), ("rpa_decode_int8", True, False),
                            ("rpa_mixed", False, True)):
    if wanted(name):
      record(name, *_paged_case(s, dtype, int8=int8, mixed=mixed))
  if wanted("segment_attn"):
    record("segment_attn", *_segment_case(s, dtype))
  for mode in ("w8a16", "w8a8"):
    for shape in ("up", "down", "lm_head"):
      for m in s["rows"]:
        name = f"{mode}_{shape}_m{m}"
        if wanted(name):
          kernel, xla, float_mm, moved = _matmul_case(s, dtype, mode, shape, m)
          float_s = _best(float_mm, repeats)
          record(name, kernel, xla, moved, {"float_matmul_s": float_s})
          cases[-1]["speedup_over_float_matmul"] = float_s / cases[-1]["kernel_s"]
  for name, tokens in (("gmm_decode", 1), ("gmm_prefill", s["moe_tokens"])):
    if wanted(name):
      record(name, *_grouped_case(s, dtype, tokens))
  if _DECODE.value:
    cases += _decode_case(smoke, 3 if smoke else min(repeats, 5))
  if _SPECULATIVE.value:
    cases += _speculative_case(smoke, 3 if smoke else min(repeats, 5))
  report = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
            "smoke": smoke, "memory_bytes_per_s": bandwidth, "cases": cases}
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(report, f, indent=1)
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
