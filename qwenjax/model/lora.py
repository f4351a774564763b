"""LoRA: low-rank adapters on the decoder's projections, one adapter or many in one batch.

An adapter of rank r adds scale * (x A) B to a projection's output, A [K, r] and B [r, O] per layer and target,
scale = alpha / r (alpha / sqrt(r) with rsLoRA), the base weight untouched (PEFT's LoRA, so its adapters load
and ours save in its layout: `qwenjax.checkpoints.peft`). Targets are the seven projections of a Qwen2 layer.

    adapters = {"sql": peft.load_adapter("sql-lora/", cfg), "poet": peft.load_adapter("poet-lora/", cfg)}
    model.lora = LoraBank.of(cfg, adapters)    # what the engine does with Engine(..., lora=...)
    meta = StepMetadata(positions, lora_index=np.array([0, 1, -1]))   # row 2: the base model
    h, cache = model(tokens, cache, meta)

A `LoraBank` stacks NA adapters per target (ranks padded to the largest with zeros, which adds nothing): A
[L, NA, K, r] and B [L, NA, r, O], and a scale [NA] (0 where an adapter lacks the target). Each row of a step
names its adapter (`lora_index` [B], -1: none); the update gathers that row's A and B, so rows with different
adapters, or none, share one batch and one compiled program. `merge` folds one adapter into the weights instead.

Legend: L layers, NA adapters, B rows, T tokens, K input size, O output size, r rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.config import QwenConfig
from qwenjax.model.layers import QuantizedWeight
from qwenjax.parallel.axes import LAYERS

# target -> (the Block's submodule, its weight, the Hugging Face module under model.layers.{i}). Order: PEFT's.
TARGETS = {
    "q": ("attn", "q_kernel", "self_attn.q_proj"),
    "k": ("attn", "k_kernel", "self_attn.k_proj"),
    "v": ("attn", "v_kernel", "self_attn.v_proj"),
    "o": ("attn", "o_kernel", "self_attn.o_proj"),
    "gate": ("mlp", "gate", "mlp.gate_proj"),
    "up": ("mlp", "up", "mlp.up_proj"),
    "down": ("mlp", "down", "mlp.down_proj"),
}


def target_dims(cfg: QwenConfig, target: str) -> tuple[int, int]:
  """(K, O): a target projection's input and output sizes (heads flattened)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}[target]


def check_targets(targets) -> tuple[str, ...]:
  """Target names (q, k, v, o, gate, up, down; or PEFT's q_proj, ...; "all") in TARGETS order; ConfigError else."""
  if isinstance(targets, str):
    targets = targets.split(",")
  names = set()
  for t in targets:
    t = t.strip().removesuffix("_proj")
    if t in ("all", "all-linear"):
      names.update(TARGETS)
    elif t in TARGETS:
      names.add(t)
    else:
      raise ConfigError(f"LoRA target {t!r} is not one of {', '.join(TARGETS)} (or 'all').")
  if not names:
    raise ConfigError("LoRA needs at least one target module.")
  return tuple(t for t in TARGETS if t in names)


@dataclasses.dataclass
class Adapter:
  """One LoRA adapter on the host. weights: target -> (a [L, K, r], b [L, r, O]) float32 (a zero layer: not
  adapted there). dropout applies when training only."""

  rank: int
  alpha: float
  weights: dict[str, tuple[np.ndarray, np.ndarray]]
  use_rslora: bool = False
  dropout: float = 0.0

  @property
  def targets(self) -> tuple[str, ...]:
    return tuple(t for t in TARGETS if t in self.weights)

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def check(self, cfg: QwenConfig, source: str = "the adapter") -> Adapter:
    """ConfigError naming `source` if a weight's shape does not fit the model."""
    if self.rank < 1:
      raise ConfigError(f"{source}: LoRA rank must be a positive integer, got {self.rank}.")
    mlp = [t for t in self.weights if TARGETS[t][0] == "mlp"]
    if cfg.num_experts and mlp:  # one adapter per layer cannot hold the experts' (a per-expert A and B each)
      raise ConfigError(f"{source}: adapts {TARGETS[mlp[0]][2]}, an MLP projection of a mixture-of-experts model; "
                        "LoRA on a MoE model adapts the attention projections (q, k, v, o) only.")
    for t, (a, b) in self.weights.items():
      k, o = target_dims(cfg, t)
      want_a, want_b = (cfg.num_layers, k, self.rank), (cfg.num_layers, self.rank, o)
      if a.shape != want_a or b.shape != want_b:
        raise ConfigError(f"{source}: the {TARGETS[t][2]} adapter has A {a.shape} and B {b.shape}; this model "
                          f"needs {want_a} and {want_b} (rank {self.rank}).")
    return self


def init_adapter(cfg: QwenConfig, rank: int, alpha: float, targets, seed: int = 0, dropout: float = 0.0,
                 use_rslora: bool = False) -> Adapter:
  """A fresh adapter as PEFT initialises one: A Kaiming-uniform (a = sqrt(5): bound 1/sqrt(K)), B zero, so the
  adapted model starts equal to the base."""
  rng = np.random.default_rng(seed)
  weights = {}
  for t in check_targets(targets):
    k, o = target_dims(cfg, t)
    bound = 1.0 / math.sqrt(k)
    weights[t] = (rng.uniform(-bound, bound, (cfg.num_layers, k, rank)).astype(np.float32),
                  np.zeros((cfg.num_layers, rank, o), np.float32))
  return Adapter(rank, float(alpha), weights, use_rslora, dropout)


class LoraWeight(nnx.Variable):
  """An adapter matrix (A or B) of a LoraBank: what fine-tuning differentiates and updates."""


class LoraScale(nnx.Variable):
  """A LoraBank's per-adapter scale: fixed by each adapter's alpha and rank."""


class LoraBank(nnx.Module):
  """NA adapters stacked per target: `{t}_a` [L, NA, K, r], `{t}_b` [L, NA, r, O] (LoraWeight), `{t}_scale` [NA]
  (LoraScale); names: the adapters' names, index i of `lora_index`; dropout: on the updates' inputs, training."""

  def __init__(self, names: tuple[str, ...], targets: tuple[str, ...], arrays: Mapping[str, tuple], dropout=0.0):
    self.names = tuple(names)
    self.targets = tuple(targets)
    self.dropout = float(dropout)
    for t in targets:
      a, b, scale = arrays[t]
      setattr(self, f"{t}_a", LoraWeight(jnp.asarray(a), axes=(LAYERS, None, None, None)))
      setattr(self, f"{t}_b", LoraWeight(jnp.asarray(b), axes=(LAYERS, None, None, None)))
      setattr(self, f"{t}_scale", LoraScale(jnp.asarray(scale, jnp.float32), axes=(None,)))

  @classmethod
  def of(cls, cfg: QwenConfig, adapters: Mapping[str, Adapter]) -> LoraBank:
    """The bank of named adapters, in the mapping's order (ranks padded to the largest)."""
    if not adapters:
      raise ConfigError("a LoRA bank needs at least one adapter.")
    for name, adapter in adapters.items():
      adapter.check(cfg, f"LoRA adapter {name!r}")
    targets = tuple(t for t in TARGETS if any(t in a.weights for a in adapters.values()))
    rank = max(a.rank for a in adapters.values())
    arrays = {}
    for t in targets:
      k, o = target_dims(cfg, t)
      a_all = np.zeros((cfg.num_layers, len(adapters), k, rank), np.float32)
      b_all = np.zeros((cfg.num_layers, len(adapters), rank, o), np.float32)
      scale = np.zeros(len(adapters), np.float32)
      for i, adapter in enumerate(adapters.values()):
        if t in adapter.weights:
          a, b = adapter.weights[t]
          a_all[:, i, :, :adapter.rank], b_all[:, i, :adapter.rank] = a, b
          scale[i] = adapter.scale
      arrays[t] = (a_all, b_all, scale)
    dropout = max(a.dropout for a in adapters.values())
    return cls(tuple(adapters), targets, arrays, dropout)

  def adapter(self, i: int, like: Adapter | None = None) -> Adapter:
    """Adapter i back on the host (rank and alpha from `like`, else the bank's rank and its scale as alpha/r)."""
    weights = {}
    rank = like.rank if like is not None else getattr(self, f"{self.targets[0]}_a").shape[-1]
    for t in self.targets:
      a, b = np.asarray(getattr(self, f"{t}_a")[...]), np.asarray(getattr(self, f"{t}_b")[...])
      weights[t] = (np.ascontiguousarray(a[:, i, :, :rank]), np.ascontiguousarray(b[:, i, :rank]))
    if like is not None:
      return dataclasses.replace(like, weights=weights)
    scale = float(getattr(self, f"{self.targets[0]}_scale")[...][i])
    return Adapter(rank, scale * rank, weights, dropout=self.dropout)

  def delta(self, target: str, layer, x: jax.Array, index: jax.Array, key: jax.Array | None = None
            ) -> jax.Array | None:
    """The update of `target` in `layer` (an int, or traced under scan) for x [B, T, K], row b by adapter
    index[b] (-1: none, zero update) -> [B, T, O] in x's dtype, or None where no adapter has the target. key:
    dropout on x (training)."""
    if target not in self.targets:
      return None
    a = getattr(self, f"{target}_a")[...][layer]  # [NA, K, r]
    b = getattr(self, f"{target}_b")[...][layer]  # [NA, r, O]
    scale = getattr(self, f"{target}_scale")[...]  # [NA]
    rows = jnp.maximum(index, 0)
    row_scale = jnp.where(index >= 0, scale[rows], 0.0).astype(x.dtype)  # [B]
    if key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(key, list(TARGETS).index(target)), 1 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
    h = jnp.einsum("btk,bkr->btr", x, a[rows].astype(x.dtype))  # [B, T, r]
    return jnp.einsum("btr,bro->bto", h, b[rows].astype(x.dtype)) * row_scale[:, None, None]


def merge(model, adapter: Adapter) -> None:
  """Folds `adapter` into the model's weights in place: W += scale * A B per layer and target (the merged model
  then needs no bank). Float weights only: an int8 model serves adapters unmerged."""
  adapter.check(model.cfg, "the merged adapter")
  for t, (a, b) in adapter.weights.items():
    module, weight, _ = TARGETS[t]
    update = np.einsum("lkr,lro->lko", a, b) * np.float32(adapter.scale)  # [L, K, O]
    for layer in range(model.cfg.num_layers):
      block = model.layers if model.scan_layers else model.layers[layer]
      param = getattr(getattr(block, module), weight)
      if isinstance(param, QuantizedWeight):
        raise ConfigError("merging a LoRA adapter into int8 weights would requantize them; serve it unmerged "
                          "(Engine(..., lora=...)) or merge before quantizing.")
      value = param[...]
      if model.scan_layers:
        param[...] = value.at[layer].add(update[layer].reshape(value.shape[1:]).astype(value.dtype))
      else:
        param[...] = value + update[layer].reshape(value.shape).astype(value.dtype)
