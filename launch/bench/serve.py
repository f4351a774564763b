r"""The server under load, through the official openai client over loopback (launch.benchmark --serve).

  python -m launch.bench.serve                          # the embedded model, float32
  python -m launch.bench.serve --quantize=w8a8 --load_requests=256 --clients=32

In one process, on one engine, side by side:
- sequential vs concurrent: 8 chat requests (64 tokens each, end of sequence ignored) one after another, then the
  same 8 from 8 clients at once; the ratio of the wall times is what continuous batching gives online clients;
- time to first token: a streamed request alone (median of 5, each hung up after its first token), and each of 16
  streams started together and read to their ends;
- throughput under load: --load_requests mixed chat requests (launch.bench.workload.job_requests) from --clients
  concurrent clients, against the same requests served as a batch job (`Engine.generate`) by an engine of its own
  (the server's prefix cache holds none of them); every response is checked (text, finish reason, usage), and
  the process's resident memory is read after a first quarter of the load and at its end (flat: what the load
  test must show).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

from absl import app, flags, logging

from launch import _cli
from launch.bench import workload
from launch.bench.measure import rss_mib

_SEQUENTIAL_TOKENS = 64


async def _chat(client, request: dict, **kw):
  sampling = request.get("sampling", {})
  return await client.chat.completions.create(model="bench", messages=request["messages"], temperature=0,
                                              max_tokens=sampling.get("max_tokens", _SEQUENTIAL_TOKENS),
                                              stop=sampling.get("stop"), **kw)


async def _ttft(client, request: dict, whole: bool) -> float:
  """Seconds to a streamed request's first content; whole: read the stream to its end (else hang up there, which
  aborts the rest of the request)."""
  start = time.perf_counter()
  stream = await _chat(client, request, stream=True)
  first = None
  async for chunk in stream:
    if first is None and chunk.choices and chunk.choices[0].delta.content:
      first = time.perf_counter() - start
      if not whole:
        break
  await stream.close()
  return first if first is not None else float("nan")


def _check(reply, want) -> None:
  choice = reply.choices[0]
  if choice.message.content != want.text or choice.finish_reason != want.finish_reason:
    raise AssertionError(f"a served reply differs from the batch job's: {choice.message.content!r} "
                         f"({choice.finish_reason}) against {want.text!r} ({want.finish_reason})")
  if reply.usage.completion_tokens != len(want.token_ids) or reply.usage.prompt_tokens != want.prompt_tokens:
    raise AssertionError(f"a served reply's usage {reply.usage} differs from the batch job's")


async def _measure(base_url: str, fixed: list[dict], load: list[dict], wants: list, clients: int) -> dict:
  import openai  # pylint: disable=g-import-not-at-top

  out = {}
  async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600) as client:
    start = time.perf_counter()
    for r in fixed:
      await _chat(client, r, extra_body={"ignore_eos": True})
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    await asyncio.gather(*(_chat(client, r, extra_body={"ignore_eos": True}) for r in fixed))
    concurrent = time.perf_counter() - start
    out["sequential_vs_concurrent"] = {"requests": len(fixed), "new_tokens": _SEQUENTIAL_TOKENS,
                                       "sequential_s": sequential, "concurrent_s": concurrent,
                                       "speedup": sequential / concurrent}
    idle = [await _ttft(client, fixed[i % len(fixed)], whole=False) for i in range(5)]
    loaded = await asyncio.gather(*(_ttft(client, fixed[i % len(fixed)], whole=True) for i in range(16)))
    out["time_to_first_token_s"] = {"idle_median": statistics.median(idle), "streams_16_median":
                                    statistics.median(loaded), "streams_16_max": max(loaded)}

    gate, done, rss = asyncio.Semaphore(clients), [0], {}

    async def one(i):
      async with gate:
        reply = await _chat(client, load[i])
      _check(reply, wants[i])
      done[0] += 1
      if done[0] == len(load) // 4:
        rss["after_first_quarter_mib"] = rss_mib()
      return reply.usage.completion_tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(len(load)))))
    wall = time.perf_counter() - start
    rss["at_end_mib"] = rss_mib()
    out["load"] = {"requests": len(load), "clients": clients, "generated_tokens": tokens, "wall_s": wall,
                   "tokens_per_s": tokens / wall, "all_valid": True, "rss": rss}
  return out


def measure(model, tokenizer, *, max_batch_size: int, load_requests: int, clients: int) -> dict:
  """The section's figures for one model (see the module docstring)."""
  from qwenjax import Engine, SamplingParams  # pylint: disable=g-import-not-at-top
  from qwenjax.server import ServerConfig, build_app  # pylint: disable=g-import-not-at-top
  from qwenjax.server.background import BackgroundServer  # pylint: disable=g-import-not-at-top

  load = workload.job_requests(load_requests)
  fixed = [{"messages": r["messages"]} for r in workload.job_requests(8)]
  # The batch job on an engine of its own, so that the server's finds none of the load's prompts in its prefix
  # cache (the two would otherwise differ by that, not by the server).
  batch_engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=2048)
  batch_engine.warm_up(sampling=[SamplingParams()])
  start = time.perf_counter()
  wants = batch_engine.generate(load)
  batch_wall = time.perf_counter() - start
  batch_tokens = sum(len(w.token_ids) for w in wants)
  logging.info("Batch job: %d tokens in %.1f s.", batch_tokens, batch_wall)
  del batch_engine
  engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=2048)
  engine.warm_up(sampling=[SamplingParams()])
  with BackgroundServer(build_app(engine, ServerConfig("bench"))) as running:
    out = asyncio.run(_measure(running.url + "/v1", fixed, load, wants, clients))
  out["batch_job"] = {"requests": len(load), "generated_tokens": batch_tokens, "wall_s": batch_wall,
                      "tokens_per_s": batch_tokens / batch_wall}
  out["load"]["vs_batch_job"] = out["load"]["tokens_per_s"] / out["batch_job"]["tokens_per_s"]
  out["max_batch_size"] = max_batch_size
  out["engine_stats"] = engine.stats()
  return out


def format_table(section: dict) -> str:
  lines = ["server (openai client over loopback):"]
  for name, s in section.items():
    if not isinstance(s, dict) or "sequential_vs_concurrent" not in s:
      continue
    sc, ttft, load = s["sequential_vs_concurrent"], s["time_to_first_token_s"], s["load"]
    lines += [f"  {name}: 8 requests x {sc['new_tokens']} tokens: sequential {sc['sequential_s']:.1f} s, "
              f"concurrent {sc['concurrent_s']:.1f} s ({sc['speedup']:.2f}x)",
              f"    time to first token: idle {ttft['idle_median'] * 1e3:.0f} ms, 16 streams median "
              f"{ttft['streams_16_median'] * 1e3:.0f} ms (max {ttft['streams_16_max'] * 1e3:.0f} ms)",
              f"    load: {load['requests']} requests from {load['clients']} clients, {load['tokens_per_s']:.1f} "
              f"tok/s = {load['vs_batch_job']:.2f}x the batch job's {s['batch_job']['tokens_per_s']:.1f}; "
              f"RSS {load['rss']['after_first_quarter_mib']:.0f} -> {load['rss']['at_end_mib']:.0f} MiB"]
  return "\n".join(lines)


def main() -> None:
  """`python -m launch.bench.serve`: the section alone (flags defined here, not at import: launch.benchmark
  imports this module beside flags of its own)."""
  model_flag = flags.DEFINE_string("model", "default", "The model (see launch.generate).")
  quantize = flags.DEFINE_list("quantize", ["none"], "Weight modes: none, int8 (w8a16), w8a8.")
  slots = flags.DEFINE_integer("max_batch_size", 16, "The engine's decode slots.", lower_bound=1)
  load_requests = flags.DEFINE_integer("load_requests", 128, "Requests of the load test.", lower_bound=4)
  clients = flags.DEFINE_integer("clients", 16, "Concurrent clients of the load test.", lower_bound=1)
  output_dir = flags.DEFINE_string("output_dir", None, "Where serve.json goes (default: printed only).")

  def run(argv):
    del argv
    import qwenjax  # pylint: disable=g-import-not-at-top
    from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

    # Every mode's matmul paths; float32's XLA flags. A record named by $QWENJAX_CPU_PATHS, else this processor's.
    _cli.use_cpu_paths(os.environ.get(_cli.CPU_PATHS_ENV, "auto"), cpu_paths.float_mode("float32"))
    section = {}
    try:
      for mode in quantize.value:
        loaded = qwenjax.load(model_flag.value, quantize=None if mode == "none" else mode)
        section[f"qwenjax-{mode}" if mode != "none" else "qwenjax"] = measure(
            loaded.model, loaded.tokenizer, max_batch_size=slots.value, load_requests=load_requests.value,
            clients=clients.value)
    except qwenjax.QwenJaxError as e:
      _cli.fail(e)
    print(format_table(section))
    if output_dir.value:
      os.makedirs(output_dir.value, exist_ok=True)
      path = os.path.join(output_dir.value, "serve.json")
      with open(path, "w", encoding="utf-8") as f:
        json.dump(section, f, indent=2)
      print(f"report: {path}")

  app.run(run, flags_parser=_cli.parse_flags)


if __name__ == "__main__":
  main()
