"""Config parsing, presets against published parameter counts, RoPE frequencies against transformers."""

import dataclasses
import json

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from qwenjax import PRESETS, ConfigError, QwenConfig
from qwenjax.model.decoder import abstract_model, weight_declarations

# Published totals and non-embedding counts, in billions, from the Qwen2.5 model cards. The cards round
# loosely (the 32B card says 32.5B for 32.76B weights), so they are held to 1%; the exact totals that the
# released safetensors hold are known for 0.5B and 7B and held exactly.
PUBLISHED = {
    "qwen2.5-0.5b": (0.49, 0.36),
    "qwen2.5-1.5b": (1.54, 1.31),
    "qwen2.5-3b": (3.09, 2.77),
    "qwen2.5-7b": (7.61, 6.53),
    "qwen2.5-14b": (14.7, 13.1),
    "qwen2.5-32b": (32.5, 31.0),
    "qwen2.5-72b": (72.7, 70.0),
}


# The Qwen3 model cards' "Number of Parameters" and "Non-Embedding", as printed: each figure is held to its own
# rounding (1.7 means [1.65, 1.75)).
PUBLISHED_QWEN3 = {
    "qwen3-0.6b": ("0.6", "0.44"),
    "qwen3-1.7b": ("1.7", "1.4"),
    "qwen3-4b": ("4.0", "3.6"),
    "qwen3-8b": ("8.2", "6.95"),
    "qwen3-14b": ("14.8", "13.2"),
    "qwen3-32b": ("32.8", "31.2"),
}


def _counted(cfg) -> tuple[int, int]:
  """(total, non-embedding) parameters of the module tree a config builds (jax.eval_shape: nothing allocated)."""
  sizes = {path: int(np.prod(var.shape)) for path, var in weight_declarations(abstract_model(cfg))}
  return sum(sizes.values()), sum(sizes.values()) - sizes[("embed",)] - sizes.get(("lm_head",), 0)


@pytest.mark.parametrize("name", sorted(PUBLISHED_QWEN3))
def test_qwen3_presets_match_their_model_cards(name):
  cfg = PRESETS[name]
  assert cfg.qk_norm and not cfg.attention_bias and cfg.head_dim == 128
  total, non_embedding = _counted(cfg)
  assert total == cfg.num_params()
  for counted, printed in zip((total, non_embedding), PUBLISHED_QWEN3[name]):
    half_unit = 0.5 * 10 ** -len(printed.partition(".")[2])
    assert abs(counted / 1e9 - float(printed)) < half_unit, (name, counted, printed)


# The Qwen3-MoE model cards' total and activated parameters, as printed ("30.5B", "3.3B"; "235B", "22B").
PUBLISHED_QWEN3_MOE = {"qwen3-30b-a3b": ("30.5", "3.3"), "qwen3-235b-a22b": ("235", "22")}


@pytest.mark.parametrize("name", sorted(PUBLISHED_QWEN3_MOE))
def test_qwen3_moe_presets_match_their_model_cards(name):
  """Total parameters from the module tree (jax.eval_shape), active ones from it less the experts a token does not
  use (all but 8 of 128 per layer). The total is within the rounding of its printed figure; the card truncates the
  active one (3,353,032,704 is printed 3.3B), so that lies in [printed, printed + one unit)."""
  cfg = PRESETS[name]
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.qk_norm) == (128, 8, True, True)
  sizes = {path: int(np.prod(var.shape)) for path, var in weight_declarations(abstract_model(cfg))}
  total = sum(sizes.values())
  experts = sum(n for path, n in sizes.items() if path[-1] in ("gate", "up", "down") and "mlp" in path)
  active = total - experts * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
  assert (total, active) == (cfg.num_params(), cfg.active_params())
  printed_total, printed_active = PUBLISHED_QWEN3_MOE[name]
  half_unit = 0.5 * 10 ** -len(printed_total.partition(".")[2])
  assert abs(total / 1e9 - float(printed_total)) < half_unit, (name, total, printed_total)
  unit = 10.0 ** -len(printed_active.partition(".")[2])
  assert float(printed_active) <= active / 1e9 < float(printed_active) + unit, (name, active, printed_active)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published(name):
  cfg = PRESETS[name]
  model = abstract_model(cfg)  # jax.eval_shape underneath: nothing is allocated
  sizes = {path: int(np.prod(var.shape)) for path, var in weight_declarations(model)}
  total = sum(sizes.values())
  embedding = sizes[("embed",)] + sizes.get(("lm_head",), 0)
  want_total, want_non_embedding = PUBLISHED[name]
  assert total / 1e9 == pytest.approx(want_total, rel=0.01)
  assert (total - embedding) / 1e9 == pytest.approx(want_non_embedding, rel=0.01)
  assert total == cfg.num_params() == EXACT.get(name, total)


EXACT = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512}


QWEN25_7B_INSTRUCT = {  # config.json as Qwen ships it
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
}


def test_released_config_form_parses():
  cfg = QwenConfig.from_hf_config(QWEN25_7B_INSTRUCT)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3584, 28, 28, 4, 128)
  assert cfg.rope_scaling.kind == "yarn" and cfg.rope_scaling.factor == 4.0
  assert cfg.rope_scaling.original_max_position_embeddings == 32768
  assert not cfg.use_sliding_window and cfg.sliding_window is None
  assert cfg.eos_token_ids == (151645,)
  # Apart from YaRN and the unused window fields, the released 7B config is the preset.
  same = dict(rope_scaling=None, eos_token_ids=(), max_window_layers=0)
  assert dataclasses.replace(cfg, **same) == dataclasses.replace(PRESETS["qwen2.5-7b"], **same)


def test_transformers5_form_parses_the_same(tmp_path):
  legacy = QwenConfig.from_hf_config(QWEN25_7B_INSTRUCT)
  hf = transformers.Qwen2Config(**{k: v for k, v in QWEN25_7B_INSTRUCT.items() if k != "rope_scaling"},
                                rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                 "original_max_position_embeddings": 32768})
  hf.save_pretrained(tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert "rope_parameters" in saved and "rope_theta" not in saved  # really the new form
  assert QwenConfig.from_file(tmp_path / "config.json") == legacy


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
])
def test_rope_frequencies_match_transformers(rope):
  params = {"rope_theta": 1e6, **(rope or {"rope_type": "default"})}
  hf = transformers.Qwen2Config(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                                max_position_embeddings=131072,
                                rope_parameters=params)
  init = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
  if init is None:  # "default" lives on the model class in transformers 5
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
    init = Qwen2RotaryEmbedding.compute_default_rope_parameters
  want_freq, want_scale = init(hf)
  cfg = QwenConfig.from_hf_config(hf.to_dict())
  freq, scale = cfg.rope_frequencies()
  np.testing.assert_allclose(freq, want_freq.numpy(), rtol=1e-6)
  assert scale == pytest.approx(want_scale, rel=1e-7)


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "llama"}, "not a Qwen2 or Qwen3 decoder"),
    ({"num_key_value_heads": 5}, "not a multiple"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
    ({"hidden_size": None}, "config.json"),
])
def test_bad_configs_raise_one_clear_error(bad, message):
  with pytest.raises(ConfigError, match=message):
    QwenConfig.from_hf_config({**QWEN25_7B_INSTRUCT, **bad})


def test_missing_field_is_named():
  broken = dict(QWEN25_7B_INSTRUCT)
  del broken["intermediate_size"]
  with pytest.raises(ConfigError, match="'intermediate_size' is missing"):
    QwenConfig.from_hf_config(broken)
