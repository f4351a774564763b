"""launch.finetune on a tiny Qwen2 and a synthetic task (reversing short strings): the loss falls, the adapter it
writes loads in peft with our logits, a killed run resumes to the same adapter bit for bit, and a mesh run
matches one device. The loss itself is checked against transformers in tests/training/test_lora_trainer.py."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

from qwenjax.checkpoints.hf import load_model
from qwenjax.checkpoints.peft import load_adapter
from qwenjax.model.decoder import StepMetadata
from qwenjax.model.kv_cache import KVCache
from qwenjax.model.lora import LoraBank

from conftest import REPO, build_tiny_qwen2, save_tiny_tokenizer_dir, xla_flags


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  """A tiny Qwen2 with the tiny Qwen tokenizer, and 64 chats asking to reverse a string of 3-6 letters."""
  d = tmp_path_factory.mktemp("finetune")
  model = save_tiny_tokenizer_dir(d / "model")
  build_tiny_qwen2(model, vocab_size=640, num_key_value_heads=2)
  rng = random.Random(0)
  with open(d / "train.jsonl", "w") as f:
    for _ in range(64):
      w = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
      messages = [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]
      f.write(json.dumps({"messages": messages}) + "\n")
  return d


def _command(task, output, *extra):
  return [sys.executable, "-m", "launch.finetune", f"--model={task / 'model'}", f"--data={task / 'train.jsonl'}",
          f"--output={output}", "--row_len=128", "--batch_size=8", "--rank=16", "--alpha=32", "--learning_rate=3e-3",
          "--warmup_steps=5", "--log_every=10", *extra]


def _run(cmd, **kw):
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _log(output):
  return [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]


def test_finetune_drives_the_loss_down_and_peft_loads_the_adapter(task, tmp_path):
  out = tmp_path / "lora"
  bad = tmp_path / "bad.jsonl"  # a second --data file: its bad lines are reported and skipped, the run goes on
  bad.write_text('{"messages": [{"role": "user", "content": "hi"}\n'
                 + json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
  proc = _run(_command(task, out, "--steps=150", "--eval_every=50", "--save_every=50", f"--data={bad}"))
  assert proc.stdout.strip() == str(out)
  assert f"skipped {bad}:1: malformed JSON" in proc.stderr
  assert f"skipped {bad}:2: the conversation has no assistant turn" in proc.stderr
  assert "64 conversations (2 skipped, 0 cut" in proc.stderr
  assert "tokens/s" in proc.stderr and "ETA" in proc.stderr and "eval_loss" in proc.stderr
  log = _log(out)
  assert [h["step"] for h in log] == list(range(150))
  first, last = np.mean([h["loss"] for h in log[:5]]), np.mean([h["loss"] for h in log[-5:]])
  assert last < first / 1.5, (first, last)  # 6.55 -> ~3.8 when measured
  evals = [h["eval_loss"] for h in log if "eval_loss" in h]
  assert len(evals) == 3 and evals[-1] < evals[0]  # the held-out rows improve too

  base = transformers.Qwen2ForCausalLM.from_pretrained(task / "model").eval()
  ids = [5, 17, 300, 42, 99, 7, 250, 3]
  with torch.no_grad():
    base_logits = base(torch.tensor([ids])).logits[0].numpy()
  theirs = peft.PeftModel.from_pretrained(base, out).eval()  # wraps `base` in place
  with torch.no_grad():
    want = theirs(torch.tensor([ids])).logits[0].numpy()
  model = load_model(task / "model")
  model.lora = LoraBank.of(model.cfg, {"tuned": load_adapter(out, model.cfg)})
  meta = StepMetadata(jnp.arange(len(ids), dtype=jnp.int32)[None], attend_to_cache=False,
                      lora_index=jnp.zeros(1, jnp.int32))
  h, _ = model(jnp.asarray([ids], jnp.int32), KVCache.zeros(model.cfg, 1, 16, model.dtype), meta)
  np.testing.assert_allclose(np.asarray(model.logits(h))[0], want, atol=1e-4, rtol=0)
  assert np.abs(want - base_logits).max() > 0.1  # training moved the model


def _adapter_tensors(out):
  return safetensors.numpy.load_file(out / "adapter_model.safetensors")


def test_a_killed_run_resumes_to_the_same_adapter_bit_for_bit(task, tmp_path):
  """Ctrl-C after step 20's checkpoint: one line, exit 130, the lock released; the rerun resumes from step 20, ends
  with the uninterrupted run's adapter bit for bit, and training_log.jsonl holds each of the 40 steps once, as the
  uninterrupted run's log does (appended to across the resume, the steps re-run after the checkpoint not twice)."""
  args = ("--steps=40", "--save_every=10", "--dropout=0.1", "--eval_every=20")
  whole = tmp_path / "whole"
  _run(_command(task, whole, *args))
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_command(task, killed, *args), cwd=REPO, stderr=subprocess.PIPE, text=True)
  seen = ""
  deadline = time.monotonic() + 300
  while "step 20/40" not in seen:  # logged after step 20's checkpoint is written
    line = proc.stderr.readline()
    assert line or proc.poll() is None, seen[-3000:]
    seen += line
    assert time.monotonic() < deadline, seen[-3000:]
  os.kill(proc.pid, signal.SIGINT)
  rest = proc.stderr.read()
  assert proc.wait() == 130, rest[-3000:]
  assert "Traceback" not in seen + rest
  assert rest.strip().splitlines()[-1] == "interrupted (SIGINT); rerun the same command to resume."
  assert not (killed / "adapter_model.safetensors").exists()
  assert not os.path.lexists(f"{killed}.qwenjax-lock")
  resumed = _run(_command(task, killed, *args))
  assert "Resumed from" in resumed.stderr and "at step 20 of 40" in resumed.stderr
  a, b = _adapter_tensors(whole), _adapter_tensors(killed)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert _log(killed) == _log(whole)
  assert [h["step"] for h in _log(killed)] == list(range(40))


def test_a_mesh_run_matches_one_device(task, tmp_path):
  """data:2,fsdp:2,tensor:2 on 8 CPU devices: base weights sharded by the inference rules (embed over fsdp,
  heads and MLP over tensor), rows split over data and fsdp."""
  args = ("--steps=12", "--eval_fraction=0.25")
  one = tmp_path / "one"
  _run(_command(task, one, *args))
  mesh = tmp_path / "mesh"
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
  _run(_command(task, mesh, *args, "--mesh=data:2,fsdp:2,tensor:2"), env=env)
  for x, y in zip(_log(one), _log(mesh)):
    assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
  a, b = _adapter_tensors(one), _adapter_tensors(mesh)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-4, rtol=0, err_msg=key)


def _greedy(model, ids, n):
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  return out[0, len(ids):].tolist()


def test_from_a_batch_job_to_a_tuned_adapter_to_serving_it(task, tmp_path):
  """The README's path: batch_generate answers prompts with the base model; finetune learns from its requests
  joined with those answers; batch_generate --lora serves the adapter to lines that name it (a simple line's
  "lora", an OpenAI Batch body's "model") beside lines that do not, each with transformers + peft's tokens."""
  from qwenjax.text.tokenizer import Tokenizer

  requests = tmp_path / "requests.jsonl"
  chats = [[{"role": "user", "content": f"reverse {w}"}] for w in ("abc", "fed", "cab", "bead", "dab", "ace")] * 4
  requests.write_text("".join(json.dumps({"id": f"r{i}", "messages": m}) + "\n" for i, m in enumerate(chats)))
  answers = tmp_path / "answers.jsonl"
  generate = [sys.executable, "-m", "launch.batch_generate", f"--model={task / 'model'}", "--max_new_tokens=6",
              "--max_seq_len=128", "--max_batch_size=4"]
  _run([*generate, f"--input={requests}", f"--output={answers}"])
  adapter = tmp_path / "tuned"
  _run([sys.executable, "-m", "launch.finetune", f"--model={task / 'model'}", f"--requests={requests}",
        f"--responses={answers}", "--keep_truncated", f"--output={adapter}", "--steps=8", "--batch_size=4",
        "--row_len=64", "--rank=4", "--learning_rate=1e-2", "--eval_fraction=0"])
  assert (adapter / "adapter_config.json").is_file()

  mixed = tmp_path / "mixed.jsonl"
  lines = [{"id": "t", "messages": chats[0], "lora": "tuned"}, {"id": "b", "messages": chats[0]},
           {"custom_id": "o", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tuned", "messages": chats[1], "max_tokens": 6}},
           {"custom_id": "p", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "Qwen2.5-0.5B-Instruct", "messages": chats[1], "max_tokens": 6}}]
  mixed.write_text("".join(json.dumps(x) + "\n" for x in lines))
  served = tmp_path / "served.jsonl"
  _run([*generate, f"--input={mixed}", f"--output={served}", f"--lora=tuned={adapter}", "--ignore_eos"])
  records = {r.get("custom_id", r.get("id")): r for r in map(json.loads, served.read_text().splitlines())}

  tok = Tokenizer.from_directory(task / "model")
  base = transformers.Qwen2ForCausalLM.from_pretrained(task / "model").eval()
  prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in chats[:2]]
  want_base = [_greedy(base, p, 6) for p in prompts]
  tuned = peft.PeftModel.from_pretrained(base, adapter).eval()
  want_tuned = [_greedy(tuned, p, 6) for p in prompts]
  assert want_tuned != want_base  # the adapter changes these answers
  text = lambda ids: tok.decode(ids, skip_special_tokens=True)
  assert records["t"]["token_ids"] == want_tuned[0] and records["b"]["token_ids"] == want_base[0]
  assert records["o"]["response"]["body"]["choices"][0]["message"]["content"] == text(want_tuned[1])
  assert records["p"]["response"]["body"]["choices"][0]["message"]["content"] == text(want_base[1])


def test_generate_serves_an_adapter_merged_or_not(task, tmp_path):
  """launch.generate --lora (and --merge_lora) answers with the adapter: transformers + peft's greedy tokens."""
  from qwenjax.checkpoints.peft import save_adapter
  from qwenjax.model.lora import init_adapter
  from qwenjax.text.tokenizer import Tokenizer

  model = load_model(task / "model")
  adapter = init_adapter(model.cfg, rank=4, alpha=8, targets="all", seed=2)
  rng = np.random.default_rng(3)
  adapter.weights = {t: (a, rng.normal(0, 0.5, b.shape).astype(np.float32)) for t, (a, b) in adapter.weights.items()}
  save_adapter(tmp_path / "ad", adapter)
  cmd = [sys.executable, "-m", "launch.generate", f"--model={task / 'model'}", "--prompt=reverse abc", "--json",
         "--max_new_tokens=6", "--ignore_eos", "--max_seq_len=128", f"--lora=x={tmp_path / 'ad'}"]
  unmerged = json.loads(_run(cmd).stdout)["token_ids"]
  merged = json.loads(_run([*cmd, "--merge_lora"]).stdout)["token_ids"]
  base_tokens = json.loads(_run(cmd[:-1]).stdout)["token_ids"]
  tok = Tokenizer.from_directory(task / "model")
  ids = tok.apply_chat_template([{"role": "user", "content": "reverse abc"}], add_generation_prompt=True,
                                tokenize=True)
  base = transformers.Qwen2ForCausalLM.from_pretrained(task / "model").eval()
  assert base_tokens == _greedy(base, ids, 6)
  want = _greedy(peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval(), ids, 6)
  assert unmerged == merged == want != base_tokens
  bad = subprocess.run([*cmd[:-1], "--lora=nameless"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == ("error: --lora=nameless: expected NAME=PATH (a name for requests to "
                                                 "use, a PEFT adapter directory).")


# --- One run per --output, resumed only with its own settings ---------------------------------------------------


def _fails(cmd, **kw):
  """A run that must end in one `error:` line: returns that line."""
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), proc.stderr[-3000:]
  return last


SMALL = ("--steps=6", "--save_every=2", "--eval_fraction=0")


@pytest.fixture(scope="module")
def small_run(task, tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 4 and 6 (two kept)."""
  out = tmp_path_factory.mktemp("small") / "lora"
  _run(_command(task, out, *SMALL))
  return out


def _copy(run, tmp_path):
  import shutil

  shutil.copytree(run, tmp_path / "lora")
  return tmp_path / "lora"


def _contents(directory):
  return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_run_on_one_output_is_refused(task, tmp_path):
  from qwenjax import _files

  out = tmp_path / "lora"
  with _files.OwnedLock(_files.lock_path_for(out), "a run in this test"):
    line = _fails(_command(task, out, "--steps=2"))
  assert line.startswith(f"error: --output={out} is being written by another job (pid {os.getpid()} on ")
  assert not (out / "adapter_config.json").exists()


def test_another_runs_output_is_never_resumed_with_other_settings(task, small_run, tmp_path):
  """Another --rank and --learning_rate: refused before anything is loaded or written, naming both."""
  out = _copy(small_run, tmp_path)
  before = _contents(out)
  line = _fails(_command(task, out, *SMALL, "--rank=8", "--learning_rate=1e-3"))
  assert line == (f"error: --output={out} holds a run with other settings: --rank: 8 here, 16 in the run at {out}; "
                  f"--learning_rate: 0.001 here, 0.003 in the run at {out}. Rerun with its settings to resume it, or "
                  "choose another --output.")
  assert _contents(out) == before


def test_a_run_recorded_before_a_flag_existed_resumes_at_that_flags_default(task, small_run, tmp_path):
  """A run.json without --router_aux_loss_coef (written before the flag existed): the flag's default matches it,
  so the finished run resumes (and has nothing left to do); another value is refused, naming the default."""
  out = _copy(small_run, tmp_path)
  record = json.loads((out / "run.json").read_text())
  del record["--router_aux_loss_coef"]
  (out / "run.json").write_text(json.dumps(record))
  line = _fails(_command(task, out, *SMALL, "--router_aux_loss_coef=0.01"))
  assert line == (f"error: --output={out} holds a run with other settings: --router_aux_loss_coef: 0.01 here, 0.0 "
                  f"in the run at {out}. Rerun with its settings to resume it, or choose another --output.")
  _run(_command(task, out, *SMALL))


def test_a_load_balancing_loss_on_a_model_without_experts_is_one_error(task, tmp_path):
  line = _fails(_command(task, tmp_path / "lora", "--steps=2", "--router_aux_loss_coef=0.01"))
  assert line == ("error: router_aux_loss_coef=0.01: the model has no mixture-of-experts layer, so no router to "
                  "balance.")
  assert not (tmp_path / "lora" / "run.json").exists()  # refused before the run's record is written


def test_another_runs_output_is_never_resumed_on_other_data(task, small_run, tmp_path):
  out = _copy(small_run, tmp_path)
  before = _contents(out)
  other = tmp_path / "other.jsonl"
  other.write_text("".join(line + "\n" for line in (task / "train.jsonl").read_text().splitlines()[:40]))
  cmd = [a if not a.startswith("--data=") else f"--data={other}" for a in _command(task, out, *SMALL)]
  line = _fails(cmd)
  assert line.startswith(f"error: --output={out} holds a run with other settings: --data: the training rows (sha256 ")
  assert line.endswith("Rerun with its settings to resume it, or choose another --output.")
  assert _contents(out) == before


def test_an_adapter_that_is_not_a_runs_own_is_never_overwritten(task, tmp_path):
  out = tmp_path / "lora"
  out.mkdir()
  (out / "adapter_config.json").write_text('{"r": 4, "note": "someone else\'s"}')
  line = _fails(_command(task, out, "--steps=2"))
  assert line == (f"error: --output={out} holds adapter_config.json but no run record (run.json) of "
                  "launch.finetune; refusing to touch it (choose another --output, or move it away).")
  assert _contents(out) == {pathlib.Path("adapter_config.json"): b'{"r": 4, "note": "someone else\'s"}'}


def test_a_garbled_newest_checkpoint_falls_back_to_the_older_one(task, small_run, tmp_path):
  """Step 6's arrays overwritten with garbage: a warning naming it, a resume from step 4, and the adapter and the
  log the undamaged run wrote (each step once). The other damages are tested on the trainer
  (tests/training/test_lora_trainer.py)."""
  out = _copy(small_run, tmp_path)
  for f in (out / "checkpoints" / "6").rglob("d/*"):
    f.write_bytes(b"garbage!" * 8)
  proc = _run(_command(task, out, *SMALL))
  assert "Traceback" not in proc.stderr
  assert f"checkpoint step 6 in {out / 'checkpoints'} is unreadable" in proc.stderr
  assert "at step 4 of 6" in proc.stderr
  a, b = _adapter_tensors(small_run), _adapter_tensors(out)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert _log(out) == _log(small_run) and len(_log(out)) == 6


def test_a_checkpoint_dir_that_is_a_file_is_one_error(task, small_run, tmp_path):
  import shutil

  out = _copy(small_run, tmp_path)
  shutil.rmtree(out / "checkpoints")
  (out / "checkpoints").write_text("not a directory")
  line = _fails(_command(task, out, *SMALL))
  assert line == f"error: --checkpoint_dir {out / 'checkpoints'}: exists and is not a directory."
