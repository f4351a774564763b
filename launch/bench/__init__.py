"""The parts of `python -m launch.benchmark` (launch/benchmark.py holds its flags, its docstring of what every
figure means, and the `main` that joins these):

  workload.py      the jobs every engine runs: chat prompts of an exact length, random prompts, the batch job's mixed
                   requests, the tiny smoke model
  measure.py       the protocol: a warm-up, the timed job, time to first token, each run's fraction of the limits
  adapters.py      the engines as GenerateFns (qwenjax, transformers on torch, llama.cpp) and their runners
  job.py           the batch job, served whole-process by launch.batch_generate and llamacpp_job, and how the
                   completions agree
  llamacpp_job.py  `python -m launch.bench.llamacpp_job`: llama.cpp serving the batch job one request at a time
  concurrency.py   sequences decoding at once for a KV budget at a long context, paged (measured) and one row per
                   slot (computed)
  costs.py         the cost model: bytes a decode step streams, FLOPs of a prefill
  probes.py        the device's limits: matmul FLOP/s and memory bandwidth probes, an H200's looked-up figures
  report.py        the ratios between engines, machine and versions, the stdout table and the matplotlib plot

Imports run one way: workload, costs, probes, concurrency, job and llamacpp_job import no other part; measure
imports costs; adapters imports measure and costs; report imports adapters and probes.
"""
