"""The device's limits, which every fraction in the report divides by: peak matmul FLOP/s and memory bandwidth.

  probes = [probe_device(dtype)]   # before the engines run
  probes.append(probe_device(dtype))   # and after
  limits = device_limits(dtype, probes)   # the best of both; an H200's looked-up figures on an H200

Probes (best of 10 each, after a warm-up): a jitted n^3 matmul (n = 2048 on CPU, 8192 on an accelerator; also
torch's on CPU when installed), 512 MiB reductions, and a batch-1 matvec over a 512 MiB matrix. float32 on CPU,
--dtype elsewhere.
"""

from __future__ import annotations

import math
import os
import pathlib
import time

# Looked-up limits of an NVIDIA H200 (SXM): HBM3e bandwidth and dense bfloat16 tensor-core FLOP/s.
H200 = {"memory_bandwidth_bytes_per_s": 4.8e12, "peak_flops_per_s": 989e12, "peak_flops_dtype": "bfloat16 dense"}


def _best_seconds(fn, *args, repeats: int) -> float:
  """The best wall-clock seconds of fn(*args) over `repeats` calls (arguments, not a closure: callers free them)."""
  fn(*args)  # warm-up (and compilation)
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args)
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
  probes = {"jax_matmul_flops_per_s": 2 * n**3 / _best_seconds(lambda x, y: matmul(x, y).block_until_ready(), a, b,
                                                                repeats=repeats)}
  del a, b
  x = jnp.ones((stream_bytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  probes["jax_reduction_bytes_per_s"] = stream_bytes / _best_seconds(lambda y: total(y).block_until_ready(), x,
                                                                     repeats=repeats)
  del x
  w, v = jnp.ones((stream_bytes // 4 // 4096, 4096), jnp.float32), jnp.ones((4096,), jnp.float32)
  matvec = jax.jit(lambda m, y: m @ y)
  probes["jax_matvec_bytes_per_s"] = stream_bytes / _best_seconds(lambda m, y: matvec(m, y).block_until_ready(), w, v,
                                                                  repeats=repeats)
  del w
  if backend == "cpu":
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      return probes
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    probes["torch_matmul_flops_per_s"] = 2 * n**3 / _best_seconds(torch.matmul, ta, tb, repeats=repeats)
    del ta, tb
    tx = torch.ones(stream_bytes // 4)
    probes["torch_reduction_bytes_per_s"] = stream_bytes / _best_seconds(torch.sum, tx, repeats=repeats)
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
            "h200": dict(H200, status="not measured in this run")}
  if "H200" in device_kind:
    limits["h200"]["status"] = "this device; looked up, used for the fractions"
    limits["used"] = dict(source="looked up (H200)", **H200)
  else:
    limits["used"] = {"source": "measured here", "peak_flops_per_s": flops, "memory_bandwidth_bytes_per_s": bandwidth}
  if backend == "cpu":
    limits["nominal_cpu"] = _nominal_cpu_peak()
  return limits


def _nominal_cpu_peak() -> dict:
  """Cores x clock x float32 FLOPs per cycle from /proc/cpuinfo (two FMA units per core assumed)."""
  info = cpuinfo()
  flags_ = set(info.get("flags", "").split())
  per_cycle = 64 if "avx512f" in flags_ else 32 if {"avx2", "fma"} <= flags_ else 8
  mhz = float(info.get("cpu MHz", 0) or 0)
  cores = len(os.sched_getaffinity(0))
  return {"peak_flops_per_s": cores * mhz * 1e6 * per_cycle, "cores": cores, "mhz": mhz,
          "float32_flops_per_cycle": per_cycle, "note": "nominal, from the reported clock; not used for fractions"}


def cpuinfo() -> dict:
  """/proc/cpuinfo's fields for the first CPU ({} where it cannot be read)."""
  info = {}
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      key, _, value = line.partition(":")
      info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return info
