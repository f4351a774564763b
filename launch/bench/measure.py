"""The protocol every engine is measured by: a warm-up, then the timed job; and the figures derived from the run.

An engine is a GenerateFn: (prompts, new tokens) -> (generated token ids, seconds until every sequence had its
first token), greedy, end-of-sequence ignored. `measure` times it on a batch; `add_fractions` divides its figures
by the device's limits (launch/bench/probes.py); `agreement` compares its greedy tokens with qwenjax's.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Sequence

from absl import logging

from launch.bench.costs import ModelCosts

# (prompts, new tokens) -> (generated token ids, seconds until every sequence had its first token)
GenerateFn = Callable[[Sequence[Sequence[int]], int], tuple[list[list[int]], float]]


class FirstTokens:
  """Times when every sequence of a job has its first token: the batch's time to first token."""

  def __init__(self, count: int):
    self.start, self.waiting, self.seconds = time.perf_counter(), set(range(count)), None

  def got(self, *indices: int) -> None:
    self.waiting.difference_update(indices)
    if not self.waiting and self.seconds is None:
      self.seconds = time.perf_counter() - self.start


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


def agreement(tokens: list[int], reference: list[int]) -> float:
  """Fraction of the reference's greedy tokens matched before the first difference."""
  same = 0
  for a, b in zip(tokens, reference):
    if a != b:
      break
    same += 1
  return same / len(reference)


def peak_rss_gib() -> float:
  """This process's peak resident memory so far, in GiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def rss_mib() -> float:
  """This process's resident memory now, in MiB (Linux's /proc/self/status; NaN elsewhere)."""
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
  except (OSError, StopIteration):
    return float("nan")


# --- Timing one jitted call (the matmul microbenchmarks) ---

# name -> (K, N, the weight is stored [N, K]): Qwen2.5-0.5B's matmuls (hidden 896, MLP 4864, 14 query heads and 2
# KV heads of 64, vocabulary 151936), what launch.bench.int8_matmul and launch.bench.cpu_paths time.
MATMUL_SHAPES = {
    "mlp_up": (896, 4864, False),
    "mlp_down": (4864, 896, False),
    "q_o": (896, 896, False),
    "kv": (896, 128, False),
    "lm_head": (896, 151936, True),
}


def positive_integers(values: list[str]) -> bool:
  """A flag validator: a non-empty list of integers >= 1."""
  try:
    return bool(values) and all(int(v) >= 1 for v in values)
  except ValueError:
    return False

GROUP = 16  # calls chained in one jitted program


def chained(fn):
  """jit of (x, weights, scale) -> fn applied with each weight in turn, each call's x made to depend on the last
  call's output (as a layer's input does on the layer before): one dispatch for a group of calls."""
  import jax  # noqa: PLC0415

  def chain(x, weights, scale):
    y = None
    for w in weights:
      if y is not None:
        x = x + 0.0 * y[:, :1]  # a data dependency XLA does not fold away (0 * NaN is NaN)
      y = fn(x, w, scale)
    return y

  return jax.jit(chain)


def best_seconds(fn, x, weights, scale, repeats: int) -> float:
  """The best over `repeats` passes of the mean seconds per call of fn(x, w, scale), w cycling through `weights`
  in chained groups of up to GROUP calls per dispatch (so dispatch overhead does not swamp small shapes)."""
  groups = [tuple(weights[i:i + GROUP]) for i in range(0, len(weights), GROUP)]
  chain = chained(fn)
  for group in {len(g): g for g in groups}.values():  # compile every group size
    chain(x, group, scale).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    for group in groups:
      chain(x, group, scale).block_until_ready()
    best = min(best, (time.perf_counter() - start) / len(weights))
  return best
