"""The model registry (`qwenjax.model.registry`) and the attention layer's options (biases, per-head q/k norms)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenjax import KVCache
from qwenjax._errors import ConfigError
from qwenjax.checkpoints import hf
from qwenjax.config import PRESETS, QwenConfig
from qwenjax.model import registry
from qwenjax.model.decoder import Qwen2, StepMetadata, weight_declarations
from qwenjax.model.qwen2_vl import VL_PRESETS, Qwen2VL, QwenVLConfig


@pytest.mark.parametrize("identity, name", [
    ({"model_type": "qwen2"}, "qwen2"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "qwen2"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "qwen2"),
    ({"model_type": "qwen2_5_vl_text"}, "qwen2"),  # Qwen2.5-VL's text_config (transformers 5's nested form)
    ({}, "qwen2"),  # a config.json that names no family: read as Qwen2, as before the registry
    ({"model_type": "qwen2_5_vl"}, "qwen2_5_vl"),
    ({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}, "qwen2_5_vl"),
    ({"vision_config": {}}, "qwen2_5_vl"),  # Qwen's flat VL form, model_type left out
])
def test_every_supported_hf_identity_resolves(identity, name):
  assert registry.for_hf_config(identity, "config.json") is registry.BY_NAME[name]


def test_entries_name_their_config_and_module():
  text, vl = registry.BY_NAME["qwen2"], registry.BY_NAME["qwen2_5_vl"]
  assert (text.config_class, text.module_class, text.multimodal) == (QwenConfig, Qwen2, False)
  assert (vl.config_class, vl.module_class, vl.multimodal) == (QwenVLConfig, Qwen2VL, True)
  assert registry.for_gguf("qwen2", "m.gguf") is text
  qwen3 = registry.BY_NAME["qwen3"]  # Qwen3 dense: the same classes; QwenConfig reads its attention options
  assert (qwen3.config_class, qwen3.module_class, qwen3.multimodal) == (QwenConfig, Qwen2, False)
  assert registry.for_hf_config({"architectures": ["Qwen3ForCausalLM"]}) is qwen3
  assert registry.for_gguf("qwen3", "m.gguf") is qwen3
  moe = registry.BY_NAME["qwen3_moe"]  # Qwen3-MoE: the same classes; QwenConfig's num_experts makes layers sparse
  assert (moe.config_class, moe.module_class) == (QwenConfig, Qwen2)
  assert registry.for_hf_config({"architectures": ["Qwen3MoeForCausalLM"]}) is moe
  assert registry.for_gguf("qwen3moe", "m.gguf") is moe
  assert registry.for_config(PRESETS["qwen2.5-0.5b"]) is text and registry.for_config(VL_PRESETS["qwen2.5-vl-3b"]) is vl
  assert registry.model_class(PRESETS["qwen2.5-0.5b"]) is Qwen2
  assert registry.model_class(VL_PRESETS["qwen2.5-vl-3b"]) is Qwen2VL


@pytest.mark.parametrize("call, key, value", [
    (lambda: registry.for_hf_config({"model_type": "llama"}, "ckpt/config.json"), "model_type", "llama"),
    (lambda: registry.for_hf_config({"model_type": "qwen2_moe"}, "ckpt/config.json"), "model_type", "qwen2_moe"),
    (lambda: registry.for_hf_config({"architectures": ["LlamaForCausalLM"]}, "ckpt/config.json"), "architectures",
     "LlamaForCausalLM"),
    (lambda: registry.for_gguf("qwen2moe", "ckpt/config.json"), "general.architecture", "qwen2moe"),
    (lambda: registry.for_hf_config({"model_type": ["qwen2"]}, "ckpt/config.json"), "model_type", ["qwen2"]),
    (lambda: registry.for_gguf(None, "ckpt/config.json"), "general.architecture", None),
])
def test_an_unknown_identity_is_one_config_error_naming_file_value_and_supported(call, key, value):
  with pytest.raises(ConfigError) as err:
    call()
  message = str(err.value)
  assert message.startswith(f"ckpt/config.json: {key} {value!r} is not a model qwenjax serves (supported: ")
  supported = {"model_type": ["'qwen2'", "'qwen2_5_vl'", "'qwen2_5_vl_text'", "'qwen3'", "'qwen3_moe'"],
               "architectures": ["'Qwen2ForCausalLM'", "'Qwen2_5_VLForConditionalGeneration'", "'Qwen3ForCausalLM'",
                                 "'Qwen3MoeForCausalLM'"],
               "general.architecture": ["'qwen2'", "'qwen3'", "'qwen3moe'"]}[key]
  assert message.endswith(", ".join(supported) + ").")


def test_a_checkpoint_directory_of_an_unknown_family_fails_naming_its_file(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 8}))
  with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: model_type 'mistral' is not a model"):
    hf.read_config(tmp_path)


def test_attention_options_default_to_qwen2():
  cfg = QwenConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=4, num_kv_heads=2,
                   head_dim=8)
  assert cfg.attention_bias and not cfg.qk_norm
  names = {var.get_metadata()["hf"].name for _, var in weight_declarations(Qwen2(cfg, rngs=nnx.Rngs(0)))}
  assert "model.layers.{layer}.self_attn.q_proj.bias" in names
  assert not any("q_norm" in n or "k_norm" in n for n in names)


def _rms(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _reference(cfg: QwenConfig, w: dict, tokens: np.ndarray) -> np.ndarray:
  """A hand-written one-layer Qwen2 forward in float64 numpy, with the attention options: [T] -> [T, D] hidden."""
  eps, n, k, h = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  x = w["embed"][tokens]
  a = _rms(x, w["layers/attn_norm/scale"][0], eps)
  q = np.einsum("td,dnh->tnh", a, w["layers/attn/q_kernel"][0])
  kk = np.einsum("td,dnh->tnh", a, w["layers/attn/k_kernel"][0])
  v = np.einsum("td,dnh->tnh", a, w["layers/attn/v_kernel"][0])
  if cfg.attention_bias:
    q, kk, v = q + w["layers/attn/q_bias"][0], kk + w["layers/attn/k_bias"][0], v + w["layers/attn/v_bias"][0]
  if cfg.qk_norm:  # each head over head_dim, before RoPE
    q, kk = _rms(q, w["layers/attn/q_norm/scale"][0], eps), _rms(kk, w["layers/attn/k_norm/scale"][0], eps)
  inv_freq, _ = cfg.rope_frequencies()
  angle = np.arange(len(tokens))[:, None] * inv_freq.astype(np.float64)[None]  # [T, H/2]
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

  def rope(t):
    t1, t2 = t[..., :h // 2], t[..., h // 2:]
    return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], axis=-1)

  q, kk = rope(q), rope(kk)
  kk, v = np.repeat(kk, n // k, axis=1), np.repeat(v, n // k, axis=1)
  scores = np.einsum("tnh,snh->nts", q, kk) / np.sqrt(h)
  scores = np.where(np.tril(np.ones((len(tokens),) * 2, bool)), scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  x = x + np.einsum("nts,snh,nhd->td", p, v, w["layers/attn/o_kernel"][0])
  m = _rms(x, w["layers/mlp_norm/scale"][0], eps)
  g, u = m @ w["layers/mlp/gate"][0], m @ w["layers/mlp/up"][0]
  x = x + (g / (1 + np.exp(-g)) * u) @ w["layers/mlp/down"][0]
  return _rms(x, w["final_norm/scale"], eps)


@pytest.mark.parametrize("attention_bias", [True, False])
def test_qk_norm_matches_a_numpy_reference(attention_bias):
  cfg = QwenConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=4, num_kv_heads=2,
                   head_dim=8, rope_theta=10000.0, attention_bias=attention_bias, qk_norm=True)
  model = Qwen2(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  weights = {}
  for path, var in weight_declarations(model):  # every weight random, the norms' scales and biases included
    value = rng.normal(0.0, 0.5, var.shape).astype(np.float32)
    if path[-1] == "scale":
      value = 1.0 + value
    var[...] = jnp.asarray(value)
    weights["/".join(map(str, path))] = value.astype(np.float64)
  names = {var.get_metadata()["hf"].name for _, var in weight_declarations(model)}
  assert {"model.layers.{layer}.self_attn.q_norm.weight", "model.layers.{layer}.self_attn.k_norm.weight"} <= names
  assert ("model.layers.{layer}.self_attn.q_proj.bias" in names) == attention_bias
  assert weights["layers/attn/q_norm/scale"].shape == (1, cfg.head_dim)

  tokens = rng.integers(0, cfg.vocab_size, 7)
  with jax.default_matmul_precision("highest"):
    hidden, _ = model(jnp.asarray(tokens[None], jnp.int32), KVCache.zeros(cfg, 1, 8),
                      StepMetadata(jnp.arange(7, dtype=jnp.int32)[None], attend_to_cache=False))
  want = _reference(cfg, weights, tokens)
  np.testing.assert_allclose(np.asarray(hidden[0]), want, rtol=2e-4, atol=2e-4)
  # The norms matter: the same weights without them give another answer.
  without = _reference(dataclasses.replace(cfg, qk_norm=False), weights, tokens)
  assert np.abs(without - want).max() > 1e-2
