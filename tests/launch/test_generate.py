"""`python -m launch.generate` end to end on a tiny checkpoint, against transformers' greedy generate."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import build_tiny_qwen2, fake_quantized_reference, save_tiny_tokenizer_dir

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny Qwen2 with the tiny Qwen2.5-style tokenizer and chat template beside it."""
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("launch"))
  hf_tok = transformers.AutoTokenizer.from_pretrained(d)
  im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
  model = build_tiny_qwen2(d, vocab_size=640, bos_token_id=hf_tok.pad_token_id, eos_token_id=im_end)
  return d, model, hf_tok


def _run(*args, env=None):
  proc = subprocess.run([sys.executable, "-m", "launch.generate", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=env)
  return proc


@pytest.fixture(scope="module")
def draft_checkpoint(tmp_path_factory, checkpoint):
  """Another tiny Qwen2 (one layer, its own weights) with the same tokenizer: a draft for `checkpoint`."""
  _, _, hf_tok = checkpoint
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("draft"))
  build_tiny_qwen2(d, seed=3, vocab_size=640, num_hidden_layers=1, bos_token_id=hf_tok.pad_token_id,
                   eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"))
  return d


@pytest.mark.parametrize("extra", ["", "ngram", "draft"])
def test_json_output_matches_transformers(checkpoint, draft_checkpoint, extra):
  """Plain, with n-gram speculation and with a draft model (sampling its proposals, which a greedy request does
  not): the same tokens."""
  extra = {"": (), "ngram": ("--speculative_method=ngram", "--prompt_lookup_min=1", "--num_speculative_tokens=3"),
           "draft": ("--speculative_method=draft", f"--draft_model={draft_checkpoint}",
                     "--draft_sampling=sampled")}[extra]
  d, model, hf_tok = checkpoint
  messages = [{"role": "user", "content": "def fibonacci(n):"}]
  ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
  with torch.no_grad():
    ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                         eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=hf_tok.pad_token_id,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
  proc = _run(f"--model={d}", "--prompt=def fibonacci(n):", "--max_new_tokens=20", "--json", *extra)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout)
  assert out["token_ids"] == ref
  assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref)}
  assert out["finish_reason"] == ("stop" if ref[-1] == hf_tok.convert_tokens_to_ids("<|im_end|>") else "length")
  shown = ref[:-1] if out["finish_reason"] == "stop" else ref
  # A character cut in half at the end (this random model emits stray byte tokens) is left out, not shown.
  assert out["text"] == hf_tok.decode(shown, skip_special_tokens=True).rstrip("\ufffd")


@pytest.mark.parametrize("quantize", ["int8", "w8a8"])
def test_quantize_flag_serves_int8_weights(checkpoint, quantize):
  """--quantize: greedy tokens equal transformers with its weights (and, w8a8, its Linear inputs) quantized to int8
  per channel by numpy; the log says what was served."""
  d, model, hf_tok = checkpoint
  ids = hf_tok.encode("The quick brown fox")
  ref = fake_quantized_reference(model, activations=quantize == "w8a8")
  with torch.no_grad():
    want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                        pad_token_id=hf_tok.pad_token_id,
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
  proc = _run(f"--model={d}", "--raw", "--prompt=The quick brown fox", "--max_new_tokens=12", "--ignore_eos",
              "--json", f"--quantize={quantize}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)["token_ids"] == want
  assert f"{quantize} weights" in proc.stderr


def test_plain_output_is_the_text_alone(checkpoint):
  d, model, hf_tok = checkpoint
  ids = hf_tok.encode("The quick brown fox")
  with torch.no_grad():
    ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=hf_tok.pad_token_id,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
  proc = _run(f"--model={d}", "--raw", "--prompt=The quick brown fox", "--max_new_tokens=12", "--ignore_eos")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout == hf_tok.decode(ref, skip_special_tokens=True).rstrip("\ufffd") + "\n"
  assert "Loaded" in proc.stderr  # logs go to stderr, never stdout
  # qwenjax's own first line: not jax's INFO that a TPU backend (libtpu.so, on a CPU machine) could not start.
  assert re.match(r"I\d{4} .* (_cli|_common|loader)\.py:\d+\] ", proc.stderr.splitlines()[0]), proc.stderr[:500]
  assert "Unable to initialize backend" not in proc.stderr, proc.stderr[:500]


def test_sampling_flags_are_reproducible(checkpoint):
  d = checkpoint[0]
  args = (f"--model={d}", "--prompt=hello", "--max_new_tokens=8", "--temperature=0.9", "--top_p=0.8",
          "--top_k=50", "--json", "--ignore_eos")
  a, b = _run(*args, "--seed=1"), _run(*args, "--seed=1")
  assert a.returncode == 0, a.stderr[-2000:]
  assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
  assert len(json.loads(a.stdout)["token_ids"]) == 8


@pytest.mark.parametrize("args, message", [
    (("--model=/nonexistent/model",), "/nonexistent/model: no such file or directory"),
    (("--temperature=-1",), "temperature must be a finite number >= 0"),
    (("--cpu_paths=/nonexistent/record.json",), "/nonexistent/record.json: not a readable cpu paths record"),
    (("--speculative_method=ngram", "--prompt_lookup_min=3", "--prompt_lookup_max=2"),
     "prompt_lookup_min and prompt_lookup_max must be integers with 1 <= min <= max, got 3 and 2"),
    (("--draft_model=/somewhere",), "--draft_model is the proposer of --speculative_method=draft; pass that too."),
    (("--speculative_method=ngram", "--draft_sampling=sampled"),
     "draft_sampling 'sampled' is how a draft model proposes; method 'ngram' proposes deterministically"),
])
def test_bad_input_is_one_line_on_stderr(checkpoint, args, message):
  d = checkpoint[0]
  proc = _run(f"--model={d}", "--prompt=hi", *args)
  assert proc.returncode == 1
  assert proc.stdout == ""
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_a_second_run_reads_its_programs_back_from_the_compilation_cache(checkpoint, tmp_path):
  """--compilation_cache_dir: the first run compiles and writes its programs under a directory named for this
  processor, the second reads every one back and compiles none, with the same answer; --nocompilation_cache
  writes nothing. (Without the flag, $JAX_COMPILATION_CACHE_DIR, which this suite sets, would be the place.)"""
  from qwenjax.engine.compilation_cache import processor_key

  d, _, _ = checkpoint
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  args = (f"--model={d}", "--json", "--prompt=def f(x):", "--max_new_tokens=6", "--ignore_eos")
  counts = lambda proc: tuple(map(int, re.search(r"Compilation cache: (\d+) programs read back, (\d+) compiled",
                                                 proc.stderr).groups()))
  cache = tmp_path / "xla"
  first, second = (_run(*args, f"--compilation_cache_dir={cache}", env=env) for _ in range(2))
  assert first.returncode == 0 and second.returncode == 0, (first.stderr + second.stderr)[-3000:]
  assert [p.name for p in cache.iterdir()] == [processor_key()]
  read, compiled = counts(first)
  assert read == 0 and compiled >= 5, first.stderr[-2000:]  # the step, sampler, decode block, slot reset, copy
  assert len(list((cache / processor_key()).iterdir())) >= compiled
  assert counts(second) == (compiled, 0), second.stderr[-2000:]
  assert json.loads(second.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]
  off = _run(*args, f"--compilation_cache_dir={tmp_path / 'off'}", "--nocompilation_cache", env=env)
  assert off.returncode == 0 and "Compilation cache" not in off.stderr and not (tmp_path / "off").exists()
  assert json.loads(off.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]


def test_the_matmul_paths_and_their_table_at_verbosity_1(checkpoint):
  """The suite's recorded paths (--cpu_paths, from $QWENJAX_CPU_PATHS): one line names the processor and the
  configuration chosen; --verbosity=1 adds the probe's table and the choice per shape; the answer is the same as
  on XLA's default paths (--cpu_paths=default, which prints nothing of them)."""
  from conftest import CPU_PATHS_RECORD

  d = checkpoint[0]
  args = (f"--model={d}", "--json", "--prompt=def f(x):", "--max_new_tokens=6", "--ignore_eos", "--quantize=w8a8")
  chosen = _run(*args, f"--cpu_paths={CPU_PATHS_RECORD}", "--verbosity=1")
  default = _run(*args, "--cpu_paths=default")
  assert chosen.returncode == 0 and default.returncode == 0, (chosen.stderr + default.stderr)[-3000:]
  assert re.search(r"Matmul paths \(Intel\(R\) Xeon\(R\) Processor, w8a8\): XLA:CPU configuration '\w+'",
                   chosen.stderr), chosen.stderr[-3000:]
  assert "microseconds per call:" in chosen.stderr and "layout nk" in chosen.stderr
  assert "Matmul paths" not in default.stderr
  assert json.loads(chosen.stdout)["token_ids"] == json.loads(default.stdout)["token_ids"]


def test_the_cache_directory_names_the_processor_and_its_features():
  """Two processors of one model name with different instruction sets get different directories; the order in
  which /proc/cpuinfo lists the features does not matter."""
  from qwenjax.engine.compilation_cache import processor_key

  info = "processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu sse2 avx2 {}\n"
  zen3, zen3_again, zen4 = (processor_key(info.format(f)) for f in ("fma", "fma", "fma avx512f"))
  assert zen3 == zen3_again and zen3 != zen4
  assert zen3.startswith("amd-epyc-7b13-64-core-processor-") and re.fullmatch(r"[0-9a-f]{8}", zen3.rsplit("-")[-1])
  assert processor_key(info.format("avx2 fma")) == processor_key(info.format("fma avx2"))
