"""Shared test setup: exact float32 matmuls, and tiny random Qwen2 checkpoints built with transformers."""

import json
import os
import pathlib

# Keep XLA to the machine's cores and quiet; must precede importing jax.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def build_tiny_qwen2(directory: pathlib.Path, seed: int = 0, **overrides):
  """Saves a random Qwen2ForCausalLM with transformers' own save_pretrained; returns the torch model."""
  import torch
  import transformers

  kw = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=512, rope_theta=1e4, tie_word_embeddings=False,
            bos_token_id=300, eos_token_id=301)
  kw.update(overrides)
  cfg = transformers.Qwen2Config(**kw)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  # Random init gives near-uniform logits; widen them so greedy decoding is not decided by float noise.
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() == 2:
        p.mul_(2.5)
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
  """tiny_factory(name, **config) -> (checkpoint dir, torch model), cached per name for the session."""
  made = {}

  def make(name, **overrides):
    if name not in made:
      d = tmp_path_factory.mktemp(name)
      made[name] = (d, build_tiny_qwen2(d, **overrides))
    return made[name]

  return make
