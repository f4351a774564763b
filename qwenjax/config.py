"""Architecture of the Qwen2.5 dense decoders: one frozen dataclass, presets, and Hugging Face parsing.

`QwenConfig` holds what a checkpoint fixes (sizes, norms, RoPE). How a model runs (dtypes, scanned or
unrolled layers, cache length) is chosen where the model is built, not here.

    cfg = QwenConfig.from_hf_config(json.load(open("config.json")))
    cfg = PRESETS["qwen2.5-7b"]
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

import numpy as np

from qwenjax._errors import ConfigError


def read_json(path: str | pathlib.Path) -> dict[str, Any]:
  """A JSON object from a config file; ConfigError naming the file if it is missing, unreadable, not JSON or not
  an object."""
  path = pathlib.Path(path)
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise ConfigError(f"{path}: file not found.") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: cannot be read ({e}).") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e}).") from None
  if not isinstance(value, dict):
    raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}.")
  return value


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE context extension. Qwen documents YaRN: {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}."""

  kind: str  # "linear" or "yarn"
  factor: float
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Hyperparameters of a Qwen2 / Qwen2.5 decoder (`Qwen2ForCausalLM`)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  use_sliding_window: bool = False
  sliding_window: int | None = None
  max_window_layers: int = 0
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  # Qwen2.5-VL's 3D M-RoPE: rotary frequencies split into (temporal, height, width) sections, each rotated by
  # its own position axis; None: ordinary 1D RoPE.
  mrope_section: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads "
                        f"({self.num_kv_heads}).")
    if self.rope_scaling is not None and self.rope_scaling.kind not in ("linear", "yarn"):
      raise ConfigError(f"rope_scaling type {self.rope_scaling.kind!r} is not supported (qwenjax supports "
                        "default, linear and yarn).")
    if self.use_sliding_window and not self.sliding_window:
      raise ConfigError("use_sliding_window is true but sliding_window is not set.")
    if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
      raise ConfigError(f"mrope_section {list(self.mrope_section)} does not sum to head_dim / 2 "
                        f"({self.head_dim // 2}).")

  @property
  def num_groups(self) -> int:
    """Query heads that share one KV head (G)."""
    return self.num_heads // self.num_kv_heads

  def layer_windows(self) -> np.ndarray:
    """[L] int32: the sliding-window span of each layer, or a span larger than any position for full attention.

    Hugging Face's Qwen2 slides the window on layers >= max_window_layers when use_sliding_window is set.
    """
    full = np.iinfo(np.int32).max
    return np.array([self.sliding_window if self.use_sliding_window and i >= self.max_window_layers else full
                     for i in range(self.num_layers)], np.int32)

  def rope_frequencies(self) -> tuple[np.ndarray, float]:
    """Inverse frequencies [H/2] (float32) and the factor that scales cos and sin (YaRN's attention factor)."""
    dim = self.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(self.rope_theta) ** exponents
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    rs = self.rope_scaling
    if rs is None:
      return inv_freq, 1.0
    if rs.kind == "linear":
      return (inv_freq / np.float32(rs.factor)).astype(np.float32), 1.0
    # YaRN: interpolate low frequencies by `factor`, keep high ones, ramp linearly between the dims where
    # beta_fast and beta_slow rotations fit in the original context.
    original = rs.original_max_position_embeddings or self.max_position_embeddings

    def correction_dim(rotations: float) -> float:
      return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(self.rope_theta))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_freq = ((1.0 / (rs.factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)

    def mscale(scale: float, m: float = 1.0) -> float:
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rs.attention_factor is not None:
      attention_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
      attention_factor = mscale(rs.factor, rs.mscale) / mscale(rs.factor, rs.mscale_all_dim)
    else:
      attention_factor = mscale(rs.factor)
    return inv_freq, float(attention_factor)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json") -> "QwenConfig":
    """Builds the config from a Qwen2 `config.json` dict, in the form Qwen ships or transformers 5 writes."""
    model_type = hf.get("model_type")
    if model_type not in (None, "qwen2", "qwen2_5_vl_text"):
      raise ConfigError(f"{source}: model_type {model_type!r} is not a Qwen2 dense decoder (expected 'qwen2').")
    try:
      hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
      kv_heads = int(hf.get("num_key_value_heads") or heads)
      rope = dict(hf.get("rope_parameters") or {})  # transformers-5 form
      legacy = hf.get("rope_scaling")  # the form Qwen's released configs use
      if legacy:
        rope.update(legacy)
      rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
      kind = rope.get("rope_type", rope.get("type", "default"))
      mrope = rope.get("mrope_section")
      if kind == "mrope":  # Qwen2.5-VL's released configs: {"type": "mrope", "mrope_section": [16, 24, 24]}
        kind = "default"
      scaling = None
      if kind not in ("default", None):
        scaling = RopeScaling(
            kind=kind, factor=float(rope["factor"]),
            original_max_position_embeddings=rope.get("original_max_position_embeddings"),
            beta_fast=float(rope.get("beta_fast") or 32.0), beta_slow=float(rope.get("beta_slow") or 1.0),
            attention_factor=rope.get("attention_factor"), mscale=rope.get("mscale"),
            mscale_all_dim=rope.get("mscale_all_dim"), truncate=bool(rope.get("truncate", True)))
      eos = hf.get("eos_token_id")
      eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
      use_sw = bool(hf.get("use_sliding_window", False))
      return cls(
          vocab_size=int(hf["vocab_size"]), hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]),
          num_layers=int(hf["num_hidden_layers"]), num_heads=heads, num_kv_heads=kv_heads,
          head_dim=int(hf.get("head_dim") or hidden // heads), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          rope_theta=rope_theta, rope_scaling=scaling,
          tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
          max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
          use_sliding_window=use_sw, sliding_window=hf.get("sliding_window") if use_sw else None,
          max_window_layers=int(hf.get("max_window_layers", 0) or 0),
          bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
          mrope_section=tuple(int(x) for x in mrope) if mrope else None)
    except KeyError as e:
      raise ConfigError(f"{source}: required field {e.args[0]!r} is missing.") from None
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{source}: {e}") from None

  @classmethod
  def from_file(cls, path: str | pathlib.Path) -> "QwenConfig":
    return cls.from_hf_config(read_json(path), source=str(path))

  def num_params(self) -> int:
    """Parameter count from the formula (the eval_shape test checks it against the module tree)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    per_layer = d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + d


def _preset(hidden, inter, layers, heads, kv, vocab, tied, eps=1e-6) -> QwenConfig:
  return QwenConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                    num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads, rms_norm_eps=eps,
                    rope_theta=1e6, tie_word_embeddings=tied, max_position_embeddings=32768,
                    bos_token_id=151643, eos_token_ids=(151645, 151643))


# The released Qwen2.5 sizes (Qwen2.5 technical report, Table 1; the models' config.json files).
PRESETS: dict[str, QwenConfig] = {
    "qwen2.5-0.5b": _preset(896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": _preset(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-3b": _preset(2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b": _preset(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-14b": _preset(5120, 13824, 48, 40, 8, 152064, False, eps=1e-5),
    "qwen2.5-32b": _preset(5120, 27648, 64, 40, 8, 152064, False, eps=1e-5),
    "qwen2.5-72b": _preset(8192, 29568, 80, 64, 8, 152064, False),
}
