"""What a batch job reports about itself: a summary beside the output when it ends, counted from the output file
itself (so the two never disagree), and a progress file refreshed while it runs, aggregated over hosts.

    timer = reports.CompileTimer()                       # from the start: jax.monitoring's compile events
    progress = reports.Progress("out.jsonl", replica=0, replicas=2, total=1000, every=30)
    progress.add(answered=1, prompt_tokens=12, generated_tokens=8)      # per record written
    progress.close()                                     # the last refresh; process 0 writes out.jsonl.progress.json
    reports.write_json("out.jsonl.summary.json", reports.summary("out.jsonl", lines=1000, run={...}))

Progress across hosts goes through files, not the jax.distributed key-value store: every replica but the first
rewrites `<output>.progress-<i>.json` (atomically) and process 0 reads them beside its own counts. The job already
needs one file system that every host writes (the parts merge through it); a file is readable after a host
died, needs no collective (a host busy in a long decode step still answers), and no private JAX API.
"""

from __future__ import annotations

import collections
import datetime
import glob
import json
import os
import threading
import time
from typing import Any

from qwenjax.engine import jobs

SUMMARY_SUFFIX = ".summary.json"
PROGRESS_SUFFIX = ".progress.json"
# jax.monitoring duration events of a compilation (tracing, lowering, XLA compile or a persistent-cache read).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON so that a reader sees the old file or the new one, never half of one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class CompileTimer:
  """Seconds this process spent compiling: the sum of jax.monitoring's compile duration events since it was made
  (jax calls listeners from the compiling thread; the total is only read)."""

  _timers: list[CompileTimer] = []
  _lock = threading.Lock()

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top

    self.seconds, self.count = 0.0, 0
    with CompileTimer._lock:
      if not CompileTimer._timers:  # one listener for the process: jax.monitoring cannot remove one
        jax.monitoring.register_event_duration_secs_listener(CompileTimer._listen)
      CompileTimer._timers.append(self)

  @staticmethod
  def _listen(event: str, duration: float, **_) -> None:
    if event in COMPILE_EVENTS:
      for timer in CompileTimer._timers:
        timer.seconds += duration
        timer.count += event == COMPILE_EVENTS[-1]


# --- Counting the output file -----------------------------------------------------------------------------------


def _counts() -> dict[str, Any]:
  return {"records": 0, "answered": 0, "failed": 0, "errors": collections.Counter(),
          "finish_reasons": collections.Counter(), "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}


def _add(counts: dict[str, Any], record: dict[str, Any]) -> None:
  """One record of either format into `counts`."""
  counts["records"] += 1
  if "custom_id" in record:  # OpenAI Batch: a failure is `error`, or a non-200 response whose body holds it
    response = record.get("response") or {}
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    error = record.get("error") or (body.get("error") if response.get("status_code", 200) != 200 else None)
    if error is not None or response.get("status_code") != 200:
      counts["failed"] += 1
      counts["errors"][(error or {}).get("code") or f"http_{response.get('status_code')}"] += 1
      return
    usage = body.get("usage") or {}
    reasons = [c.get("finish_reason") for c in body.get("choices") or []]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
  else:
    if "error" in record:
      counts["failed"] += 1
      counts["errors"][record.get("code") or "error"] += 1
      return
    usage = record["usage"]
    reasons = [c["finish_reason"] for c in record.get("choices") or [record]]
    cached = usage.get("cached_tokens", 0)
  counts["answered"] += 1
  counts["finish_reasons"].update(str(r) for r in reasons)
  counts["prompt_tokens"] += usage.get("prompt_tokens", 0)
  counts["cached_tokens"] += cached
  counts["generated_tokens"] += usage.get("completion_tokens", 0)


def count_results(path: str, new_since: set[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """Counts of every record in a results file, and of those whose id is not in `new_since` (a run's own)."""
  every, new = _counts(), _counts()
  if os.path.exists(path):
    for data, key in jobs.iter_records(path):
      record = json.loads(data)
      _add(every, record)
      if new_since is not None and key not in new_since:
        _add(new, record)
  return every, new


def _plain(counts: dict[str, Any]) -> dict[str, Any]:
  return {k: dict(sorted(v.items())) if isinstance(v, collections.Counter) else v for k, v in counts.items()}


def summary(output: str, *, lines: int, done_before: set[str], run: dict[str, Any]) -> dict[str, Any]:
  """The job's summary: `lines` input ids, what the output file answers (counted from it), and this run: the
  records it added (ids not in `done_before`) with `run`'s timing (wall_seconds, serve_seconds,
  compile_seconds, chips) turned into rates."""
  every, new = count_results(output, done_before)
  every = _plain(every)
  every["missing"] = max(0, lines - every["records"])
  every["cached_fraction"] = every["cached_tokens"] / max(every["prompt_tokens"], 1)
  new = _plain(new)
  serve = max(run.get("serve_seconds", 0.0), 1e-9)
  rates = {"tokens_per_second": new["generated_tokens"] / serve,
           "tokens_per_second_per_chip": new["generated_tokens"] / serve / max(run.get("chips", 1), 1),
           "requests_per_second": new["records"] / serve}
  return {"output": output, "lines": lines, "complete": every["missing"] == 0, "finished_at": _now(), **every,
          "this_run": {**new, **run, **rates}}


# --- Progress while the job runs --------------------------------------------------------------------------------


def _replica_file(output: str, replica: int) -> str:
  return f"{output}.progress-{replica}.json"


def remove_replica_files(output: str) -> None:
  """The per-replica progress files of this or an earlier run (any host count), and the temporary copies of
  reports a kill left before their rename."""
  base = glob.escape(output)
  stale = [base + ".progress-*.json", base + ".progress-*.json.tmp-*", glob.escape(output + PROGRESS_SUFFIX) + ".tmp-*",
           glob.escape(output + SUMMARY_SUFFIX) + ".tmp-*"]
  for path in {p for pattern in stale for p in glob.glob(pattern)}:
    os.remove(path)


class Progress:
  """This replica's counts of the run, refreshed into files every `every` seconds by a thread (and on close):
  replica i > 0 into `<output>.progress-<i>.json`; replica 0 (process 0) sums them with its own into
  `<output>.progress.json`: done of total, rates and the time left. `total`: lines this run serves, all hosts."""

  FIELDS = ("answered", "failed", "prompt_tokens", "cached_tokens", "generated_tokens")

  def __init__(self, output: str, *, replica: int, replicas: int, total: int, every: float,
               compile_timer: CompileTimer | None = None, writes: bool = True):
    self.output, self.replica, self.replicas, self.total = output, replica, replicas, total
    self.counts = dict.fromkeys(self.FIELDS, 0)
    self.compile_timer, self.writes = compile_timer, writes
    self.start = time.monotonic()
    self._every, self._stop = every, threading.Event()
    self._thread = None
    if writes and every > 0:
      self._thread = threading.Thread(target=self._loop, name="batch-progress", daemon=True)
      self._thread.start()

  def add(self, **counts: int) -> None:
    for k, v in counts.items():
      self.counts[k] += v

  @property
  def done(self) -> int:
    return self.counts["answered"] + self.counts["failed"]

  def _loop(self) -> None:
    while not self._stop.wait(self._every):
      self.refresh()

  def _own(self) -> dict[str, Any]:
    return {**self.counts, "replica": self.replica, "elapsed_seconds": time.monotonic() - self.start,
            "compile_seconds": self.compile_timer.seconds if self.compile_timer else None}

  def refresh(self, final: bool = False) -> None:
    if not self.writes:
      return
    if self.replica != 0:
      write_json(_replica_file(self.output, self.replica), {**self._own(), "final": final})
      return
    reports = [self._own()]
    for i in range(1, self.replicas):
      try:
        with open(_replica_file(self.output, i), encoding="utf-8") as f:
          reports.append(json.load(f))
      except (OSError, ValueError):  # not written yet (or being replaced on a file system without rename)
        pass
    done = sum(r["answered"] + r["failed"] for r in reports)
    elapsed = time.monotonic() - self.start
    rate = done / elapsed if elapsed > 0 else 0.0
    sums = {k: sum(r[k] for r in reports) for k in self.FIELDS}
    write_json(self.output + PROGRESS_SUFFIX, {
        "done": done, "total": self.total, "fraction": done / self.total if self.total else 1.0,
        "elapsed_seconds": elapsed, "requests_per_second": rate,
        "eta_seconds": (self.total - done) / rate if rate > 0 else None,
        "tokens_per_second": sums["generated_tokens"] / elapsed if elapsed > 0 else 0.0,
        "cached_fraction": sums["cached_tokens"] / max(sums["prompt_tokens"], 1),
        "replicas": self.replicas, "replicas_reporting": len(reports), "updated": _now(), "final": final, **sums})

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self.refresh(final=True)

  def replica_reports(self) -> list[dict[str, Any]]:
    """The other replicas' last reports (process 0, after they closed)."""
    found = []
    for i in range(1, self.replicas):
      try:
        with open(_replica_file(self.output, i), encoding="utf-8") as f:
          found.append(json.load(f))
      except (OSError, ValueError):
        pass
    return found
