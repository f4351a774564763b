"""Exactly once under kill -9: a job of 240 short requests (simple and OpenAI Batch lines, some malformed on
purpose, some with metadata) on a tiny random model, killed with SIGKILL at 14 moments (loading, mid-decode while
writing a record, while recovering the output, while merging parts at the end of a two-process run and at the
start of the next run, and at seeded random times from outside), one and two processes, switching 1 -> 2 and
2 -> 1 between reruns. After the last rerun: every line of the output is valid JSON, every input id is answered
exactly once, every row equals an uninterrupted run's (greedy), and the summary's counts agree with the file.

Exact moments come from the fault-injection hook of `qwenjax.engine.jobs` (QWENJAX_CRASH_AT: the process kills
itself with SIGKILL halfway through the bytes of its Nth record, or of its Nth merged record, just before a
rewritten output replaces the old one, or once the model is loaded); random ones from this test's seeded RNG.
"""

import collections
import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir, xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
SEED = 1302
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """(checkpoint, input file, compile cache dir, expected keys)."""
  root = tmp_path_factory.mktemp("kill_harness")
  checkpoint = save_tiny_tokenizer_dir(root / "ckpt")
  build_tiny_qwen2(checkpoint, vocab_size=640, num_key_value_heads=2)
  lines, keys = [], []
  for i in range(240):
    if i % 24 == 5:  # malformed on purpose: each is its own error record, keyed by its line number
      lines.append(["{not json", json.dumps({"id": f"bad{i}"}), json.dumps({"id": f"t{i}", "prompt": 3})][i % 3])
      keys.append(f"line-{i + 1}" if i % 3 == 0 else f"bad{i}" if i % 3 == 1 else f"t{i}")
    elif i % 8 == 3:  # OpenAI Batch chat lines
      lines.append(json.dumps({"custom_id": f"oa{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": [{"role": "user", "content": f"Count to {i}"}], "max_tokens": 3},
                               "metadata": {"row": i}}))
      keys.append(f"oa{i}")
    else:
      line = {"id": f"s{i}", "prompt": f"def f{i}(x):\n  return x * {i}" + " + x" * (i % 9)}
      if i % 5 == 0:
        line["metadata"] = {"row": i, "tags": ["a", None, {"nested": {"id": "x", "error": "looks like a record"}}]}
      lines.append(json.dumps(line))
      keys.append(f"s{i}")
  inp = root / "in.jsonl"
  inp.write_text("\n".join(lines) + "\n")
  return checkpoint, inp, root / "compile_cache", keys


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Runs:
  """Starts the job (one or two processes) on one output, kills it as told, and keeps a log of what happened."""

  def __init__(self, job, out: pathlib.Path, rng: random.Random):
    self.checkpoint, self.inp, self.cache, _ = job
    self.out, self.rng, self.log, self.kills = out, rng, [], 0

  def _env(self, crash: str | None) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(self.cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=1"))
    env.pop("QWENJAX_CRASH_AT", None)
    if crash:
      env["QWENJAX_CRASH_AT"] = crash
    return env

  def command(self, output: pathlib.Path | None = None, extra=()) -> list[str]:
    return [sys.executable, "-m", "launch.batch_generate", f"--model={self.checkpoint}", f"--input={self.inp}",
            f"--output={output or self.out}", "--max_batch_size=4", "--max_new_tokens=3", "--max_seq_len=128",
            "--fsync_every_lines=1", "--progress_every_seconds=0.2", *extra]

  def _start(self, crash: str | None, extra=(), index: int = 0) -> subprocess.Popen:
    cmd = self.command(extra=extra)
    err = open(self.out.parent / f"{self.out.stem}-stderr-{len(self.log)}-{index}.txt", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=self._env(crash))

  def _written(self) -> int:
    """Lines in the output and its parts so far."""
    paths = [self.out, *self.out.parent.glob(self.out.name + ".part-*")]
    return sum(p.read_bytes().count(b"\n") for p in paths if p.exists())

  def run(self, processes: int = 1, crash: tuple = (), kill_after: float | None = None,
          kill_at_records: int | None = None) -> list[int]:
    """Runs the job to its end, or until a process is killed: by its crash point, or by us after kill_after
    seconds or once it wrote kill_at_records more lines (seen from outside, so at no particular point of the
    program). Then every process is killed, as a preempted slice dies. Returns the exit codes."""
    before = self._written() if kill_at_records is not None else 0
    crash = tuple(crash) + (None,) * (processes - len(crash))
    if processes == 1:
      procs = [self._start(crash[0])]
    else:
      port = _free_port()
      procs = [self._start(crash[i], (f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                                      f"--process_id={i}"), i) for i in range(processes)]
    start, killed_by_us = time.monotonic(), False
    while [p.poll() for p in procs].count(None):  # every process polled: any() would stop at the first
      died = any(p.returncode == -signal.SIGKILL for p in procs)
      late = (kill_after is not None and time.monotonic() - start > kill_after) or (
          kill_at_records is not None and self._written() - before >= kill_at_records)
      if died or late:
        killed_by_us = killed_by_us or (late and not died)
        for p in procs:
          if p.poll() is None:
            p.kill()
      assert time.monotonic() - start < 300, "a run hung"
      time.sleep(0.01)
    codes = [p.wait() for p in procs]
    hit = any(c == -signal.SIGKILL for c in codes)
    self.kills += hit
    self.log.append((processes, crash, None if kill_after is None else round(kill_after, 2), kill_at_records,
                     codes, round(time.monotonic() - start, 2)))
    if not hit:
      errs = sorted(self.out.parent.glob(f"{self.out.stem}-stderr-{len(self.log) - 1}-*.txt"))
      assert codes == [0] * processes, [e.read_text()[-3000:] for e in errs]
    return codes


def _normalized(record: dict) -> dict:
  """A record without what legitimately differs between runs: an OpenAI body's creation time, and the prompt
  tokens read from shared prefix pages (which depend on what the pool held when the request came: a rerun serves
  a different mix)."""
  record = json.loads(json.dumps(record))
  if "custom_id" in record and (record.get("response") or {}).get("body"):
    record["response"]["body"].pop("created", None)
    (record["response"]["body"].get("usage") or {}).pop("prompt_tokens_details", None)
  (record.get("usage") or {}).pop("cached_tokens", None)
  return record


def _key(record: dict) -> str:
  return record["custom_id"] if "custom_id" in record else record["id"]


def _check(out: pathlib.Path, keys: list[str], reference: dict | None, foreign: tuple = ()) -> None:
  """Every id once, equal to the reference run's (if given), the summary agreeing with the file, nothing left
  beside the output but its reports, its .corrupt and the `foreign` files the job did not create."""
  raw = out.read_bytes()
  assert raw.endswith(b"\n")
  records = [json.loads(line) for line in raw.decode("utf-8").split("\n")[:-1]]  # every line valid JSON
  counts = collections.Counter(_key(r) for r in records)
  assert sorted(counts) == sorted(keys) and set(counts.values()) == {1}  # every id exactly once
  for record in records if reference is not None else ():
    assert _normalized(record) == reference[_key(record)], _key(record)  # equal to the uninterrupted run
  if reference is not None:
    assert sum("metadata" in r for r in records) == sum("metadata" in r for r in reference.values())
  # The summary (the last run's) counts what the file holds: an independent count of the same lines.
  summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
  failed = [r for r in records if "error" in r and (r["error"] is not None)]
  assert (summary["records"], summary["answered"], summary["failed"], summary["missing"]) == (
      len(keys), len(keys) - len(failed), len(failed), 0)
  generated = sum(r["usage"]["completion_tokens"] if "usage" in r else r["response"]["body"]["usage"]
                  ["completion_tokens"] for r in records if r not in failed)
  assert summary["generated_tokens"] == generated
  left = [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, "." + out.name)) and not p.name.endswith(
      (".summary.json", ".progress.json", ".corrupt")) and p != out and p not in foreign]
  assert not left, left  # no part, lock, temporary or per-host progress file remains
  progress = json.loads(out.with_name(out.name + ".progress.json").read_text())
  assert progress["final"] and progress["done"] == progress["total"]


def test_every_id_exactly_once_whatever_moment_a_kill_strikes(job, tmp_path):
  checkpoint, inp, cache, keys = job
  rng = random.Random(SEED)
  print(f"kill harness seed {SEED}")
  began = time.monotonic()

  ref = _Runs(job, tmp_path / "reference.jsonl", rng)
  ref.run()
  t_ref = ref.log[-1][-1]
  reference = {_key(r): _normalized(r) for r in map(json.loads, ref.out.read_text().splitlines())}
  assert len(reference) == len(keys)

  # A: one process. Killed once loaded, tearing its 37th record, while recovering the torn file, at two random
  # moments, and tearing its 80th record; then it finishes.
  a = _Runs(job, tmp_path / "a.jsonl", rng)
  assert a.run(crash=("load",)) == [-9] and not a.out.exists()
  t_load = a.log[-1][-1]  # with the compile cache the reference run filled: a job is loaded by then
  assert a.run(crash=("write:37",)) == [-9]
  assert a.run(crash=("recover",)) == [-9]
  assert list(tmp_path.glob(".a.jsonl.qwenjax-tmp-*"))  # killed between the rewrite and its replace
  a.run(kill_after=rng.uniform(0.1, 0.5) * 2 * t_load)  # while importing or loading (t_ref, uncached, was too late)
  a.run(kill_at_records=rng.randrange(5, 40))  # while decoding
  assert a.run(crash=("write:80",)) in ([-9], [0])  # [0]: fewer than 80 lines were left
  a.run()
  _check(a.out, keys, reference)
  assert (tmp_path / "a.jsonl.corrupt").exists()  # torn records were moved aside, not kept

  # B: one process, then two: the first's tearing its 15th record, the second's 25th, the first killed once
  # loaded, two random kills of both; then two processes finish.
  b = _Runs(job, tmp_path / "b.jsonl", rng)
  assert b.run(crash=("write:40",)) == [-9]
  assert b.run(2, crash=("write:15",))[0] == -9  # the other process is killed too, with its share unfinished
  assert b.run(2, crash=(None, "write:25"))[1] == -9
  assert b.run(2, crash=("load",))[0] == -9
  b.run(2, kill_after=rng.uniform(0.1, 0.5) * t_ref)
  b.run(2, kill_at_records=rng.randrange(5, 30))
  b.run(2)
  _check(b.out, keys, reference)

  # C: two processes killed while merging their parts at the end (10th merged record); one process killed while
  # merging those parts at its start (2 -> 1 hosts); one process finishes.
  c = _Runs(job, tmp_path / "c.jsonl", rng)
  assert c.run(2, crash=("merge:10",))[0] == -9
  assert sorted(p.name for p in tmp_path.glob("c.jsonl.part-*")) == ["c.jsonl.part-0", "c.jsonl.part-1"]
  assert c.run(crash=("merge:50",)) == [-9]
  c.run()
  _check(c.out, keys, reference)

  kills = a.kills + b.kills + c.kills
  print(f"{kills} kills in {time.monotonic() - began:.0f} s (reference run {t_ref:.1f} s)")
  for name, runs in (("A", a), ("B", b), ("C", c)):
    for entry in runs.log:
      print(name, entry)
  assert kills >= 12


def _wait_for_lines(runs: _Runs, proc: subprocess.Popen, more_than: int) -> None:
  """Until the job has written more than `more_than` lines (it is then serving), while it runs."""
  start = time.monotonic()
  while runs._written() <= more_than:  # pylint: disable=protected-access
    assert proc.poll() is None, "the job ended before it was signalled"
    assert time.monotonic() - start < 300, "a run hung"
    time.sleep(0.01)


def _foreign_lock(out: pathlib.Path) -> tuple[pathlib.Path, tuple]:
  """A `<output>.lock` the job did not create (an output named `Cargo` beside `Cargo.lock`), and its bytes and
  mtime."""
  foreign = out.with_name(out.name + ".lock")
  foreign.write_bytes(b"# This file is automatically generated by Cargo.\nversion = 3\n")
  os.utime(foreign, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
  return foreign, (foreign.read_bytes(), foreign.stat().st_mtime_ns)


def test_two_jobs_on_one_output_through_a_symlink_and_a_kill_beside_a_foreign_lock(job, tmp_path):
  """Issue 21, defects 2 and 3. (a) A second job on the same output through another spelling of it (a symlink in
  another directory) is refused with the one-job error while the first runs, and the first answers every id once.
  (b) A job SIGKILLed while it holds the lock, beside a `<output>.lock` it did not create: that file keeps its
  bytes and mtime, and the rerun answers every id once."""
  _, _, _, keys = job
  rng = random.Random(SEED)
  a = _Runs(job, tmp_path / "d.jsonl", rng)
  foreign, before = _foreign_lock(a.out)
  (tmp_path / "other").mkdir()
  link = tmp_path / "other" / "d.jsonl"
  link.symlink_to(a.out)
  first = a._start(None)  # pylint: disable=protected-access
  _wait_for_lines(a, first, 5)
  os.kill(first.pid, signal.SIGSTOP)  # held mid-job, lock and all, while the second starts
  try:
    second = subprocess.run(a.command(link), cwd=REPO, capture_output=True, text=True, env=a._env(None),  # pylint: disable=protected-access
                            timeout=300)
  finally:
    os.kill(first.pid, signal.SIGCONT)
  assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
  errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and re.fullmatch(
      rf"error: --output={re.escape(str(link))} is being written by another job \(pid {first.pid} on .*\); one job at "
      rf"a time \(its lock: {re.escape(str(a.out))}.qwenjax-lock\)\.", errors[0]), errors
  assert first.wait(timeout=300) == 0
  _check(a.out, keys, None, foreign=(foreign,))
  assert (foreign.read_bytes(), foreign.stat().st_mtime_ns) == before

  b = _Runs(job, tmp_path / "e.jsonl", rng)
  foreign, before = _foreign_lock(b.out)
  assert b.run(kill_at_records=rng.randrange(5, 40)) == [-9]  # SIGKILL while it holds the lock
  assert (foreign.read_bytes(), foreign.stat().st_mtime_ns) == before
  b.run()
  _check(b.out, keys, None, foreign=(foreign,))
  assert (foreign.read_bytes(), foreign.stat().st_mtime_ns) == before


def test_sigint_and_sigterm_flush_release_and_resume(job, tmp_path):
  """Issue 21, defect 8: Ctrl-C, then SIGTERM, each once the job is serving: exit status 130 and 143, one line
  saying how to resume, no traceback, no lock left (so no takeover warning next time); the last rerun answers
  every id once."""
  _, _, _, keys = job
  runs = _Runs(job, tmp_path / "f.jsonl", random.Random(SEED))
  for signum, status, name in ((signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")):
    before = runs._written()  # pylint: disable=protected-access
    proc = runs._start(None)  # pylint: disable=protected-access
    _wait_for_lines(runs, proc, before + 3)
    proc.send_signal(signum)
    assert proc.wait(timeout=300) == status
    stderr = _stderr(runs)
    assert "Traceback" not in stderr and "taking over the lock" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert lines == [f"interrupted ({name}); rerun the same command to resume."], stderr[-3000:]
    assert not list(tmp_path.glob("*lock")) and not list(tmp_path.glob(".*qwenjax-tmp*"))
    runs.log.append((name, status))
  runs.run()
  assert "taking over the lock" not in _stderr(runs, -1)
  _check(runs.out, keys, None)


def _stderr(runs: _Runs, entry: int | None = None) -> str:
  """The stderr of the run being made (entry None) or of log entry `entry`."""
  index = len(runs.log) if entry is None else entry % len(runs.log)
  return (runs.out.parent / f"{runs.out.stem}-stderr-{index}-0.txt").read_text()
