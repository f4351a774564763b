"""qwenjax/_files.py, the helpers every JSON reader, lock and report file goes through (issue 21), held to
hand-derived expectations: depth bounds with their column, one lock per real file, nothing foreign touched."""

import json
import os

import pytest

from qwenjax import InputError, _files


def test_json_nested_past_the_bound_is_a_decode_error_with_its_column():
  ok = "[" * _files.MAX_JSON_DEPTH + "]" * _files.MAX_JSON_DEPTH
  assert _files.loads(ok) == json.loads(ok)
  for depth in (_files.MAX_JSON_DEPTH + 1, 1_000, 50_000):  # past the bound, and past Python's recursion limit
    text = '{"a": "[[{", "b": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(json.JSONDecodeError) as e:
      _files.loads(text)
    # The bracket that opens level 101: the object is level 1, the string's brackets do not count.
    assert _files.describe(e.value) == f"nested deeper than 100 levels at column {text.index('[[[') + 100}"
  assert _files.loads(' {"s": "]]]}}}"} \n') == {"s": "]]]}}}"}
  with pytest.raises(json.JSONDecodeError, match="Extra data"):
    _files.loads('{"a": 1} {"b": 2}')


def test_one_lock_per_real_file_whatever_the_spelling(tmp_path):
  (tmp_path / "real").mkdir()
  target = tmp_path / "real" / "out.jsonl"
  target.write_text("")
  (tmp_path / "link.jsonl").symlink_to(target)
  assert _files.lock_path_for(tmp_path / "link.jsonl") == str(target) + ".qwenjax-lock"
  with _files.OwnedLock(_files.lock_path_for(target), "--output=out.jsonl"):
    with pytest.raises(InputError, match="being written by another job"):
      _files.OwnedLock(_files.lock_path_for(tmp_path / "link.jsonl"), "--output=link.jsonl").acquire()
  assert not os.path.exists(str(target) + ".qwenjax-lock")  # released: removed


def test_a_lock_path_that_is_not_ours_is_refused_untouched(tmp_path):
  foreign = tmp_path / "x.qwenjax-lock"
  foreign.write_bytes(b"someone else's\n")
  with pytest.raises(InputError, match="is not a qwenjax lock"):
    _files.OwnedLock(str(foreign), "--output=x").acquire()
  assert foreign.read_bytes() == b"someone else's\n"
  victim = tmp_path / "victim"
  victim.write_bytes(b"secret\n")
  link = tmp_path / "y.qwenjax-lock"
  link.symlink_to(victim)
  with pytest.raises(InputError, match="symbolic link"):
    _files.OwnedLock(str(link), "--output=y").acquire()
  assert victim.read_bytes() == b"secret\n" and link.is_symlink()


def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path):
  for left in (_files.LOCK_MARKER + b"pid 1 on gone since then\n", b""):  # killed after, or before, its marker
    path = tmp_path / "z.qwenjax-lock"
    path.write_bytes(left)
    lock = _files.OwnedLock(str(path), "--output=z").acquire()
    assert path.read_bytes().startswith(_files.LOCK_MARKER + f"pid {os.getpid()} ".encode())
    lock.release()
    assert not path.exists()


def test_report_files_are_written_only_over_our_own(tmp_path):
  path = tmp_path / "out.summary.json"
  _files.write_json(path, {"answered": 1}, marker="summary")
  assert json.loads(path.read_text()) == {"answered": 1, _files.MARKER_KEY: "summary"}
  _files.write_json(path, {"answered": 2}, marker="summary")
  assert json.loads(path.read_text())["answered"] == 2
  with pytest.raises(InputError, match="not written by qwenjax"):
    _files.write_json(path, {}, marker="progress")  # another kind of our files is not this one
  foreign = tmp_path / "notes.json"
  foreign.write_text('{"mine": true}\n')
  with pytest.raises(InputError, match="not written by qwenjax"):
    _files.write_json(foreign, {}, marker="summary")
  assert foreign.read_text() == '{"mine": true}\n' and not _files.remove_if_ours(foreign, "summary")
  assert _files.remove_if_ours(path, "summary") and not path.exists()
  assert not [p for p in os.listdir(tmp_path) if _files.TMP_INFIX in p]


def test_report_files_from_before_markers_are_ours(tmp_path):
  """A job begun with a qwenjax that wrote reports without a marker resumes after an upgrade: its summary and
  progress files (as the old `reports.summary` / `Progress.refresh` wrote them) are recognised, a user's are not."""
  old_summary = {"output": "out.jsonl", "lines": 3, "complete": True, "finished_at": "2026-11-30T10:00:00+00:00",
                 "records": 3, "answered": 3, "failed": 0, "missing": 0, "this_run": {"records": 3}}
  old_progress = {"done": 1, "total": 3, "fraction": 0.33, "elapsed_seconds": 2.0, "eta_seconds": 4.0,
                  "replicas": 1, "replicas_reporting": 1, "updated": "2026-11-30T10:00:00+00:00", "final": False}
  for name, old, marker in (("s.json", old_summary, "batch_generate summary"),
                            ("p.json", old_progress, "batch_generate progress")):
    path = tmp_path / name
    path.write_text(json.dumps(old))
    _files.write_json(path, {"new": 1}, marker=marker)
    assert json.loads(path.read_text()) == {"new": 1, _files.MARKER_KEY: marker}
    del old["final" if "final" in old else "this_run"]  # one of the keys every such file has is missing
    path.write_text(json.dumps(old))
    with pytest.raises(InputError, match="not written by qwenjax"):
      _files.write_json(path, {"new": 1}, marker=marker)


def test_a_tree_still_being_written_is_removed_once_its_writer_stops(tmp_path):
  """As after a failed Orbax save, another thread goes on writing into the directory (creating its folders again)
  while it is removed: remove_tree leaves nothing once the writer is done. One rmtree leaves files or the folder."""
  import threading
  import time

  tree = tmp_path / "partial"
  (tree / "params").mkdir(parents=True)
  stop = time.monotonic() + 0.5

  def writer():
    i = 0
    while time.monotonic() < stop:
      try:  # the remover deletes what this makes, at any moment: a writer that failed a write goes on writing
        os.makedirs(tree / "params" / f"w{i % 7}", exist_ok=True)
        (tree / "params" / f"w{i % 7}" / f"c{i}").write_bytes(b"x" * 64)
      except OSError:
        pass
      i += 1

  thread = threading.Thread(target=writer)
  thread.start()
  time.sleep(0.05)
  assert _files.remove_tree(tree, quiet=0.3)
  thread.join()
  assert list(tmp_path.iterdir()) == []
  assert _files.remove_tree(tmp_path / "absent")
