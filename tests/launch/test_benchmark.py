"""`python -m launch.benchmark` end to end on a tiny random model, and the pieces its comparison rests on."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import qwenjax
from launch.bench import adapters, workload

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_end_to_end_report_plot_and_table(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.benchmark", "--preset=tiny", "--batch_sizes=1,2", "--prompt_tokens=16",
       "--new_tokens=8", "--compare", "--compare_with=transformers,llamacpp", f"--output_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())

  assert report["benchmark"]["batch_sizes"] == [1, 2]
  assert report["benchmark"]["params"] == workload.tiny_config().num_params()
  assert report["machine"]["cores"] >= 1 and report["machine"]["cpu_model"]
  assert report["versions"]["jax"] and report["versions"]["torch"] and report["versions"]["transformers"]
  used = report["device_limits"]["used"]
  assert used["peak_flops_per_s"] > 0 and used["memory_bandwidth_bytes_per_s"] > 0
  assert report["device_limits"]["h200"]["status"] == "not measured in this run"
  # llama.cpp runs a GGUF file; a random-weight preset has none, and the report says so.
  assert "gguf" in report["engines"]["llamacpp"]["skipped"]

  for name in ("qwenjax", "transformers"):
    runs = report["engines"][name]["runs"]
    assert [r["batch"] for r in runs] == [1, 2]
    for r in runs:
      for key in ("time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s", "throughput_tokens_per_s",
                  "prefill_flops_fraction", "decode_bandwidth_fraction"):
        assert r[key] > 0, (name, r["batch"], key)
      assert 0 <= r["greedy_agreement_with_qwenjax"] <= 1
  for r in report["engines"]["qwenjax"]["runs"]:
    assert r["compile_s"] >= 0 and sum(r["compilations"].values()) > 0
    assert r["compilations_after_warmup"] == 0  # the timed runs compile nothing
  assert report["engines"]["qwenjax"]["runs"][0]["greedy_agreement_with_qwenjax"] == 1

  ratios = report["ratios"]
  assert ratios["decode_batch_1"]["qwenjax_over_transformers"] > 0
  assert ratios["throughput_largest_batch"]["batch"] == 2
  assert ratios["throughput_largest_batch"]["qwenjax_over_transformers"] > 0
  assert ratios["decode_batch_1"]["qwenjax_over_llamacpp"] is None

  with Image.open(tmp_path / "tokens_per_s.png") as image:
    assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
  assert "qwenjax" in proc.stdout and "transformers" in proc.stdout and "skipped" in proc.stdout


def test_transformers_copy_of_random_weights_gives_the_same_logits():
  """The --preset comparison runs transformers on the same random weights; its logits match qwenjax's."""
  cfg = workload.tiny_config()
  for scan in (True, False):
    model = qwenjax.Qwen2(cfg, rngs=nnx.Rngs(3), scan_layers=scan)
    hf_model = adapters.transformers_from_qwenjax(model, "float32")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    graphdef, params = nnx.split(model)
    cache = qwenjax.KVCache.zeros(cfg, 2, 16)
    logits, _ = qwenjax.prefill(graphdef, params, cache, jnp.asarray(tokens), jnp.full((2,), 12, jnp.int32),
                                all_logits=True)
    with torch.no_grad():
      ref = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_chat_prompts_have_the_exact_length(tiny_tokenizer_dir):
  tok = qwenjax.Tokenizer.from_directory(tiny_tokenizer_dir)
  prompts = workload.chat_prompts(tok, 4, 80)
  assert [len(p) for p in prompts] == [80] * 4
  assert len({tuple(p) for p in prompts}) == 4  # different questions in each
  for p in prompts:
    text = tok.decode(p)
    assert text.startswith("<|im_start|>system\nYou are a helpful coding assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(Exception, match="too short for a chat prompt"):
    workload.chat_prompts(tok, 1, 10)
