"""launch.finetune on a tiny Qwen2 and a synthetic task (reversing short strings): the loss falls, the adapter it
writes loads in peft with our logits, a killed run resumes to the same adapter bit for bit, and a mesh run
matches one device. The loss itself is checked against transformers in tests/training/test_lora_trainer.py."""

import json
import os
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
from qwenjax.model.kv_cache import KVCache
from qwenjax.model.lora import LoraBank

from conftest import REPO, build_tiny_qwen2, save_tiny_tokenizer_dir


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
  proc = _run(_command(task, out, "--steps=150", "--eval_every=50", "--save_every=50"))
  assert proc.stdout.strip() == str(out)
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
  h, _ = model(jnp.asarray([ids], jnp.int32), jnp.arange(len(ids), dtype=jnp.int32)[None],
               KVCache.zeros(model.cfg, 1, 16, model.dtype), attend_to_cache=False, lora_index=jnp.zeros(1, jnp.int32))
  np.testing.assert_allclose(np.asarray(model.logits(h))[0], want, atol=1e-4, rtol=0)
  assert np.abs(want - base_logits).max() > 0.1  # training moved the model


def _adapter_tensors(out):
  return safetensors.numpy.load_file(out / "adapter_model.safetensors")


def test_a_killed_run_resumes_to_the_same_adapter_bit_for_bit(task, tmp_path):
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
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed / "adapter_model.safetensors").exists()
  resumed = _run(_command(task, killed, *args))
  assert "Resumed from" in resumed.stderr and "at step 20 of 40" in resumed.stderr
  a, b = _adapter_tensors(whole), _adapter_tensors(killed)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert [h["loss"] for h in _log(whole)][20:] == [h["loss"] for h in _log(killed)][-20:]


def test_a_mesh_run_matches_one_device(task, tmp_path):
  """data:2,tensor:2 on 4 CPU devices: base weights sharded by the inference rules, rows split over data."""
  args = ("--steps=12", "--eval_fraction=0.25")
  one = tmp_path / "one"
  _run(_command(task, one, *args))
  mesh = tmp_path / "mesh"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  _run(_command(task, mesh, *args, "--mesh=data:2,tensor:2"), env=env)
  for x, y in zip(_log(one), _log(mesh)):
    assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
  a, b = _adapter_tensors(one), _adapter_tensors(mesh)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-4, rtol=0, err_msg=key)
