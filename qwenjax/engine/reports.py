"""What a batch job reports about itself: a summary beside the output when it ends, counted from the output file
itself (so the two never disagree), and a progress file refreshed while it runs, aggregated over hosts.

    timer = profiling.CompileTimer()                     # from the start: jax.monitoring's compile events
    progress = reports.Progress("out.jsonl", replica=0, replicas=2, total=1000, every=30)
    progress.add(answered=1, prompt_tokens=12, generated_tokens=8)      # per record written
    progress.close()                                     # the last refresh; process 0 writes out.jsonl.progress.json
    reports.write_summary("out.jsonl", reports.summary("out.jsonl", lines=1000, run={...}))

Progress across hosts goes through files, not the jax.distributed key-value store: every replica but the first
rewrites `<output>.progress-<i>.json` (atomically) and process 0 reads them beside its own counts. The job already
needs one file system that every host writes (the parts merge through it); a file is readable after a host
died, needs no collective (a host busy in a long decode step still answers), and no private JAX API.

Every report file is written by `_files.write_json` with a marker of its kind, atomically, and only over a file of
the same marker: `prepare` (before the job starts) refuses a summary or progress file that is not the job's,
untouched, and removes only the per-host files and temporaries of ours that an earlier run left.
"""

from __future__ import annotations

import collections
import datetime
import os
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from absl import logging

from qwenjax import _files
from qwenjax._errors import InputError
from qwenjax.engine import jobs, speculative

if TYPE_CHECKING:
  from qwenjax.engine import profiling

SUMMARY_SUFFIX = ".summary.json"
PROGRESS_SUFFIX = ".progress.json"
SUMMARY_MARKER = "batch_generate summary"
PROGRESS_MARKER = "batch_generate progress"
REPLICA_MARKER = "batch_generate replica progress"


def write_summary(output: str, summary: dict[str, Any]) -> None:
  """`<output>.summary.json`, atomically, over nothing or an earlier summary only (InputError otherwise, and for
  a write that fails: no temporary is left)."""
  _files.write_json(output + SUMMARY_SUFFIX, summary, marker=SUMMARY_MARKER)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
      record = _files.loads(data)
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


def _replica_files(output: str) -> list[str]:
  """Every `<output>.progress-<i>.json` there is, or was (a temporary of ours left by a kill before its rename)."""
  base = os.path.basename(output)
  name = re.compile(r"\.?" + re.escape(base) + r"\.progress-(\d+)\.json(?:" + re.escape(_files.TMP_INFIX) + r"\d+)?")
  try:
    names = os.listdir(os.path.dirname(os.path.abspath(output)))
  except OSError:
    return []
  return sorted({_replica_file(output, int(m.group(1))) for m in map(name.fullmatch, names) if m})


def remove_replica_files(output: str) -> None:
  """The per-replica progress files of this or an earlier run (any host count) and the temporary copies of
  reports that a kill left before their rename: only files of ours (by marker; temporaries by their name)."""
  for path in _replica_files(output):
    _files.remove_stale_temporaries(path)
    _files.remove_if_ours(path, REPLICA_MARKER)
  for suffix in (SUMMARY_SUFFIX, PROGRESS_SUFFIX):
    _files.remove_stale_temporaries(output + suffix)


def prepare(output: str) -> None:
  """Before a job starts (process 0, holding the output's lock): removes what an earlier run left of its reports
  (`remove_replica_files`), and refuses with an InputError, touching nothing, a summary, progress or per-host
  progress file there that the job did not write (a file of the user's, a link)."""
  remove_replica_files(output)
  what = f"--output={output}"
  for path in _replica_files(output):
    _files.check_ours(path, REPLICA_MARKER, what)
  _files.check_ours(output + SUMMARY_SUFFIX, SUMMARY_MARKER, what)
  _files.check_ours(output + PROGRESS_SUFFIX, PROGRESS_MARKER, what)


def _read_report(path: str) -> dict[str, Any] | None:
  """A replica's progress report, if there is one of ours (not written yet, or being replaced on a file system
  without an atomic rename: None)."""
  if os.path.islink(path):
    return None
  try:
    obj = _files.read_json(path)
  except InputError:
    return None
  return obj if isinstance(obj, dict) and obj.get(_files.MARKER_KEY) == REPLICA_MARKER else None


class Progress:
  """This replica's counts of the run, refreshed into files every `every` seconds by a thread (and on close):
  replica i > 0 into `<output>.progress-<i>.json`; replica 0 (process 0) sums them with its own into
  `<output>.progress.json`: done of total, rates and the time left. `total`: lines this run serves, all hosts."""

  FIELDS = ("answered", "failed", "prompt_tokens", "cached_tokens", "generated_tokens")

  def __init__(self, output: str, *, replica: int, replicas: int, total: int, every: float,
               compile_timer: profiling.CompileTimer | None = None, writes: bool = True,
               speculation: Callable[[], dict[str, Any]] | None = None):
    self.output, self.replica, self.replicas, self.total = output, replica, replicas, total
    self.speculation = speculation  # a speculative engine's `Proposer.stats`
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
    warned = False
    while not self._stop.wait(self._every):
      try:
        self.refresh()
      except InputError as e:  # a full disk: the job goes on (its records matter, not this file); close() tells
        if not warned:
          logging.warning("%s (retried every %g s).", e, self._every)
          warned = True

  def own(self) -> dict[str, Any]:
    """This replica's report: its counts, time, compile time and speculation counters."""
    return {**self.counts, "replica": self.replica, "elapsed_seconds": time.monotonic() - self.start,
            "compile_seconds": self.compile_timer.seconds if self.compile_timer else None,
            "speculation": self.speculation() if self.speculation is not None else None}

  def refresh(self, final: bool = False) -> None:
    if not self.writes:
      return
    if self.replica != 0:
      _files.write_json(_replica_file(self.output, self.replica), {**self.own(), "final": final},
                        marker=REPLICA_MARKER)
      return
    reports = [self.own()] + self.replica_reports()
    done = sum(r["answered"] + r["failed"] for r in reports)
    elapsed = time.monotonic() - self.start
    rate = done / elapsed if elapsed > 0 else 0.0
    sums = {k: sum(r[k] for r in reports) for k in self.FIELDS}
    _files.write_json(self.output + PROGRESS_SUFFIX, {
        "done": done, "total": self.total, "fraction": done / self.total if self.total else 1.0,
        "elapsed_seconds": elapsed, "requests_per_second": rate,
        "eta_seconds": (self.total - done) / rate if rate > 0 else None,
        "tokens_per_second": sums["generated_tokens"] / elapsed if elapsed > 0 else 0.0,
        "cached_fraction": sums["cached_tokens"] / max(sums["prompt_tokens"], 1),
        "replicas": self.replicas, "replicas_reporting": len(reports), "updated": _now(), "final": final, **sums,
        **({"speculation": speculation_totals(reports)} if self.speculation is not None else {})},
        marker=PROGRESS_MARKER)

  def stop(self) -> None:
    """Stops the refreshing thread (an interrupted job: no last refresh)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def close(self) -> None:
    """The last refresh, final: InputError if it cannot be written (a full disk)."""
    self.stop()
    self.refresh(final=True)

  def replica_reports(self) -> list[dict[str, Any]]:
    """The other replicas' last reports (process 0, after they closed)."""
    found = (_read_report(_replica_file(self.output, i)) for i in range(1, self.replicas))
    return [r for r in found if r is not None]


def speculation_totals(reports: list[dict[str, Any]]) -> dict[str, Any]:
  """The replicas' speculation counters summed (`qwenjax.engine.speculative.Proposer.stats`), with the mean
  accepted length of them all: tokens a sequence gained per verify step it proposed in."""
  keys = ("spec_proposed_tokens", "spec_accepted_tokens", "spec_verify_rows")
  return speculative.with_mean_length({k: sum((r.get("speculation") or {}).get(k, 0) for r in reports) for k in keys})
