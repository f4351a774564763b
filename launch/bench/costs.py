"""The cost model behind the device fractions: what one decode step reads and what a prefill computes.

  decode: the weights every step streams (all but the embedding table, whose B rows are gathered; a tied embedding
    counts once, as the output head), at the engine's storage type (llama.cpp: the GGUF's quantized tensor bytes),
    plus the KV cache entries attended by each of the B sequences.
  prefill: 2 FLOPs per weight per token for the layers' matmuls, the output head at each prompt's last token, and
    causal attention (QK and PV).

L layers, D hidden, F MLP width, V vocabulary, N query heads, K KV heads, H head dim.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelCosts:
  """What one step of the model reads and computes."""

  weight_bytes_per_step: float  # weights streamed by every decode step
  kv_bytes_per_token: float  # KV cache bytes per attended position of one sequence
  matmul_params: int  # the layers' matmul weights
  head_params: int  # the output head (V x D)
  attention_flops_unit: int  # 2 * 2 * L * N * H: attention FLOPs per (query, key) pair

  def prefill_flops(self, batch: int, prompt: int) -> float:
    causal_pairs = prompt * (prompt + 1) / 2
    return batch * (2 * self.matmul_params * prompt + 2 * self.head_params
                    + self.attention_flops_unit * causal_pairs)

  def decode_bytes_per_step(self, batch: int, context: float) -> float:
    return self.weight_bytes_per_step + batch * context * self.kv_bytes_per_token


def model_costs(cfg, weight_bytes: float, kv_bytes_per_element: int) -> ModelCosts:
  """The costs of a model of config `cfg` whose decode step streams `weight_bytes` of weights, with a KV cache of
  `kv_bytes_per_element` bytes per element."""
  d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim  # N * H, K * H
  return ModelCosts(weight_bytes_per_step=weight_bytes, kv_bytes_per_token=2 * layers * kv * kv_bytes_per_element,
                    matmul_params=layers * (2 * d * q + 2 * d * kv + 3 * d * f), head_params=v * d,
                    attention_flops_unit=4 * layers * q)


def streamed_params(cfg) -> int:
  """Weights a decode step reads: all but the embedding table (a tied one is read whole, as the head)."""
  return cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def gguf_streamed_bytes(path: str) -> int:
  """The quantized bytes llama.cpp streams per decode step: every tensor but an untied token embedding."""
  import gguf  # pylint: disable=g-import-not-at-top

  reader = gguf.GGUFReader(path)
  sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
  if "output.weight" in sizes:
    sizes.pop("token_embd.weight", None)
  return sum(sizes.values())


def weight_bytes(model) -> int:
  """Bytes of every weight `model` holds, as stored (int8 values and their float32 scales for a quantized one)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return sum(int(v[...].nbytes) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def streamed_bytes(model) -> int:
  """The bytes a decode step of `model` streams, as stored: every weight but an untied embedding table."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  skip = () if model.cfg.tie_word_embeddings else ("embed",)
  return sum(int(v[...].nbytes) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[0] not in skip)
