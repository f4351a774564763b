"""`launch.bench.pass_rate`: its tasks are right (each task's tests pass its hand-written solution and fail a wrong
one), its grader cannot be fooled by code that stops early or runs forever, and it answers with the engine's greedy
tokens (held to transformers' on a tiny checkpoint)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers

from launch.bench import coding_tasks, pass_rate

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_task_passes_its_solution_and_fails_a_wrong_one():
  """Each task's assertions hold its hand-written solution and fail a function that returns None."""
  names = [t.name for t in coding_tasks.TASKS]
  assert len(names) == len(set(names)) >= 40
  for task in coding_tasks.TASKS:
    assert f"`{task.name}(" in task.prompt and "```python" in task.prompt
    assert pass_rate.run_tests(task.solution, task.tests) == (True, None), task.name
    # A function of the right name that answers nothing useful fails.
    wrong = f"def {task.name}(*args, **kwargs):\n    return None\n"
    passed, error = pass_rate.run_tests(wrong, task.tests)
    assert not passed and error, task.name
  assert pass_rate.run_tests("def f(:\n", "assert True\n") == (False, "SyntaxError: invalid syntax")


def test_code_is_taken_from_the_block_that_defines_the_function():
  text = ("Here is a helper:\n```python\ndef helper():\n    pass\n```\nand the answer:\n```python\n"
          "def f(x):\n    return x + 1\n```\nIt adds one.")
  assert pass_rate.extract_code(text, "f") == "def f(x):\n    return x + 1"
  assert pass_rate.extract_code(text, "g") == "def helper():\n    pass"  # none defines g: the first block
  assert pass_rate.extract_code("```py\ndef f():\n  return 1", "f") == "def f():\n  return 1"  # cut at the stop
  assert pass_rate.extract_code("def f():\n  return 1\n", "f") == "def f():\n  return 1\n"  # no block: all of it
  assert pass_rate.extract_code("```bash\nls\n```\n```\ndef f(): pass\n```", "f") == "def f(): pass"
  # The stop string ends a completion before the closing fence's newline; the opening fence does not contain it.
  assert pass_rate.STOP not in "Sure:\n```python\ndef f(): pass"


def test_the_grader_fails_early_exits_endless_loops_and_errors():
  tests = "assert f() == 1\n"
  assert pass_rate.run_tests("def f():\n    return 1", tests) == (True, None)
  assert pass_rate.run_tests("import sys\ndef f():\n    return 2\nsys.exit(0)", tests) == (False, "exited early")
  assert pass_rate.run_tests("import os\ndef f():\n    os._exit(0)", tests) == (False, "exited early")
  assert pass_rate.run_tests("def f():\n    while True:\n        pass", tests, timeout=1.0) == (False, "timeout")
  assert pass_rate.run_tests("def f():\n    return 2", tests) == (False, "AssertionError")
  passed, error = pass_rate.run_tests("def f():\n    return bytearray(8 << 30)", tests)
  assert not passed and error == "MemoryError"
  # Printing the marker needs the marker: a fresh random one each run.
  passed, error = pass_rate.run_tests("def f():\n    print('0' * 16)\n    raise SystemExit(0)", tests)
  assert (passed, error) == (False, "exited early")


@pytest.mark.slow
def test_answers_are_the_engines_greedy_tokens_and_are_graded(tmp_path_factory, tmp_path):
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("pass_rate"))
  hf = build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  out = tmp_path / "report.json"
  tasks = ["is_palindrome", "fizzbuzz", "gcd"]
  proc = subprocess.run([sys.executable, "-m", "launch.bench.pass_rate", f"--model={d}", "--engines=float32,w8a16",
                         f"--tasks={','.join(tasks)}", "--max_tokens=6", "--slots=2", "--noperplexity",
                         f"--output={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report == json.loads(proc.stdout)
  assert report["tasks"] == 3 and list(report["engines"]) == ["float32", "w8a16"]

  tok = transformers.AutoTokenizer.from_pretrained(d)
  eos = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
  fp32 = report["engines"]["float32"]
  for name, result in zip(tasks, fp32["results"]):
    task = next(t for t in coding_tasks.TASKS if t.name == name)
    ids = tok.apply_chat_template([{"role": "user", "content": task.prompt}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    assert result["task"] == name and result["tokens"] == ref
    # The text is the tokens' (up to a last character whose bytes the six tokens leave incomplete).
    assert tok.decode(ref, skip_special_tokens=True).startswith(result["text"])
    assert result["passed"] is False and result["error"]  # six random tokens are no function
  assert fp32["passed"] == 0 and fp32["pass_rate"] == 0
  assert fp32["identical_completions"] == 1.0 and fp32["token_agreement"] == 1.0
  assert fp32["generated_tokens"] == sum(len(r["tokens"]) for r in fp32["results"])
  w8a16 = report["engines"]["w8a16"]
  assert [r["task"] for r in w8a16["results"]] == tasks
  assert 0 <= w8a16["token_agreement"] <= 1 and 0 <= w8a16["identical_completions"] <= 1


def test_unknown_engines_and_tasks_are_one_line_errors():
  for flag, culprit in (("--engines=float16", "--engines=float16"), ("--tasks=nope", "no task named nope")):
    proc = subprocess.run([sys.executable, "-m", "launch.bench.pass_rate", flag, "--noperplexity"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert culprit in proc.stderr.strip().splitlines()[-1]
