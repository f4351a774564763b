"""`launch.batch_generate` never destroys or silently rewrites a user's file, and each bad input line is its own
error record: the data-safety defects of issue 9, each reproduced (they failed before the fix), and a property
test of the results-file recovery against random garbage, truncations and concatenations."""

import contextlib
import gc
import json
import os
import pathlib
import random
import re
import resource
import signal
import subprocess
import sys
import time
import types

import pytest

from qwenjax import InputError, _files
from qwenjax.engine import job_parts, jobs, reports

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("safety"))
  build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  return d


PROMPTS = [{"id": f"r{i}", "prompt": f"def f{i}(x):"} for i in range(5)]


def _cmd(checkpoint, inp, out, *extra):
  return [sys.executable, "-m", "launch.batch_generate", f"--model={checkpoint}", f"--input={inp}",
          f"--output={out}", "--max_batch_size=2", "--max_new_tokens=4", "--max_seq_len=128", *extra]


def _run(checkpoint, inp, out, *extra):
  return subprocess.run(_cmd(checkpoint, inp, out, *extra), cwd=REPO, capture_output=True, text=True, timeout=600)


def _write_lines(path, objs):
  path.write_text("".join(json.dumps(o) + "\n" for o in objs))


def _records(path):
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _error_line(proc) -> str:
  """The single `error: ...` line a refused job prints (and no traceback)."""
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


# --- 1. files that are not the job's output are refused, untouched ---------------------------------------------


def test_an_existing_file_that_is_not_results_is_refused_untouched(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "notes.txt"
  _write_lines(inp, PROMPTS)
  notes = b"Meeting notes\nDo not lose these.\n"
  out.write_bytes(notes)
  err = _error_line(_run(checkpoint, inp, out))
  assert "holds no batch_generate results" in err and str(out) in err
  assert out.read_bytes() == notes
  # JSON whose first line is not an object (a traceback before), and another program's JSONL, likewise.
  for foreign in (b"[1, 2, 3]\n", b'{"id": "r0", "prompt": "def f0(x):"}\n'):
    out.write_bytes(foreign)
    assert "holds no batch_generate results" in _error_line(_run(checkpoint, inp, out))
    assert out.read_bytes() == foreign
  assert not list(tmp_path.glob("*lock")) and not list(tmp_path.glob("*.corrupt"))


def test_input_equal_to_output_is_refused(checkpoint, tmp_path):
  inp = tmp_path / "in.jsonl"
  _write_lines(inp, PROMPTS)
  before = inp.read_bytes()
  err = _error_line(_run(checkpoint, inp, inp))
  assert "is the input file" in err
  link = tmp_path / "link.jsonl"
  link.symlink_to(inp)
  assert "is the input file" in _error_line(_run(checkpoint, inp, link))
  assert inp.read_bytes() == before


@pytest.mark.parametrize("case", ["missing_dir", "output_dir", "input_dir", "missing_input"])
def test_bad_paths_are_one_error_line(checkpoint, tmp_path, case):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS)
  expected = {"missing_dir": "does not exist", "output_dir": "is a directory", "input_dir": "not a regular file",
              "missing_input": "no such file"}[case]
  if case == "missing_dir":
    out = tmp_path / "nope" / "out.jsonl"
  elif case == "output_dir":
    out = tmp_path
  elif case == "input_dir":
    inp = tmp_path
  else:
    inp = tmp_path / "missing.jsonl"
  assert expected in _error_line(_run(checkpoint, inp, out))


@pytest.mark.parametrize("flag, message", [
    ("--max_new_tokens=0", "error: --max_new_tokens: 0 is not a positive integer."),
    ("--max_seq_len=-5", "error: --max_seq_len: -5 is not a positive integer."),
    ("--top_p=0", "error: --top_p: "),
    ("--duplicate_ids=drop", "error: --duplicate_ids: "),
])
def test_bad_flags_are_one_error_line(checkpoint, tmp_path, flag, message):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS)
  assert _error_line(_run(checkpoint, inp, out, flag)).startswith(message)
  assert not out.exists()


# --- 2, 4, 8. bad input lines, resume without loss, no repeated errors ------------------------------------------


def test_bad_bytes_resume_and_rerun(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  lines = [json.dumps(o).encode() for o in PROMPTS]
  lines[0] = b"\xef\xbb\xbf" + lines[0]  # a UTF-8 BOM: line 1 is served as usual
  lines.insert(2, b'{"id": "latin1", "prompt": "caf\xe9"}')  # one non-UTF-8 byte in one line
  lines.insert(3, b"[1, 2]")  # JSON, not an object
  lines.insert(4, b"{broken")
  inp.write_bytes(b"\n".join(lines) + b"\n")
  proc = _run(checkpoint, inp, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = {r["id"]: r for r in _records(out)}
  assert set(records) == {"r0", "r1", "r2", "r3", "r4", "latin1", "line-4", "line-5"}
  assert all("error" not in records[f"r{i}"] for i in range(5))
  assert records["latin1"]["error"] == f"{inp}:3: not valid UTF-8 (byte 0xe9 at column 32)."
  assert records["line-4"]["error"] == f"{inp}:4: expected a JSON object, got an array."
  assert records["line-5"]["error"].startswith(f"{inp}:5: malformed JSON")
  assert {records[k]["code"] for k in ("latin1", "line-4", "line-5")} == {"invalid_json"}
  complete = out.read_bytes()

  # A rerun of a finished job appends nothing: error records are not written again.
  proc = _run(checkpoint, inp, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.read_bytes() == complete

  # Garbage in the middle and a last record without its newline: every valid record after the garbage is kept
  # (they were deleted and regenerated before), the garbage is kept aside, the torn record's id alone is redone.
  kept = complete.splitlines(keepends=True)
  torn = kept[-1][: len(kept[-1]) // 2]
  damaged = kept[0] + b"\x00garbage\xff{not a record}\n" + b"".join(kept[1:7]) + torn
  out.write_bytes(damaged)
  proc = _run(checkpoint, inp, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "moved to" in proc.stderr and ".corrupt" in proc.stderr
  after = out.read_bytes()
  assert after.startswith(b"".join(kept[:7]))  # every record that was whole, byte for byte, in order
  resumed = _records(out)
  assert sorted(r["id"] for r in resumed) == sorted(records)  # each id once
  assert {r["id"]: r for r in resumed} == records  # the redone record equals the first run's (greedy)
  side = (tmp_path / "out.jsonl.corrupt").read_bytes()
  assert b"\x00garbage\xff{not a record}" in side and torn in side


def test_a_record_without_newline_is_not_glued_to_the_next(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS[:3])
  assert _run(checkpoint, inp, out).returncode == 0
  first = out.read_bytes().splitlines()[0]
  out.write_bytes(first)  # one whole record, its newline lost
  assert _run(checkpoint, inp, out).returncode == 0
  assert out.read_bytes().startswith(first + b"\n")
  assert sorted(r["id"] for r in _records(out)) == ["r0", "r1", "r2"]
  assert not (tmp_path / "out.jsonl.corrupt").exists()


def test_duplicate_ids_are_an_error_before_decoding_or_keep_first(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, [PROMPTS[0], PROMPTS[1], {"id": "r0", "prompt": "another"}, PROMPTS[2]])
  err = _error_line(_run(checkpoint, inp, out))
  assert f'id "r0" is on {inp}:1 and {inp}:3' in err and "--duplicate_ids=keep_first" in err
  assert not out.exists()
  proc = _run(checkpoint, inp, out, "--duplicate_ids=keep_first")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(r["id"] for r in _records(out)) == ["r0", "r1", "r2"]


# --- 3. one job per output --------------------------------------------------------------------------------------


def test_a_second_job_on_the_same_output_is_refused(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS)
  link = tmp_path / "link.jsonl"  # issue 21, defect 2: another spelling of the same file finds the same lock
  link.symlink_to(out)
  with jobs.OutputLock(str(link)):  # another job, here this process, is writing out.jsonl through the link
    err = _error_line(_run(checkpoint, inp, out))
  assert "is being written by another job" in err and f"pid {os.getpid()} on" in err
  assert not out.exists()
  assert not list(tmp_path.glob("*lock"))  # released by its holder


def test_two_jobs_started_together_write_each_id_once(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS)
  both = [subprocess.Popen(_cmd(checkpoint, inp, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for _ in range(2)]
  results = [(p.returncode, err) for p in both for _, err in [p.communicate(timeout=600)]]
  # Each job holds the lock from before its model loads to its end: the one that starts second is refused,
  # unless the first had already finished (then the second has nothing left to do). Never twice the work.
  refused = [err for code, err in results if code != 0]
  assert all("is being written by another job" in err for err in refused), refused
  assert len(refused) <= 1
  assert sorted(r["id"] for r in _records(out)) == sorted(p["id"] for p in PROMPTS)  # each once
  assert not list(tmp_path.glob("*lock"))


def test_a_stale_lock_from_a_killed_job_is_taken_over(checkpoint, tmp_path):
  """A lock a killed job left is taken over; a `<output>.lock` the job did not create (issue 21, defect 3: here a
  symlink to someone's file, as an attacker would plant in a shared directory) is never opened, printed or
  deleted."""
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS[:2])
  stale = pathlib.Path(_files.lock_path_for(out))
  stale.write_bytes(_files.LOCK_MARKER + b"pid 999999 on elsewhere since 2026-01-01T00:00:00+00:00\n")
  victim, planted = tmp_path / "victim.txt", tmp_path / "out.jsonl.lock"
  victim.write_bytes(b"pid 4242 secret: hunter2\n")
  planted.symlink_to(victim)
  before = [_untouched(planted), _untouched(victim)]
  proc = _run(checkpoint, inp, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "taking over the lock" in proc.stderr and "pid 999999" in proc.stderr and "hunter2" not in proc.stderr
  assert sorted(r["id"] for r in _records(out)) == ["r0", "r1"]
  assert [_untouched(planted), _untouched(victim)] == before
  assert not stale.exists()


def test_a_killed_job_releases_its_lock(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS[:2])
  lock = pathlib.Path(_files.lock_path_for(out))
  job = subprocess.Popen(_cmd(checkpoint, inp, out), cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
    time.sleep(0.05)
  job.kill()  # kill -9
  job.wait()
  proc = _run(checkpoint, inp, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(r["id"] for r in _records(out)) == ["r0", "r1"]


# --- The recovery itself: random damage never loses a record that is still whole ---------------------------------


def _record(i: int, rng: random.Random) -> dict:
  if rng.random() < 0.2:
    return {"id": i, "error": f"line {i}: malformed JSON"}
  text = "".join(rng.choice("ab {}\"\\\n\tç好🙂") for _ in range(rng.randrange(0, 30)))
  return {"id": f"k{i}", "text": text, "token_ids": [rng.randrange(1000) for _ in range(3)],
          "finish_reason": rng.choice(["stop", "length"]), "usage": {"prompt_tokens": 3, "completion_tokens": 3}}


def _damage(data: bytes, rng: random.Random) -> bytes:
  kind = rng.choice(["garbage", "truncate", "concatenate", "splice"])
  at = rng.randrange(len(data) + 1)
  if kind == "garbage":
    junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    return data[:at] + junk + data[at:]
  if kind == "truncate":
    return data[:at]
  if kind == "concatenate":  # a newline lost: two records on one line
    newlines = [i for i, b in enumerate(data) if b == 10]
    if not newlines:
      return data
    i = rng.choice(newlines)
    return data[:i] + data[i + 1:]
  start = rng.randrange(len(data) + 1)  # a copy of another stretch of the file pasted in
  return data[:at] + data[start:start + rng.randrange(200)] + data[at:]


def _unblank(data: bytes) -> bytes:
  return data.translate(None, b" \t\r\n")


def _whole_lines(data: bytes) -> set[bytes]:
  """The records an independent reader sees intact: lines that parse, alone, as a record."""
  whole = set()
  for line in data.split(b"\n"):
    try:
      if jobs.is_result(json.loads(line.decode("utf-8"))):
        whole.add(line.strip(b" \t\r"))
    except ValueError:
      pass
  return whole


def _scan(data: bytes) -> types.SimpleNamespace:
  """What a results file's bytes hold, split line by line as `jobs.recover` splits them (nothing read or written):
  records, each valid record's exact bytes (no newline) in file order; ids, their record_key()s; corrupt, (line
  number, bytes) of every region that is not a record; terminated, whether the data ends with a newline."""
  scan = types.SimpleNamespace(records=[], ids=set(), corrupt=[], terminated=not data or data.endswith(b"\n"))
  for number, line in enumerate(data.split(b"\n"), 1):
    records, corrupt = jobs._split_line(line)  # pylint: disable=protected-access
    scan.records.extend(r for r, _ in records)
    scan.ids.update(k for _, k in records)
    scan.corrupt.extend((number, c) for c in corrupt)
  return scan


@pytest.mark.parametrize("seed", range(6))
def test_random_damage_between_reruns_never_loses_a_whole_record(tmp_path, seed):
  rng = random.Random(seed)
  out = str(tmp_path / "out.jsonl")
  serial = 0
  for _ in range(25):  # rerun after rerun: recover, append what the job would, damage the file
    if os.path.exists(out):
      data = pathlib.Path(out).read_bytes()
      whole = _whole_lines(data)
      corrupt_before = pathlib.Path(out + ".corrupt").read_bytes() if os.path.exists(out + ".corrupt") else b""
      expected = _scan(data).records  # the pure scan of the same bytes
      try:
        jobs.recover(out)
      except jobs.InputError:
        # Refused only when not one record is left whole; the file is then untouched.
        assert not whole and pathlib.Path(out).read_bytes() == data
        os.remove(out)
        continue
      after = pathlib.Path(out).read_bytes()
      assert whole <= set(after.split(b"\n"))  # nothing that was whole is lost
      assert after == b"".join(r + b"\n" for r in expected)  # only records, each newline-terminated
      assert all(jobs.is_result(json.loads(r)) for r in expected)
      # Every byte that is not in a record is kept aside, in order; only blanks between records are dropped.
      aside = (pathlib.Path(out + ".corrupt").read_bytes() if os.path.exists(out + ".corrupt") else b"")
      assert aside.startswith(corrupt_before)
      if aside:  # created by the job: its header line first (not a byte of the output)
        assert aside.startswith(jobs.CORRUPT_HEADER)
        corrupt_before = corrupt_before or jobs.CORRUPT_HEADER
      assert sorted(_unblank(after + aside[len(corrupt_before):])) == sorted(_unblank(data))
    with jobs.ResultWriter(out) as writer:
      for _ in range(rng.randrange(1, 4)):
        writer.write(_record(serial, rng))
        serial += 1
    data = pathlib.Path(out).read_bytes()
    for _ in range(rng.randrange(0, 3)):
      data = _damage(data, rng)
    pathlib.Path(out).write_bytes(data)


def test_glued_and_garbage_separated_records_are_split_apart():
  a = json.dumps({"id": "a", "error": "x"}).encode()
  b = json.dumps({"id": 2, "text": "}{", "token_ids": [1], "finish_reason": "stop", "usage": {}}).encode()
  scan = _scan(a + b + b"\xff\xfe{junk\n" + b"  " + a + b"\n" + b'{"id": "t", "text": "to')
  assert scan.records == [a, b, a]
  assert scan.ids == {'"a"', "2"}
  assert scan.corrupt == [(1, b"\xff\xfe{junk"), (3, b'{"id": "t", "text": "to')]
  assert not scan.terminated


# --- Issue 21: files beside the output that the job did not create; locks per file; full disks ----------------


def _results(n: int, prefix: str = "k") -> bytes:
  return b"".join(json.dumps({"id": f"{prefix}{i}", "text": "x" * 20, "token_ids": [1, 2], "finish_reason": "stop",
                              "usage": {"prompt_tokens": 2, "completion_tokens": 2}}).encode() + b"\n"
                  for i in range(n))


def _untouched(path: pathlib.Path):
  """(bytes, mtime) of a file, or of a link and its target: what 'untouched' compares."""
  st = os.stat(path, follow_symlinks=False)
  return (os.readlink(path) if path.is_symlink() else path.read_bytes()), st.st_mtime_ns


def test_the_lock_is_per_file_not_per_spelling(tmp_path):
  """Issue 21, defect 2: a symlink (or any second path) to the output finds the same lock."""
  out = tmp_path / "out.jsonl"
  out.write_bytes(_results(1))
  link = tmp_path / "elsewhere" / "link.jsonl"
  link.parent.mkdir()
  link.symlink_to(out)
  with jobs.OutputLock(str(link)):
    for spelling in (out, tmp_path / "elsewhere" / ".." / "out.jsonl"):
      with pytest.raises(InputError, match=r"is being written by another job \(pid \d+ on .*\); one job at a time"):
        jobs.OutputLock(str(spelling)).acquire()
  assert not list(tmp_path.rglob("*lock"))  # released, by its holder


def test_an_output_with_several_hard_links_is_refused(tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_bytes(_results(1))
  os.link(out, tmp_path / "other.jsonl")
  with pytest.raises(InputError, match=r"--output=.*out.jsonl: has 2 hard links"):
    jobs.OutputLock(str(out)).acquire()
  assert not list(tmp_path.glob("*lock"))


def test_recovery_rewrites_the_file_a_symlinked_output_names(tmp_path):
  real = tmp_path / "data" / "out.jsonl"
  real.parent.mkdir()
  real.write_bytes(_results(2) + b"garbage\n" + b'{"id": "torn", "te')
  link = tmp_path / "link.jsonl"
  link.symlink_to(real)
  found = jobs.recover(str(link))
  assert found.ids == {'"k0"', '"k1"'} and found.corrupt == 2
  assert link.is_symlink() and os.readlink(link) == str(real)  # still the link, not a regular copy
  assert real.read_bytes() == _results(2)  # the real file rewritten
  assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]


def test_a_deeply_nested_corrupt_region_is_moved_aside(tmp_path):
  """Issue 21, defect 1: deep nesting in the output is garbage like any other, not a RecursionError (whatever the
  interpreter's recursion limit: jax raises it to 3,000)."""
  out = tmp_path / "out.jsonl"
  deep = b'{"id": "d", "error": ' + b'{"a": ' * 20000 + b"1" + b"}" * 20000 + b"}"
  out.write_bytes(_results(1) + b"[" * 1000 + b"\n" + deep + b"\n" + _results(2)[-len(_results(1)):])
  found = jobs.recover(str(out))
  assert found.ids == {'"k0"', '"k1"'} and found.corrupt == 2
  assert out.read_bytes() == _results(2)
  side = (tmp_path / "out.jsonl.corrupt").read_bytes().split(b"\n")
  assert side[1:] == [b"[" * 1000, deep, b""]  # after the header line, the regions in order
  every, _ = reports.count_results(str(out))
  assert every["records"] == 2


def test_corrupt_file_is_created_with_a_header_and_only_ours_is_appended_to(tmp_path):
  """Issue 21, defect 3: <output>.corrupt is created by the job (O_EXCL, a header line of its own) or refused."""
  out, side = tmp_path / "out.jsonl", tmp_path / "out.jsonl.corrupt"
  out.write_bytes(_results(1) + b"junk one\n")
  jobs.recover(str(out))
  first = side.read_bytes()
  assert first.startswith(jobs.CORRUPT_HEADER) and first.endswith(b"junk one\n")
  out.write_bytes(_results(1) + b"junk two\n")
  jobs.recover(str(out))
  assert side.read_bytes() == first + b"junk two\n"  # ours: appended to
  # A .corrupt that the job did not create (no header), or a link: refused, nothing touched.
  victim = tmp_path / "victim.txt"
  victim.write_bytes(b"someone's file\n")
  for foreign in ("plain", "link"):
    side.unlink()
    if foreign == "plain":
      side.write_bytes(b"someone's notes\n")
    else:
      side.symlink_to(victim)
    out.write_bytes(_results(1) + b"junk three\n")
    before = {p: _untouched(p) for p in (out, side, victim)}
    with pytest.raises(InputError, match=r"out.jsonl.corrupt.* (not written by qwenjax|symbolic link).*refusing"):
      jobs.recover(str(out))
    assert {p: _untouched(p) for p in (out, side, victim)} == before


def test_only_our_temporaries_are_removed(tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_bytes(_results(1))
  users = [tmp_path / "out.jsonl.tmp-notes", tmp_path / "out.jsonl.tmp-123"]
  for p in users:
    p.write_bytes(b"keep me\n")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  stale = pathlib.Path(_files.temporary_path(out).rsplit("-", 1)[0] + "-" + dead.stdout.strip())
  stale.write_bytes(b"half a rewrite")
  jobs.recover(str(out))
  assert all(p.read_bytes() == b"keep me\n" for p in users)
  assert not stale.exists()  # a killed job's rewrite, by our own name


def test_report_files_that_are_not_ours_are_refused_untouched(tmp_path):
  """Issue 21, defect 3: progress and summary files are written only over files of our own (a marker), and a
  rerun removes only per-host progress files and temporaries that are ours."""
  out = str(tmp_path / "out.jsonl")
  ours = {"done": 1}
  _files.write_json(out + ".progress-1.json", ours, marker=reports.REPLICA_MARKER)
  foreign = {pathlib.Path(out + ".progress-2.json"): b'{"done": 5}\n',
             pathlib.Path(out + ".progress.json.tmp-keep"): b"mine\n",
             pathlib.Path(out + ".summary.json.tmp-1"): b"mine\n"}
  for p, data in foreign.items():
    p.write_bytes(data)
  with pytest.raises(InputError, match=r"out.jsonl.progress-2.json exists and was not written by qwenjax"):
    reports.prepare(out)
  assert not os.path.exists(out + ".progress-1.json")  # ours: gone
  assert all(p.read_bytes() == data for p, data in foreign.items())
  pathlib.Path(out + ".progress-2.json").unlink()
  reports.prepare(out)
  for name in (".summary.json", ".progress.json"):
    pathlib.Path(out + name).write_bytes(b'{"answered": 3}\n')
    with pytest.raises(InputError, match=f"out.jsonl{name} exists and was not written by qwenjax"):
      reports.prepare(out)
    assert pathlib.Path(out + name).read_bytes() == b'{"answered": 3}\n'
    pathlib.Path(out + name).unlink()


def test_parts_that_are_links_or_not_results_are_refused_untouched(tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_bytes(_results(1))
  elsewhere = tmp_path / "elsewhere.jsonl"
  elsewhere.write_bytes(_results(3, "e"))
  part = tmp_path / "out.jsonl.part-1"
  part.symlink_to(elsewhere)
  with pytest.raises(InputError, match=r"out.jsonl.part-1 is a symbolic link.*refusing"):
    job_parts.existing_parts(str(out))
  assert part.is_symlink() and elsewhere.read_bytes() == _results(3, "e")
  part.unlink()
  part.write_bytes(_results(2, "p"))
  (tmp_path / "out.jsonl.part-2").write_bytes(b"")  # a replica killed before its first record
  parts = job_parts.existing_parts(str(out))
  assert job_parts.merge_parts(str(out), parts) == 2
  assert not part.exists() and not (tmp_path / "out.jsonl.part-2").exists()
  assert out.read_bytes() == _results(1) + _results(2, "p")


@contextlib.contextmanager
def _file_size_limit(limit: int):
  """A full disk without mounting one: past `limit` bytes a file cannot grow (EFBIG; Python ignores SIGXFSZ)."""
  old = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old)
    signal.signal(signal.SIGXFSZ, handler)


def test_recovery_on_a_full_disk_is_one_error_and_leaves_nothing_behind(tmp_path):
  """Issue 21, defect 9: no 0-byte temporary, no empty .corrupt; the output and an earlier .corrupt unchanged."""
  out, side = tmp_path / "out.jsonl", tmp_path / "out.jsonl.corrupt"
  out.write_bytes(_results(200) + b"junk\n" + b'{"id": "torn"')
  assert out.stat().st_size > 16384
  before = out.read_bytes()
  with _file_size_limit(16384), pytest.raises(InputError) as error:
    jobs.recover(str(out))
  assert re.fullmatch(r"--output=\S+out.jsonl: writing \S+ failed \(File too large\)\. The output is unchanged; "
                      r"rerun the same command once that is fixed\.", str(error.value)), str(error.value)
  assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
  # The .corrupt itself cannot grow: an earlier one keeps its bytes.
  jobs.recover(str(out))
  kept = side.read_bytes()
  out.write_bytes(_results(1) + b"x" * 20000 + b"\n")
  before = out.read_bytes()
  with _file_size_limit(16384), pytest.raises(InputError, match=r"out.jsonl.corrupt failed \(File too large\)"):
    jobs.recover(str(out))
  assert out.read_bytes() == before and side.read_bytes() == kept
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.corrupt"]


def test_report_files_on_a_full_disk_are_one_error_and_no_temporary(tmp_path):
  out = str(tmp_path / "out.jsonl")
  progress = reports.Progress(out, replica=0, replicas=1, total=1, every=0)
  with _file_size_limit(64):
    with pytest.raises(InputError, match=r"out.jsonl.summary.json: writing \S+ failed \(File too large\)"):
      reports.write_summary(out, {"answered": 1, "padding": "x" * 100})
    with pytest.raises(InputError, match=r"out.jsonl.progress.json: writing \S+ failed \(File too large\)"):
      progress.close()
  assert not list(tmp_path.iterdir())


def test_reports_that_do_not_fit_after_every_record_is_written(checkpoint, tmp_path):
  """Issue 21, defect 9: the records fit, the summary does not (a file may not grow past 600 bytes: 2 records
  do, a summary does not): one error line saying so, exit status 1, no temporary left; a rerun with space adds no
  record and writes the summary."""
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS[:2])

  def full_disk():
    resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))

  proc = subprocess.run(_cmd(checkpoint, inp, out), cwd=REPO, capture_output=True, text=True, timeout=600,
                        preexec_fn=full_disk)
  err = _error_line(proc)
  assert proc.returncode == 1
  assert re.fullmatch(r"error: --output=\S+out.jsonl: every record is written \(2 answered, 0 failed\), but its "
                      r"report files are not: \S+out.jsonl.summary.json: writing \S+ failed \(File too large\)\. "
                      r"Rerun the same command once there is space: it adds no record and writes them\.", err), err
  records = out.read_bytes()
  assert sorted(r["id"] for r in _records(out)) == ["r0", "r1"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.progress.json"]
  proc = _run(checkpoint, inp, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.read_bytes() == records
  summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
  assert (summary["answered"], summary["missing"], summary["this_run"]["records"]) == (2, 0, 0)


def test_an_interrupt_that_strikes_inside_a_gc_callback_is_not_lost(capsys):
  """Issue 21, defect 8: jax's gc callback runs often; a SIGINT whose KeyboardInterrupt is raised inside it was
  swallowed by Python ("Exception ignored ... Traceback") and the job went on to exit 0. Now it is raised again
  at the job's next safe point: exit status 130 and the one line."""
  from launch import _cli  # pylint: disable=g-import-not-at-top

  fired, reached = [], []

  def callback(phase, info):
    del info
    if phase == "start" and not fired:
      fired.append(phase)
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(1000):  # Python code inside the callback: the handler runs here
        pass

  def main(argv):
    del argv
    gc.callbacks.append(callback)
    try:
      gc.collect()
    finally:
      gc.callbacks.remove(callback)
    reached.append("after the collection")
    _cli.check_interrupted()  # a safe point of the job's loop
    reached.append("past the safe point")

  try:
    with pytest.raises(SystemExit) as exit_:
      _cli.interruptible(main, "rerun the same command to resume")([])
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.unraisablehook = sys.__unraisablehook__
  assert fired and reached == ["after the collection"] and exit_.value.code == 130
  assert capsys.readouterr().err == "interrupted (SIGINT); rerun the same command to resume.\n"


def test_the_error_line_stays_the_last_line_when_a_write_left_a_coroutine_unawaited():
  """A failed orbax write can leave an async serialization coroutine that was never awaited; Python warns of it at
  exit ("sys:1: RuntimeWarning: coroutine ... was never awaited"), which once came after convert's error line. The
  CLI's error is the one line and the last."""
  script = ("from launch import _cli\n"
            "async def write_fragment(): pass\n"
            "pending = write_fragment()\n"
            "_cli.fail('out: writing the checkpoint failed (disk full)')\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == ["error: out: writing the checkpoint failed (disk full)."], proc.stderr
