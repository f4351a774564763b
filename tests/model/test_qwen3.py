"""Qwen3 dense against transformers' Qwen3ForCausalLM: config reading, parameter counts, logits within 1e-4 in
float32 (prefill and decode), greedy tokens through the paged engine and launch.batch_generate."""

import dataclasses
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from qwenjax import ConfigError, Engine, KVCache, SamplingParams, prefill
from qwenjax.checkpoints.hf import load_model
from qwenjax.config import QwenConfig
from qwenjax.model import registry

from conftest import (
  REPO,
  build_tiny_qwen3,
  check_paged_greedy,
  check_prefill_then_decode,
  save_tiny_tokenizer_dir,
  write_gguf_from_hf,
)

TOL = 1e-4

CONFIGS = {
    # head_dim 32 with hidden 64 and 4 heads (not hidden / heads = 16), GQA 2, tied embeddings.
    "head_dim_tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          tie_word_embeddings=True),
    # GQA 8, untied, rope_theta 1e6.
    "gqa8_untied": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=1, head_dim=16,
                        tie_word_embeddings=False, rope_theta=1e6),
    # Sliding windows where layer_types says so (layers 1 and 2 of 3), window 8.
    "sliding": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                    sliding_window=8, max_window_layers=1, tie_word_embeddings=False),
}


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def tiny(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(f"qwen3_{request.param}")
  return d, build_tiny_qwen3(d, **CONFIGS[request.param])


def test_config_reads_qwen3s_attention_and_counts_its_parameters(tiny):
  d, hf = tiny
  raw = json.loads((d / "config.json").read_text())
  assert registry.for_hf_config(raw).name == "qwen3"
  cfg = QwenConfig.from_file(d / "config.json")
  assert cfg.qk_norm and not cfg.attention_bias and cfg.head_dim == hf.config.head_dim
  assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
  assert hf.config.layer_types is not None
  windows = cfg.layer_windows().tolist()
  for i, kind in enumerate(hf.config.layer_types):
    assert (windows[i] == hf.config.sliding_window) == (kind == "sliding_attention" and cfg.use_sliding_window)


def test_prefill_then_decode_logits_match_transformers(tiny):
  d, hf = tiny
  model = load_model(d)
  ids = np.random.default_rng(0).integers(0, 300, size=(2, 24))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).logits.numpy()
  check_prefill_then_decode(model, ids, ref, tol=TOL)


def test_greedy_tokens_through_the_paged_engine_match_transformers(tiny):
  d, hf = tiny
  check_paged_greedy(load_model(d), hf)


def test_batch_generate_serves_chat_lines_with_chat_template_kwargs(tmp_path, qwen3_template):
  """A Qwen3 checkpoint with a template that switches thinking off by a variable: chat lines with
  chat_template_kwargs render as transformers renders them and generate its greedy tokens."""
  template = qwen3_template
  d = save_tiny_tokenizer_dir(tmp_path / "ckpt", chat_template=template)
  hf = build_tiny_qwen3(d, vocab_size=512, **CONFIGS["head_dim_tied"])
  tok = transformers.AutoTokenizer.from_pretrained(d)
  messages = [{"role": "user", "content": "Hi there"}]
  lines = [{"id": "off", "messages": messages, "chat_template_kwargs": {"enable_thinking": False},
            "sampling": {"max_tokens": 8, "ignore_eos": True}},
           {"custom_id": "on", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": messages, "max_tokens": 8, "ignore_eos": True}}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  proc = subprocess.run([sys.executable, "-m", "launch.batch_generate", f"--model={d}",
                         f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'out.jsonl'}", "--nowarm_up",
                         "--max_seq_len=256"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  records = {r["custom_id"] if "custom_id" in r else r["id"]: r for r in records}
  for key, kwargs in (("off", {"enable_thinking": False}), ("on", {})):
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                       **kwargs))
    with torch.no_grad():
      want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    record = records[key]
    text = record["text"] if key == "off" else record["response"]["body"]["choices"][0]["message"]["content"]
    assert text == tok.decode(want, skip_special_tokens=True).rstrip("\ufffd"), key
    usage = record["usage"] if key == "off" else record["response"]["body"]["usage"]
    assert usage["prompt_tokens"] == len(ids)
  # launch.generate takes the same variables as a flag.
  gen = subprocess.run([sys.executable, "-m", "launch.generate", f"--model={d}", "--prompt=Hi there", "--json",
                        "--max_new_tokens=4", "--ignore_eos", "--chat_template_kwargs={\"enable_thinking\": false}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert gen.returncode == 0, gen.stderr[-3000:]
  record = json.loads(gen.stdout)
  off = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, return_dict=False)
  assert record["usage"]["prompt_tokens"] == len(off) and record["content"] == record["text"]
  bad = subprocess.run([sys.executable, "-m", "launch.generate", f"--model={d}", "--prompt=Hi",
                        "--chat_template_kwargs={enable_thinking: false}"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: --chat_template_kwargs is not JSON: Expecting property name enclosed in double quotes")
  # The template thinks, so replies are split (--reasoning_content): these hold no block, so no reasoning.
  assert records["off"]["reasoning_content"] is None and records["off"]["content"] == records["off"]["text"]
  assert records["on"]["response"]["body"]["choices"][0]["message"]["reasoning_content"] is None


def test_malformed_qwen3_fields_are_one_error_naming_them(tmp_path):
  base = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
  sliding = dict(base, use_sliding_window=True, sliding_window=8)
  with pytest.raises(ConfigError, match="layer_types has 1 entries for 2 layers"):
    QwenConfig.from_hf_config(dict(sliding, layer_types=["full_attention"]), "c.json")
  with pytest.raises(ConfigError, match="'chunked_attention'"):
    QwenConfig.from_hf_config(dict(sliding, layer_types=["full_attention", "chunked_attention"]), "c.json")
  windows = QwenConfig.from_hf_config(dict(sliding, layer_types=["sliding_attention", "full_attention"]), "c.json")
  assert windows.layer_windows().tolist() == [8, np.iinfo(np.int32).max]  # as listed, not max_window_layers' rule
  with pytest.raises(ConfigError, match="c.json: attention_bias must be a boolean"):
    QwenConfig.from_hf_config(dict(base, attention_bias="no"), "c.json")
  with pytest.raises(ConfigError, match="c.json: attention_bias is true, which in Qwen3 also puts a bias on o_proj"):
    QwenConfig.from_hf_config(dict(base, attention_bias=True), "c.json")
  assert not QwenConfig.from_hf_config(base, "c.json").attention_bias
  assert QwenConfig.from_hf_config(dict(base, model_type="qwen2"), "c.json").attention_bias


@pytest.mark.parametrize("q8", [False, True], ids=["f32", "q8_0"])
def test_a_qwen3_gguf_loads_token_exact(tmp_path, qwen_template, q8):
  """A tiny Qwen3 written as llama.cpp lays out a qwen3 GGUF (gguf.GGUFWriter: attn_q_norm / attn_k_norm, head
  size in attention.key_length): its config is transformers', and its logits are transformers' within 1e-4 (with
  Q8_0 matrices: transformers' model holding the same Q8_0-rounded weights) and its greedy tokens identical.
  (Q8_0 into int8 weights goes the same way for every family: tests/checkpoints/test_gguf.py.)"""
  from qwenjax import load
  from qwenjax.checkpoints.gguf_file import GGUFCheckpoint

  d = save_tiny_tokenizer_dir(tmp_path / "ckpt")
  hf = build_tiny_qwen3(d, vocab_size=512, **CONFIGS["head_dim_tied"])
  cfg = hf.config
  path = tmp_path / "tiny-qwen3.gguf"
  rounded = write_gguf_from_hf(path, hf, d, qwen_template, arch="qwen3", q8=q8)
  with GGUFCheckpoint(path) as checkpoint:
    config = checkpoint.hf_config()
  assert (config["model_type"], config["head_dim"]) == ("qwen3", cfg.head_dim)
  ours, theirs = QwenConfig.from_hf_config(config), QwenConfig.from_file(d / "config.json")
  assert ours.layer_windows().tolist() == theirs.layer_windows().tolist()  # no sliding either way
  assert ours == dataclasses.replace(theirs, eos_token_ids=ours.eos_token_ids, bos_token_id=ours.bos_token_id,
                                     max_window_layers=0, layer_types=None)  # the tokenizer's ids; no windows
  if rounded:
    with torch.no_grad():
      for name, value in rounded.items():
        hf.get_parameter(name).copy_(value)
  loaded = load(str(path))
  graphdef, params = nnx.split(loaded.model)
  ids = np.random.default_rng(3).integers(0, 500, size=(1, 20))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).logits.numpy()
  tokens = np.zeros((1, 32), np.int32)
  tokens[:, :20] = ids
  logits, _ = prefill(graphdef, params, KVCache.zeros(loaded.model.cfg, 1, 64), jnp.asarray(tokens), jnp.array([20]),
                      all_logits=True)
  np.testing.assert_allclose(np.asarray(logits)[:, :20], ref, atol=TOL, rtol=0)
  engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids=(), max_seq_len=128)
  out = engine.generate([ids[0].tolist()], SamplingParams(max_tokens=12))[0]
  with torch.no_grad():
    want = hf.generate(torch.as_tensor(ids), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                       attention_mask=torch.ones_like(torch.as_tensor(ids)))[0, 20:].tolist()
  assert out.token_ids == want
