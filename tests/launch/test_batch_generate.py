"""`python -m launch.batch_generate`: every line answered or recorded as an error, and a killed job resumes."""

import json
import pathlib
import subprocess
import sys

import pytest

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("batch"))
  build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  return d


GOOD = [
    {"id": "a", "prompt": "def fibonacci(n):"},
    {"id": "b", "messages": [{"role": "user", "content": "Write a haiku"}], "sampling": {"max_tokens": 3}},
    {"id": "c", "prompt": "The quick brown fox", "sampling": {"temperature": 0.8, "seed": 3, "n": 2}},
    {"id": 7, "prompt": "import numpy as np", "sampling": {"stop": ["\n"], "logprobs": True}},
]
BAD = {
    "line-5": "{not json",
    "d": json.dumps({"id": "d"}),
    "e": json.dumps({"id": "e", "prompt": "hi", "sampling": {"temperature": -1}}),
    "f": json.dumps({"id": "f", "prompt": "x " * 400}),
    "g": json.dumps({"id": "g", "messages": "not a list"}),
    "h": json.dumps({"id": "h", "prompt": "hi", "sampling": {"top_q": 0.5}}),
}


def _write_input(path):
  lines = [json.dumps(x) for x in GOOD[:4]] + list(BAD.values())
  path.write_text("\n".join(lines) + "\n")


def _run(checkpoint, inp, out):
  return subprocess.run([sys.executable, "-m", "launch.batch_generate", f"--model={checkpoint}", f"--input={inp}",
                         f"--output={out}", "--max_batch_size=2", "--max_new_tokens=8", "--max_seq_len=256"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)


def _records(out):
  return [json.loads(line) for line in out.read_text().splitlines()]


def test_every_line_is_answered_or_recorded(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_input(inp)
  proc = _run(checkpoint, inp, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = {json.dumps(r["id"]): r for r in _records(out)}
  assert len(records) == len(_records(out)) == len(GOOD) + len(BAD)  # one line each, no duplicates
  for x in GOOD:
    r = records[json.dumps(x["id"])]
    assert "error" not in r, r
    assert r["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in r.get("choices", [r]))
    assert r["finish_reason"] in ("stop", "length")
  assert len(records['"b"']["token_ids"]) <= 3
  assert [c["index"] for c in records['"c"']["choices"]] == [0, 1]
  assert "\n" not in records["7"]["text"] and len(records["7"]["logprobs"]) == len(records["7"]["token_ids"])
  errors = {k: records[json.dumps(k)]["error"] for k in BAD}
  assert "malformed JSON" in errors["line-5"] and errors["line-5"].startswith(f"{inp}:5: ")  # names file and line
  assert "needs a 'prompt' or 'messages'" in errors["d"]
  assert "temperature" in errors["e"]
  assert "the context holds 256" in errors["f"]
  assert "'messages' must be a list" in errors["g"]
  assert "top_q" in errors["h"]
  assert "req" in proc.stderr and "tok/s" in proc.stderr  # the progress line


def test_a_killed_job_resumes_without_duplicates(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_input(inp)
  assert _run(checkpoint, inp, out).returncode == 0
  complete = {json.dumps(r["id"]): r for r in _records(out)}
  # As if killed: two answers kept, the third torn mid-line.
  lines = out.read_text().splitlines(keepends=True)
  out.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
  proc = _run(checkpoint, inp, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = _records(out)
  assert len(resumed) == len(complete)
  # Greedy and seeded requests answer the same whichever run served them.
  assert {json.dumps(r["id"]): r for r in resumed} == complete
