"""Issue 21, a batch job's input lines: no nesting depth crashes a job (defect 1), memory per line is bounded
(defect 5), a grammar that fails is an error record on the simple format too (defect 7), and a glob keys id-less
lines by path from the start (defect 13). In-process tests of the readers and the engine's prepare path, one job
run with every kind of bad line, and one subprocess that measures peak RSS with `resource.getrusage`."""

import json
import pathlib
import subprocess
import sys

import pytest

from qwenjax import ConfigError, InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine import input_processor, job_input, jobs
from qwenjax.engine.engine import Engine
from qwenjax.engine.requests import Completion, Request, RequestOutput
from qwenjax.engine.sampling import SamplingParams
from qwenjax.text import tokenizer as tokenizer_lib
from qwenjax.text.tokenizer import Tokenizer

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPTH = 1000
DEEP = "[" * DEPTH + "]" * DEPTH  # ~2 KB of JSON nested 1,000 levels deep
RECURSIVE_REF = {"type": "json_schema", "json_schema": {"name": "loop", "schema": {
    "$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}}
HUGE_REGEX = {"type": "regex", "regex": "(x{1000}){1000}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("input"))
  build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  return d


@pytest.fixture(scope="module")
def engine(checkpoint):
  return Engine(load_model(checkpoint), Tokenizer.from_directory(checkpoint), max_seq_len=128, max_batch_size=2)


def _deep_lines() -> dict[str, str]:
  """Lines nested ~1,000 levels deep in each place a line holds JSON, ~10 KB each."""
  pad = "x" * 8000
  return {
      "sampling": '{"id": "s", "prompt": "' + pad + '", "sampling": {"stop": ' + DEEP + "}}",
      "messages": '{"id": "m", "messages": [{"role": "user", "content": ' + DEEP + "}]}",
      "metadata": '{"id": "md", "prompt": "hi", "metadata": ' + DEEP + "}",
      "body": ('{"custom_id": "o", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": '
               '[{"role": "user", "content": "hi"}], "metadata": ' + DEEP + "}}"),
      "top": DEEP,
  }


# --- Defect 1: no nesting depth crashes a job ---------------------------------------------------------------------


@pytest.mark.parametrize("place", ["sampling", "messages", "metadata", "body", "top"])
def test_a_deep_line_is_that_lines_error(place):
  raw = _deep_lines()[place].encode()
  line = job_input.parse_input_line(raw, 7, "in.jsonl")
  assert line.obj is None and line.code == "invalid_json"
  assert line.error.startswith("in.jsonl:7: malformed JSON (nested deeper than 100 levels"), line.error
  # Keyed by its id where a cheap look at its top level finds one (a rerun skips it), else by its line.
  expected = {"sampling": "s", "messages": "m", "metadata": "md", "body": "o", "top": "line-7"}[place]
  assert line.key == expected
  assert line.openai == (place == "body")
  # Nesting within the bound still parses: 100 levels of sampling are a request's own business.
  ok = job_input.parse_input_line(b'{"id": 1, "metadata": ' + b"[" * 99 + b"]" * 99 + b"}", 1)
  assert ok.error is None and ok.key == 1


def test_deep_lines_are_read_and_scanned_without_raising(tmp_path):
  inp = tmp_path / "in.jsonl"
  lines = list(_deep_lines().values()) + ['{"id": "fine", "prompt": "hi"}']
  inp.write_text("\n".join(lines) + "\n")
  read = list(job_input.read_input(str(inp)))
  assert [line.error is None for line in read] == [False] * 5 + [True]
  assert job_input.scan_input(str(inp)).lines == 6


def test_finetune_data_skips_a_deep_line_with_its_file_and_line(tmp_path):
  from qwenjax.training import data  # pylint: disable=g-import-not-at-top

  path = tmp_path / "chat.jsonl"
  good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
  path.write_text(good + "\n" + _deep_lines()["messages"] + "\n" + good + "\n")
  got = list(data.conversations(str(path)))
  assert [c.error is None for c in got] == [True, False, True]
  assert got[1].error.startswith(f"{path}:2: malformed JSON (nested deeper than 100 levels"), got[1].error


def test_every_json_reader_refuses_deep_json_as_an_error(tmp_path):
  from qwenjax import config  # pylint: disable=g-import-not-at-top
  from qwenjax.text import chat_template, tool_calls  # pylint: disable=g-import-not-at-top

  deep_object = '{"a": ' * DEPTH + "1" + "}" * DEPTH
  (tmp_path / "config.json").write_text(deep_object)
  with pytest.raises(ConfigError, match="nested deeper than 100 levels"):
    config.read_json(tmp_path / "config.json")
  # A model's output (tool-call arguments) and a history's arguments string are input too.
  parsed = tool_calls.parse('<tool_call>\n{"name": "f", "arguments": ' + deep_object + "}\n</tool_call>")
  assert not parsed.calls and "nested deeper than 100 levels" in parsed.errors[0], parsed.errors
  call = {"type": "function", "function": {"name": "f", "arguments": deep_object}}
  with pytest.raises(InputError, match="function.arguments is not valid JSON .nested deeper than 100 levels"):
    chat_template._tool_call_with_object_arguments(call, "message 1: tool_calls[0]")  # pylint: disable=protected-access


# --- Defect 5: memory per line is bounded --------------------------------------------------------------------------


def test_a_line_over_max_line_bytes_is_skipped_in_chunks_and_keyed_by_its_id(tmp_path):
  inp = tmp_path / "in.jsonl"
  big_with_id = '{"id": "big", "prompt": "' + "y " * 5000 + '"}'
  big_without = '{"prompt": "' + "y " * 5000 + '", "id": "late"}'  # its id is past the cheap look
  inp.write_text("\n".join([big_with_id, '{"id": "a", "prompt": "hi"}', big_without, '{"id": "b", "prompt": "yo"}'])
                 + "\n")
  read = list(job_input.read_input(str(inp), max_line_bytes=1000))
  assert [line.key for line in read] == ["big", "a", "line-3", "b"]
  assert read[0].error == f"{inp}:1: {len(big_with_id)} bytes, over --max_line_bytes=1000." and read[0].obj is None
  assert read[0].code == "invalid_request"
  assert read[1].obj == {"id": "a", "prompt": "hi"} and read[3].obj == {"id": "b", "prompt": "yo"}
  assert read[2].error.startswith(f"{inp}:3: {len(big_without)} bytes, over")
  # A line of exactly the limit is read; one byte more is not.
  exact = tmp_path / "exact.jsonl"
  exact.write_text('{"id": "e", "prompt": "' + "z" * 975 + '"}\n')
  assert len(exact.read_bytes()) == 1001
  assert next(job_input.read_input(str(exact), max_line_bytes=1000)).error is None
  assert "over --max_line_bytes=999" in next(job_input.read_input(str(exact), max_line_bytes=999)).error
  assert job_input.scan_input(str(inp), max_line_bytes=1000).lines == 4


def test_a_huge_chat_message_is_blamed_on_its_size(engine):
  content = "hello world " * 4_400_000  # 52.8 MB
  with pytest.raises(InputError) as e:
    engine.prepare({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]})
  message = str(e.value)
  assert message.startswith(f"messages[1]: its content is {len(content):,} bytes, at least "), message
  assert "the context holds 128" in message and "render limit" not in message
  with pytest.raises(InputError, match=rf"^the prompt is {len(content):,} bytes, at least .* the context holds 128"):
    engine.prepare({"prompt": content})


def test_a_prompt_too_long_is_a_kind_of_error_not_a_phrase_in_it(engine):
  """Where the length is checked, the InputError says its kind (a batch line's error record takes its code from
  it), whether counted exactly or in bounded pieces; other errors are invalid requests, whatever their words."""
  for prompt in ("hello " * 200, "hello world " * 40_000):
    with pytest.raises(InputError, match="the context holds 128") as e:
      engine.prepare({"prompt": prompt})
    assert e.value.code == "context_length_exceeded"
  with pytest.raises(InputError, match="LoRA adapter 'the context holds' is not loaded") as e:
    engine.prepare({"prompt": "hi", "lora": "the context holds"})
  assert e.value.code == "invalid_request"


def test_a_prompt_counted_in_pieces_is_exact_near_the_limit(engine, checkpoint, monkeypatch):
  """Pieces as small as a few words: a prompt that fits is never refused, one that does not is refused with its
  exact count (transformers' tokenizer is the independent count)."""
  import transformers  # pylint: disable=g-import-not-at-top

  hf = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
  monkeypatch.setattr(input_processor, "_COUNT_FROM_CHARS", 8)
  monkeypatch.setattr(tokenizer_lib, "PIECE_CHARS", 16)
  words = "the quick brown fox jumps over the lazy dog, 12 times!\n".split(" ")
  text = ""
  while len(hf(text + words[len(text) % len(words)] + " ")["input_ids"]) < 127:
    text += words[len(text) % len(words)] + " "
  n = len(hf(text)["input_ids"])
  assert n <= 127
  assert engine.tokenizer.count_tokens(text, stop_after=10_000) == n
  assert engine.prepare({"prompt": text}) == hf(text)["input_ids"]
  longer = text + "jumps over the lazy dog " * 3
  with pytest.raises(InputError, match=rf"the prompt has {len(hf(longer)['input_ids'])} tokens; the context holds"):
    engine.prepare({"prompt": longer})
  # Without a space to cut at, a piece is cut hard: the count never exceeds the true one.
  solid = "abcdefghij" * 50
  assert engine.tokenizer.count_tokens(solid, stop_after=10_000) <= len(hf(solid)["input_ids"])


RSS_SCRIPT = r"""
import json, resource, sys
from launch import batch_generate
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.engine import Engine
from qwenjax.engine import job_input
from qwenjax.engine.sampling import SamplingParams
from qwenjax.text.tokenizer import Tokenizer

ckpt, small, big = sys.argv[1:]
batch_generate.flags.FLAGS(["rss", f"--input={small}", "--output=unused.jsonl"])  # the job's flag defaults
engine = Engine(load_model(ckpt), Tokenizer.from_directory(ckpt), max_seq_len=128, max_batch_size=2)
default = SamplingParams(max_tokens=2)

def job(path):
  errors = []
  scanned = job_input.scan_input([path])
  items = batch_generate._requests([path], set(), errors, engine, default, (0, 1), scanned.skipped)
  served = [key.key for key, _ in engine.serve(((line, request, prompt) for line, request, prompt in items))]
  return served, errors

def peak():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

served, errors = job(small)
base = peak()
served_big, errors_big = job(big)
print(json.dumps({"base": base, "peak": peak(), "served": served + served_big, "errors": errors + errors_big}))
"""


def test_a_30_mb_line_costs_under_a_gib_above_the_baseline(checkpoint, tmp_path):
  small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
  small.write_text('{"id": "s", "prompt": "hi"}\n')
  huge_line = '{"id": "huge", "prompt": "' + "x " * 15_000_000 + '"}'  # 30 MB: over the default --max_line_bytes
  long_message = json.dumps({"id": "long", "messages": [{"role": "user", "content": "a b " * 1_750_000}]})  # 7 MB
  big.write_text("\n".join([long_message, huge_line, '{"id": "ok", "prompt": "hello"}']) + "\n")
  huge_size = len(huge_line)
  del huge_line
  proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(checkpoint), str(small), str(big)], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["served"] == ["s", "ok"]
  errors = {e["id"]: e for e in got["errors"]}
  assert errors["huge"]["error"] == f"{big}:2: {huge_size} bytes, over --max_line_bytes=8388608."
  assert errors["long"]["error"].startswith(f"{big}:1: messages[0]: its content is 7,000,000 bytes, at least ")
  assert errors["long"]["code"] == "context_length_exceeded"
  print(f"peak RSS {got['peak'] >> 20} MiB, baseline {got['base'] >> 20} MiB")
  assert got["peak"] - got["base"] <= 1 << 30, (got["base"] >> 20, got["peak"] >> 20)  # MiB, if it fails


# --- Defect 7: a grammar that fails is an error record ------------------------------------------------------------


def test_a_grammar_that_fails_before_the_first_token_is_refused_in_prepare(engine):
  with pytest.raises(InputError, match="invalid JSON schema: .*cannot be used"):
    engine.prepare({"prompt": "hi", "response_format": RECURSIVE_REF})


def test_a_matcher_that_has_failed_refuses_the_next_token(engine):
  """A failed matcher may still "accept" a token its mask allowed: its sequence must end as a grammar error then,
  with the matcher's reason (it used to go on, its masks meaningless)."""
  import llguidance  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from qwenjax.engine import constraints  # pylint: disable=g-import-not-at-top

  grammars = engine.grammars
  text = llguidance.LLMatcher.grammar_from_json_schema(RECURSIVE_REF["json_schema"]["schema"])
  matcher = llguidance.LLMatcher(grammars._tokenizer, text, log_level=0)  # pylint: disable=protected-access
  constraint = constraints.Constraint(matcher, constraints.pack_ids(range(600), grammars.vocab_size),
                                      constraints.pack_ids([], grammars.vocab_size))
  row = np.zeros(constraints.words(grammars.vocab_size), np.int32)
  constraint.fill(row)
  allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
  assert matcher.is_error() and len(allowed)
  assert not constraint.advance(int(allowed[0])) and constraint.error == "NoExtensionBias"


def test_a_grammar_that_fails_mid_decode_is_an_error_record_on_the_simple_format(engine):
  from launch import batch_generate  # pylint: disable=g-import-not-at-top

  request = Request(prompt="hi", response_format=HUGE_REGEX, sampling=SamplingParams(max_tokens=4))
  out = engine.generate([request])[0]
  assert out.finish_reason == "grammar_error" and "too many expressions" in out.outputs[0].error
  line = job_input.parse_input_line(json.dumps({"id": "g", "prompt": "hi", "response_format": HUGE_REGEX,
                                           "metadata": {"k": 1}}).encode(), 3, "in.jsonl")
  record = batch_generate._record(line, request, out, engine)  # pylint: disable=protected-access
  assert record == {"id": "g", "code": "grammar_error", "metadata": {"k": 1}, "error": (
      "in.jsonl:3: choice 0: the grammar of its response_format / tool_choice failed while decoding (lexer error: "
      "too many expressions constructed); the output would not conform.")}
  assert jobs.is_result(record)
  fine = RequestOutput("x", 2, [Completion("ab", [1, 2], "stop")])
  assert "error" not in batch_generate._record(line, request, fine, engine)  # pylint: disable=protected-access


# --- Defect 13: a glob keys id-less lines by path from the start --------------------------------------------------


def test_a_glob_or_a_list_keys_by_path_even_with_one_file(tmp_path):
  inp = tmp_path / "a.jsonl"
  inp.write_text('{"prompt": "hi"}\n')
  pattern = str(tmp_path / "*.jsonl")
  for values, keyed in (([str(inp)], False), ([pattern], True), ([str(inp), str(inp)], True)):
    assert jobs.keyed_by_path(values) is keyed
    paths = jobs.expand_inputs(values)
    assert paths == [str(inp)]
    key = next(job_input.read_input(paths, keyed_by_path=jobs.keyed_by_path(values))).key
    assert key == (f"{inp}:line-1" if keyed else "line-1")


# --- One job with every kind of bad line ---------------------------------------------------------------------------


def test_a_job_with_deep_oversized_and_grammar_lines_serves_every_other_line(checkpoint, tmp_path):
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  deep = _deep_lines()
  lines = [
      '{"id": "a", "prompt": "def f(x):"}',
      deep["sampling"], deep["body"], deep["top"],
      '{"prompt": "an id-less line"}',
      '{"id": "big", "prompt": "' + "z " * 7000 + '"}',
      json.dumps({"id": "ref", "prompt": "hi", "response_format": RECURSIVE_REF}),
      json.dumps({"id": "rx", "prompt": "hi", "response_format": HUGE_REGEX}),
      json.dumps({"custom_id": "o2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x = "}}),
  ]
  inp.write_text("\n".join(lines) + "\n")
  glob = str(tmp_path / "i*.jsonl")  # matches one file
  proc = subprocess.run([sys.executable, "-m", "launch.batch_generate", f"--model={checkpoint}", f"--input={glob}",
                         f"--output={out}", "--max_batch_size=2", "--max_new_tokens=4", "--max_seq_len=128",
                         "--max_line_bytes=12000"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  by_key = {r.get("custom_id", r.get("id")): r for r in records}
  assert len(by_key) == len(records) == len(lines)
  assert "text" in by_key["a"] and by_key["o2"]["response"]["status_code"] == 200
  assert by_key[f"{inp}:line-5"]["finish_reason"] in ("stop", "length")  # keyed by path: the input is a glob
  assert "nested deeper than 100 levels" in by_key["s"]["error"] and by_key["s"]["code"] == "invalid_json"
  assert by_key["o"]["error"]["code"] == "invalid_json" and "nested deeper" in by_key["o"]["error"]["message"]
  assert by_key[f"{inp}:line-4"]["error"].startswith(f"{inp}:4: malformed JSON (nested deeper than 100 levels")
  assert by_key["big"]["error"] == f"{inp}:6: {len(lines[5])} bytes, over --max_line_bytes=12000."
  assert "invalid JSON schema" in by_key["ref"]["error"] and by_key["ref"]["code"] == "invalid_request"
  assert by_key["rx"]["code"] == "grammar_error" and "failed while decoding" in by_key["rx"]["error"]
  summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
  assert summary["answered"] == 3 and summary["failed"] == 6, summary
  assert summary["errors"]["grammar_error"] == 1 and summary["errors"]["invalid_json"] == 3, summary
