"""`python -m launch.batch_generate`: every line answered or recorded as an error, and a killed job resumes."""

import json
import pathlib
import subprocess
import sys

import numpy as np
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
    {"id": 7, "prompt": "import numpy as np", "sampling": {"stop": ["\n"], "logprobs": True, "top_logprobs": 2}},
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


def _run(checkpoint, inp, out, *extra):
  return subprocess.run([sys.executable, "-m", "launch.batch_generate", f"--model={checkpoint}", f"--input={inp}",
                         f"--output={out}", "--max_batch_size=2", "--max_new_tokens=8", "--max_seq_len=256", *extra],
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
  tops = records["7"]["top_logprobs"]
  assert len(tops) == len(records["7"]["token_ids"]) and all(len(t) == 2 for t in tops)
  for top, lp in zip(tops, records["7"]["logprobs"]):  # greedy: the chosen token is the most likely one
    assert top[0]["logprob"] >= top[1]["logprob"] and abs(top[0]["logprob"] - lp) < 1e-5
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


def test_a_speculative_job_answers_as_a_plain_one_and_reports_its_acceptance(checkpoint, tmp_path):
  """--speculative_method=ngram: every record equal to the plain job's (greedy, seeded sampling, stops, n = 2,
  logprobs); the summary counts the proposals and the progress line shows the acceptance."""
  inp = tmp_path / "in.jsonl"
  _write_input(inp)
  plain, spec = tmp_path / "plain.jsonl", tmp_path / "spec.jsonl"
  proc = _run(checkpoint, inp, spec, "--speculative_method=ngram", "--num_speculative_tokens=3",
              "--prompt_lookup_min=1", "--max_new_tokens=24")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _run(checkpoint, inp, plain, "--max_new_tokens=24").returncode == 0
  # The verify step's logits come from a forward of several rows: equal to a decode step's to float32 rounding.
  strip = lambda records: {json.dumps(r["id"]): {k: v for k, v in r.items() if k != "usage"} for r in records}
  got, want = strip(_records(spec)), strip(_records(plain))
  assert _skeleton(got) == _skeleton(want)
  np.testing.assert_allclose(_floats(got), _floats(want), atol=1e-4)
  summary = json.loads(pathlib.Path(str(spec) + ".summary.json").read_text())
  counts = summary["this_run"]["speculation"]
  assert counts["spec_proposed_tokens"] >= counts["spec_accepted_tokens"] > 0, counts
  assert "accepted " in proc.stderr and "mean length" in proc.stderr


def _skeleton(value):
  """value with every float replaced by None (lists and dicts walked in order)."""
  if isinstance(value, float):
    return None
  if isinstance(value, list):
    return [_skeleton(v) for v in value]
  if isinstance(value, dict):
    return {k: _skeleton(v) for k, v in sorted(value.items())}
  return value


def _floats(value) -> list[float]:
  """Every float of value, in `_skeleton`'s order."""
  if isinstance(value, float):
    return [value]
  if isinstance(value, list):
    return [f for v in value for f in _floats(v)]
  if isinstance(value, dict):
    return [f for _, v in sorted(value.items()) for f in _floats(v)]
  return []


COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer",
         "minimum": 0, "maximum": 99}}, "required": ["color", "n"], "additionalProperties": False}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"], "additionalProperties": False}}}


def _openai_line(custom_id, **body):
  return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": "qwen", "messages": [{"role": "user", "content": "Add two numbers"}], **body}}


def test_a_glob_of_simple_and_openai_files_with_constraints(checkpoint, tmp_path):
  """Two input files named by a glob, one per format: JSON-schema outputs sampled at temperature 1 validate,
  a named tool_choice (one call) and "required" (one or more: this random model goes on to max_tokens) become
  tool_calls, an invalid schema is that line's error (the others
  are served), metadata passes through untouched, and the summary counts every line."""
  import jsonschema  # pylint: disable=g-import-not-at-top
  import openai.types.chat as oai_chat  # pylint: disable=g-import-not-at-top

  simple = [{"id": "s1", "messages": [{"role": "user", "content": "Add 2 and 3"}], "tools": [ADD],
             "tool_choice": {"type": "function", "function": {"name": "add"}},
             "sampling": {"max_tokens": 60, "temperature": 1.0, "seed": 1},
             "metadata": {"split": "train", "n": [1, 2]}},
            {"id": "s2", "prompt": "A color:", "sampling": {"temperature": 1.0, "seed": 2, "max_tokens": 40},
             "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR}}}]
  fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR}}
  batch = [_openai_line("o1", response_format=fmt, temperature=1.0, seed=3, n=2, max_tokens=40),
           _openai_line("o2", tools=[ADD], tool_choice="required", max_tokens=60, temperature=1.0, seed=4) | {
               "metadata": {"keep": True}},
           _openai_line("o3", response_format={"type": "json_schema", "json_schema": {
               "name": "bad", "schema": {"type": "nope"}}})]
  (tmp_path / "in-1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in simple))
  (tmp_path / "in-2.jsonl").write_text("".join(json.dumps(x) + "\n" for x in batch))
  out = tmp_path / "out.jsonl"
  proc = subprocess.run([sys.executable, "-m", "launch.batch_generate", f"--model={checkpoint}",
                         f"--input={tmp_path}/in-*.jsonl", f"--output={out}", "--max_batch_size=4",
                         "--max_seq_len=1024"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = _records(out)
  by_id = {r.get("custom_id", r.get("id")): r for r in records}
  assert sorted(by_id) == ["o1", "o2", "o3", "s1", "s2"] and len(records) == 5

  s1 = by_id["s1"]
  assert s1["metadata"] == {"split": "train", "n": [1, 2]} and s1["finish_reason"] == "stop", s1
  [call] = s1["tool_calls"]  # a named function: exactly one call
  assert call["function"]["name"] == "add" and "tool_call_errors" not in s1
  jsonschema.validate(json.loads(call["function"]["arguments"]), ADD["function"]["parameters"])
  jsonschema.validate(json.loads(by_id["s2"]["text"]), COLOR)

  o1 = oai_chat.ChatCompletion.model_validate(by_id["o1"]["response"]["body"])
  assert len(o1.choices) == 2
  for choice in o1.choices:
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), COLOR)
  o2 = oai_chat.ChatCompletion.model_validate(by_id["o2"]["response"]["body"])
  assert by_id["o2"]["metadata"] == {"keep": True}
  calls = o2.choices[0].message.tool_calls
  assert o2.choices[0].finish_reason in ("tool_calls", "length") and calls
  for call in calls:
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
  o3 = by_id["o3"]
  assert o3["response"]["status_code"] == 400 and "invalid JSON schema" in o3["error"]["message"], o3
  assert o3["error"]["message"].startswith(f"{tmp_path}/in-2.jsonl:3: ")

  summary = json.loads(pathlib.Path(f"{out}.summary.json").read_text())
  assert summary["answered"] == 4 and summary["failed"] == 1 and summary["errors"] == {"invalid_request": 1}, summary
  assert summary["complete"] and sum(summary["finish_reasons"].values()) == 5, summary
