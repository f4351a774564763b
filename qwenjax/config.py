"""Architecture of the Qwen2.5 dense decoders: one frozen dataclass, presets, and Hugging Face parsing.

`QwenConfig` holds what a checkpoint fixes (sizes, norms, RoPE). How a model runs (dtypes, scanned or
unrolled layers, cache length) is chosen where the model is built, not here; the choices it is built from live
here: `DTYPES` (checked by `check_dtype`), `DEFAULT_DTYPE` and `default_scan_layers()`. `read_json` is the one
reader of JSON files, for configs and checkpoints alike.

    cfg = QwenConfig.from_hf_config(json.load(open("config.json")))
    cfg = PRESETS["qwen2.5-7b"]
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import typing
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import _files
from qwenjax._errors import ConfigError, QwenJaxError, first_line

# The dtypes a model computes and stores its weights in, by the names flags and files use.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_DTYPE = "float32"


def check_dtype(name: Any, what: str = "dtype") -> Any:
  """The jnp dtype that `name` ("float32" or "bfloat16") stands for; a ConfigError naming `what` (the argument,
  flag or file field) for anything else."""
  if not isinstance(name, str) or name not in DTYPES:
    raise ConfigError(f"{what} must be one of {', '.join(sorted(DTYPES))}, got {name!r}.")
  return DTYPES[name]


def default_scan_layers() -> bool:
  """Scanned layers compile fast on TPU/GPU; on XLA:CPU unrolled layers decode faster (measured 2.6x)."""
  return jax.default_backend() != "cpu"


def read_json(path: str | pathlib.Path, *, error: type[QwenJaxError] = ConfigError,
              optional: bool = False) -> dict[str, Any] | None:
  """The JSON object in a file. `error` (ConfigError; CheckpointError for a checkpoint's files) names the file if
  it is missing (unless `optional`: then None), unreadable, not JSON or not an object."""
  path = pathlib.Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    if optional:
      return None
    raise error(f"{path}: file not found.") from None
  except (OSError, UnicodeDecodeError) as e:
    raise error(f"{path}: cannot be read ({first_line(e)}).") from None
  try:
    value = _files.loads(text)  # depth-bounded: a JSONDecodeError, never a RecursionError
  except json.JSONDecodeError as e:
    raise error(f"{path} is not valid JSON (line {e.lineno}: {e.msg}).") from None
  if not isinstance(value, dict):
    raise error(f"{path}: expected a JSON object, got {type(value).__name__}.")
  return value


REQUIRED = object()  # read_field's default: the field must be present
_KIND_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string", dict: "object"}


def read_field(obj: Mapping[str, Any], key: str, kind: type, source: str, default: Any = REQUIRED, *,
               positive: bool = False, within: str | None = None) -> Any:
  """obj[key] checked, never coerced, against `kind`: int (a JSON integer: not true, not 2.0), float (a finite
  JSON number, returned as float), bool, str, dict, or list[int] / list[float] / list[str] (returned as a tuple).
  positive: numbers (or list items) must be > 0. A missing or null field is `default`, or, if REQUIRED, a
  ConfigError. Errors name `source` (the file) and the field; `within`: the object holding it ("vision_config")."""
  value = obj.get(key)
  if value is None:
    if default is REQUIRED:
      raise ConfigError(f"{source}: required {f'{within} ' if within else ''}field {key!r} is missing.")
    return default
  item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None

  def ok(v, t) -> bool:
    if isinstance(v, bool) != (t is bool):
      return False
    if t is float:
      return isinstance(v, (int, float)) and math.isfinite(v) and not (positive and v <= 0)
    return isinstance(v, t) and not (positive and t is int and v <= 0)

  if not (isinstance(value, list) and all(ok(v, item) for v in value) if item else ok(value, kind)):
    name = ("positive " if positive and (item or kind) in (int, float) else "") + _KIND_NAMES[item or kind]
    what = f"a list of {name}s" if item else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    shown = json.dumps(value, default=repr)
    shown = f"the string {shown}" if isinstance(value, str) else shown
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise ConfigError(f"{source}: {f'{within}.' if within else ''}{key} must be {what}, got {shown}.")
  if item:
    return tuple(float(v) if item is float else v for v in value)
  return float(value) if kind is float else value


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE context extension. Qwen documents YaRN:
  {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}."""

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
  """Hyperparameters of a Qwen2 / Qwen2.5, Qwen3 or Qwen3-MoE decoder (`Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
  `Qwen3MoeForCausalLM`)."""

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
  # Options of the attention layer (`qwenjax.model.decoder.Attention`), Qwen2's by default: biases on the q/k/v
  # projections, and no per-head RMSNorm of q and k (over head_dim, before RoPE; Qwen3 has one, Qwen2 does not).
  attention_bias: bool = True
  qk_norm: bool = False
  # transformers' `layer_types` ("full_attention" / "sliding_attention" per layer); None: derived from
  # max_window_layers. Either way a layer slides only with use_sliding_window, as transformers reads them.
  layer_types: tuple[str, ...] | None = None
  # Qwen3-MoE: num_experts > 0 makes the sparse layers' MLP a router over num_experts SwiGLU experts of
  # moe_intermediate_size, num_experts_per_tok of them per token (weights renormalised to sum 1 when
  # norm_topk_prob); a layer is sparse unless it is in mlp_only_layers or (index + 1) % decoder_sparse_step != 0,
  # and a dense layer's MLP has intermediate_size. 0 experts: every layer dense (Qwen2, Qwen3).
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()

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
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers.")
      unknown = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
      if unknown:
        raise ConfigError(f"layer_types holds {unknown[0]!r} (expected full_attention or sliding_attention).")
    if self.num_experts:
      if not 0 < self.num_experts_per_tok <= self.num_experts:
        raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts "
                          f"({self.num_experts}).")
      if self.moe_intermediate_size <= 0 or self.decoder_sparse_step <= 0:
        raise ConfigError("moe_intermediate_size and decoder_sparse_step must be positive in a MoE config.")
      outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
      if outside:
        raise ConfigError(f"mlp_only_layers names layer {outside[0]}, outside 0..{self.num_layers - 1}.")

  def sparse_layers(self) -> tuple[bool, ...]:
    """[L] whether each layer's MLP is the mixture of experts (transformers' Qwen3MoeDecoderLayer rule)."""
    return tuple(bool(self.num_experts) and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                 for i in range(self.num_layers))

  def layer_windows(self) -> np.ndarray:
    """[L] int32: the sliding-window span of each layer, or a span larger than any position for full attention.

    Hugging Face's Qwen2 and Qwen3 slide the window on the layers `layer_types` calls "sliding_attention" (by
    default those >= max_window_layers), and only when use_sliding_window is set.
    """
    full = np.iinfo(np.int32).max
    types = self.layer_types or tuple("sliding_attention" if i >= self.max_window_layers else "full_attention"
                                      for i in range(self.num_layers))
    return np.array([self.sliding_window if self.use_sliding_window and t == "sliding_attention" else full
                     for t in types], np.int32)

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
  def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json") -> QwenConfig:
    """Builds the config from a Qwen2, Qwen3 or Qwen3-MoE `config.json` dict, in the form Qwen ships or
    transformers 5 writes. Each field's type is checked, not coerced: ConfigError naming `source` and the field.
    Qwen3's attention has q/k norms and, unless `attention_bias` says otherwise, no q/k/v biases; Qwen2's has biases;
    Qwen3-MoE adds its experts' fields."""
    model_type = hf.get("model_type")
    if model_type is None:
      model_type = {("Qwen3ForCausalLM",): "qwen3", ("Qwen3MoeForCausalLM",): "qwen3_moe"}.get(
          tuple(hf.get("architectures") or ()))
    if model_type not in (None, "qwen2", "qwen2_5_vl_text", "qwen3", "qwen3_moe"):
      raise ConfigError(f"{source}: model_type {model_type!r} is not a Qwen2 or Qwen3 decoder (expected 'qwen2', "
                        "'qwen3' or 'qwen3_moe').")
    qwen3, moe = model_type in ("qwen3", "qwen3_moe"), model_type == "qwen3_moe"

    def field(key, kind, default=REQUIRED, positive=False):
      return read_field(hf, key, kind, source, default, positive=positive)

    if qwen3 and field("attention_bias", bool, False):
      raise ConfigError(f"{source}: attention_bias is true, which in Qwen3 also puts a bias on o_proj; qwenjax's "
                        "Qwen3 has none (no released Qwen3 sets it).")
    rope = dict(field("rope_parameters", dict, {}))  # transformers-5 form
    legacy = field("rope_scaling", dict, {})  # the form Qwen's released configs use
    rope.update(legacy)

    def rope_field(key, kind, default=REQUIRED, positive=False):
      within = "rope_scaling" if key in legacy else "rope_parameters"
      return read_field(rope, key, kind, source, default, positive=positive, within=within)

    kind = rope_field("rope_type", str, rope_field("type", str, "default"))
    if kind == "mrope":  # Qwen2.5-VL's released configs: {"type": "mrope", "mrope_section": [16, 24, 24]}
      kind = "default"
    scaling = None
    if kind != "default":
      scaling = dict(
          kind=kind, factor=rope_field("factor", float, positive=True),
          original_max_position_embeddings=rope_field("original_max_position_embeddings", int, None, positive=True),
          beta_fast=rope_field("beta_fast", float, 32.0, positive=True),
          beta_slow=rope_field("beta_slow", float, 1.0, positive=True),
          attention_factor=rope_field("attention_factor", float, None, positive=True),
          mscale=rope_field("mscale", float, None), mscale_all_dim=rope_field("mscale_all_dim", float, None),
          truncate=rope_field("truncate", bool, True))
    eos = field("eos_token_id", list[int] if isinstance(hf.get("eos_token_id"), list) else int, ())
    use_sw = field("use_sliding_window", bool, False)
    hidden, heads = field("hidden_size", int, positive=True), field("num_attention_heads", int, positive=True)
    kw = dict(
        vocab_size=field("vocab_size", int, positive=True), hidden_size=hidden,
        intermediate_size=field("intermediate_size", int, positive=True),
        num_layers=field("num_hidden_layers", int, positive=True), num_heads=heads,
        num_kv_heads=field("num_key_value_heads", int, heads, positive=True),
        head_dim=field("head_dim", int, hidden // heads, positive=True),
        rms_norm_eps=field("rms_norm_eps", float, 1e-6, positive=True),
        rope_theta=rope_field("rope_theta", float, field("rope_theta", float, 10000.0, positive=True), positive=True),
        tie_word_embeddings=field("tie_word_embeddings", bool, False),
        max_position_embeddings=field("max_position_embeddings", int, 32768, positive=True),
        use_sliding_window=use_sw,
        sliding_window=field("sliding_window", int, None, positive=True) if use_sw else None,
        max_window_layers=field("max_window_layers", int, 0), bos_token_id=field("bos_token_id", int, None),
        eos_token_ids=eos if isinstance(eos, tuple) else (eos,),
        mrope_section=rope_field("mrope_section", list[int], None, positive=True),
        attention_bias=not qwen3, qk_norm=qwen3,
        # Without sliding every layer attends in full whatever layer_types says: left out, so that configs of one
        # model compare equal whichever tool wrote them (transformers 5 writes layer_types, Qwen's files do not).
        layer_types=field("layer_types", list[str], None) if use_sw else None)
    if moe:  # transformers 5 writes num_experts as num_local_experts
      kw.update(num_experts=field("num_experts", int, field("num_local_experts", int, 128), positive=True),
                num_experts_per_tok=field("num_experts_per_tok", int, 8, positive=True),
                moe_intermediate_size=field("moe_intermediate_size", int, 768, positive=True),
                norm_topk_prob=field("norm_topk_prob", bool, False),
                decoder_sparse_step=field("decoder_sparse_step", int, 1, positive=True),
                mlp_only_layers=tuple(field("mlp_only_layers", list[int], [])))
    try:
      return cls(rope_scaling=None if scaling is None else RopeScaling(**scaling), **kw)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None

  @classmethod
  def from_file(cls, path: str | pathlib.Path) -> QwenConfig:
    return cls.from_hf_config(read_json(path), source=str(path))

  def num_params(self) -> int:
    """Parameter count from the formula (the eval_shape test checks it against the module tree)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    biases = q + 2 * kv if self.attention_bias else 0
    norms = 2 * self.head_dim if self.qk_norm else 0
    per_layer = d * q + 2 * d * kv + biases + norms + q * d + 2 * d
    sparse = sum(self.sparse_layers())
    mlps = (self.num_layers - sparse) * 3 * d * f
    mlps += sparse * (d * self.num_experts + self.num_experts * 3 * d * self.moe_intermediate_size)
    return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + mlps + d

  def active_params(self) -> int:
    """Parameters one token's forward pass reads: `num_params` with num_experts_per_tok experts per sparse layer
    instead of all of them (the "A3B" of Qwen3-30B-A3B)."""
    unused = self.num_experts - self.num_experts_per_tok
    return self.num_params() - sum(self.sparse_layers()) * unused * 3 * self.hidden_size * self.moe_intermediate_size


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


def _qwen3_preset(hidden, inter, layers, heads, kv, tied) -> QwenConfig:
  return QwenConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                    num_heads=heads, num_kv_heads=kv, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                    tie_word_embeddings=tied, max_position_embeddings=40960, bos_token_id=151643,
                    eos_token_ids=(151645,), attention_bias=False, qk_norm=True)


# The released Qwen3 dense sizes (the models' config.json files: head_dim 128 throughout, q/k norms, no biases).
PRESETS.update({
    "qwen3-0.6b": _qwen3_preset(1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _qwen3_preset(2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _qwen3_preset(2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _qwen3_preset(4096, 12288, 36, 32, 8, False),
    "qwen3-14b": _qwen3_preset(5120, 17408, 40, 40, 8, False),
    "qwen3-32b": _qwen3_preset(5120, 25600, 64, 64, 8, False),
})


def _qwen3_moe_preset(hidden, inter, layers, heads, kv, moe_inter) -> QwenConfig:
  return dataclasses.replace(_qwen3_preset(hidden, inter, layers, heads, kv, False), num_experts=128,
                             num_experts_per_tok=8, moe_intermediate_size=moe_inter, norm_topk_prob=True)


# The released Qwen3-MoE sizes (their config.json files: 128 experts, 8 per token, every layer sparse).
PRESETS.update({
    "qwen3-30b-a3b": _qwen3_moe_preset(2048, 6144, 48, 32, 4, 768),
    "qwen3-235b-a22b": _qwen3_moe_preset(4096, 12288, 94, 64, 4, 1536),
})
