"""`launch.batch_generate` never destroys or silently rewrites a user's file, and each bad input line is its own
error record: the data-safety defects of issue 9, each reproduced (they failed before the fix), and a property
test of the results-file recovery against random garbage, truncations and concatenations."""

import json
import os
import pathlib
import random
import subprocess
import sys
import time

import pytest

from qwenjax.engine import jobs

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
  assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*.corrupt"))


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
  with jobs.OutputLock(str(out)):  # another job, here this process, is writing out.jsonl
    err = _error_line(_run(checkpoint, inp, out))
  assert "is being written by another job" in err and f"pid {os.getpid()} on" in err
  assert not out.exists()
  assert not (tmp_path / "out.jsonl.lock").exists()  # released by its holder


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
  assert not (tmp_path / "out.jsonl.lock").exists()


def test_a_stale_lock_from_a_killed_job_is_taken_over(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS[:2])
  (tmp_path / "out.jsonl.lock").write_text("pid 999999 on elsewhere since 2026-01-01T00:00:00+00:00\n")
  proc = _run(checkpoint, inp, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "taking over the lock" in proc.stderr and "pid 999999" in proc.stderr
  assert sorted(r["id"] for r in _records(out)) == ["r0", "r1"]


def test_a_killed_job_releases_its_lock(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_lines(inp, PROMPTS[:2])
  lock = tmp_path / "out.jsonl.lock"
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
      expected = jobs.scan_results(data).records  # the pure scan of the same bytes
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
  scan = jobs.scan_results(a + b + b"\xff\xfe{junk\n" + b"  " + a + b"\n" + b'{"id": "t", "text": "to')
  assert scan.records == [a, b, a]
  assert scan.ids == {'"a"', "2"}
  assert scan.corrupt == [(1, b"\xff\xfe{junk"), (3, b'{"id": "t", "text": "to')]
  assert not scan.terminated
