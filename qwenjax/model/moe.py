"""Qwen3-MoE's sparse MLP: a router picks num_experts_per_tok of num_experts SwiGLU experts for each token.

    moe = MoE(cfg, stack=(), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    y = moe(x, ctx, layer)                                # x [B, T, D] -> [B, T, D]

Routing is transformers' `Qwen3MoeTopKRouter`: logits = x @ router [D, E] in the compute dtype, a float32 softmax
over the experts, the top k, renormalised to sum 1 when `norm_topk_prob`; each token's output is the weighted sum
of its k experts' down(silu(gate(x)) * up(x)). There is no shared expert.

Dispatch (`dispatch`). The M tokens' A = M*k (token, expert) assignments are grouped by expert and each group is
multiplied by its own expert's weights only; an expert no token chose is never read:
  - "xla": the assignments sorted by expert, each expert's run padded to whole tiles of T rows, and every tile
    multiplied by the weights of its expert, gathered for it (`jax.lax.map` over chunks of tiles, so that the
    gathered weights stay under ~256 MiB). While A <= E (a decode step) T is 1 and nothing is sorted: a tile per
    assignment, so a decode step at batch 1 reads k experts per layer. For more assignments T grows with A / E
    (at most 128 rows), bounding the padding to E * (T - 1) rows and the weight reads to A / T + E experts.
  - "pallas": the sorted rows through `qwenjax.kernels.grouped_matmul` (its generic Pallas kernel visits only the
    groups a row tile holds). int8 experts take the "xla" path (the kernel takes float weights).
`jax.lax.ragged_dot` (`dispatch_reference`) is the reference only: XLA lowers it densely, every expert for every
row, masked (measured on XLA:CPU: 128 groups cost 28x what 8 do at the same rows).

int8 experts (`quantize`): values [E, D, F] int8 with a float32 scale per expert and output channel [E, F]; a tile
multiplies by its expert's int8 values cast to the compute dtype and scales the product's columns (w8a16; w8a8
quantizes no expert activations, which stay in the compute dtype).

Einsum legend: M tokens (B*T), k experts per token, A = M*k assignments, E experts, D hidden, F expert hidden,
T rows per tile, NT tiles.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.config import QwenConfig
from qwenjax.kernels.grouped_matmul import grouped_matmul
from qwenjax.model.layers import HFTensor, QuantizedWeight, declare, linear, read
from qwenjax.parallel.axes import EMBED, EXPERTS, MLP

_GATHER_BUDGET = 256 << 20  # bytes of expert weights one chunk of tiles gathers
_MAX_TILE = 128


class MoE(nnx.Module):
  """Router [D, E] and experts gate, up [E, D, F] and down [E, F, D], stacked from one checkpoint tensor per expert
  (`model.layers.{layer}.mlp.experts.{expert}.*_proj.weight`, `mlp.gate.weight` for the router). The router is
  never quantized (its scores pick the experts)."""

  def __init__(self, cfg: QwenConfig, *, stack, dtype, param_dtype, quantize=None, rngs: nnx.Rngs):
    d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    pre = "model.layers.{layer}.mlp."
    self.router = declare(rngs, (d, e), (EMBED, EXPERTS), HFTensor(pre + "gate.weight", (e, d), True), stack=stack,
                          dtype=param_dtype)
    w = lambda shape, axes, name, hf_shape: declare(
        rngs, shape, axes, HFTensor(pre + "experts.{expert}." + name, hf_shape, True), stack=stack,
        dtype=param_dtype, quantize=quantize, contract=(1,))
    self.gate = w((e, d, f), (EXPERTS, EMBED, MLP), "gate_proj.weight", (f, d))
    self.up = w((e, d, f), (EXPERTS, EMBED, MLP), "up_proj.weight", (f, d))
    self.down = w((e, f, d), (EXPERTS, MLP, EMBED), "down_proj.weight", (d, f))
    self.top_k, self.norm_topk_prob, self.dtype = cfg.num_experts_per_tok, cfg.norm_topk_prob, dtype

  def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, D] -> (router logits [M, E] in the compute dtype, weights [M, k] in the compute dtype, experts [M, k]
    int32, by descending weight)."""
    with jax.named_scope("router"):
      logits = linear(x, self.router, self.dtype)  # [M, E]
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      weights, experts = jax.lax.top_k(probs, self.top_k)  # [M, k]
      if self.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits, weights.astype(self.dtype), experts.astype(jnp.int32)

  def __call__(self, x: jax.Array, ctx, layer) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> (y [B, T, D], router logits [B, T, E] in the compute dtype, for a training loss: see
    `load_balancing_loss`) (ctx: the step's `StepContext`, for the implementation; layer unused: no adapter
    reaches the experts)."""
    del layer
    b, t, d = x.shape
    flat = x.reshape(-1, d)  # [M, D]
    logits, weights, experts = self.route(flat)
    with jax.named_scope("experts"):
      out = dispatch(flat, experts, weights, (self.gate, self.up, self.down), self.dtype, ctx.meta.impl)
    return out.reshape(b, t, d), logits.reshape(b, t, -1)


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
  """The Switch Transformer's auxiliary load-balancing loss, as transformers' Qwen3-MoE computes it
  (`load_balancing_loss_func`): over the sparse layers' router logits [L, B, T, E] and the tokens where mask
  [B, T] is true (None: all), E * sum_e f_e * P_e, where f_e is the fraction of the L * N (layer, token) top-k
  assignments that chose expert e and P_e the mean over them of its softmax probability (both pooled over layers
  before their product). Differentiable through P only (the top-k choice is not). Returns a float32 scalar."""
  num_experts = router_logits.shape[-1]
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [L, B, T, E]
  _, chosen = jax.lax.top_k(probs, top_k)  # [L, B, T, k]
  weight = jnp.ones(router_logits.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)  # [B, T]
  counts = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32) * weight[None, :, :, None, None],
                   axis=(0, 1, 2, 3))  # [E]
  prob_sums = jnp.sum(probs * weight[None, :, :, None], axis=(0, 1, 2))  # [E]
  rows = router_logits.shape[0] * jnp.maximum(jnp.sum(weight), 1.0)
  return num_experts * jnp.sum((counts / rows) * (prob_sums / rows))


def tiling(a: int, e: int) -> tuple[int, int]:
  """(T, NT): rows per tile and the static number of tiles for A assignments over E experts. T is 1 while A <= E
  (NT = A, no padding), else the power of two near A / E, at most 128; NT = A // T + min(E, A) bounds the sum over
  experts of ceil(n_e / T) whatever the routing."""
  if a <= e:
    return 1, a
  tile = min(_MAX_TILE, 1 << math.ceil(math.log2(-(-a // e))))
  return tile, a // tile + min(e, a)


def gather_chunk(num_tiles: int, d: int, f: int, itemsize: int) -> int:
  """Tiles `jax.lax.map` runs at once: as many as keep their gathered gate, up and down weights under
  `_GATHER_BUDGET` bytes (at least one)."""
  return max(1, min(num_tiles, _GATHER_BUDGET // (3 * d * f * itemsize)))


def _swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, scales, dtype) -> jax.Array:
  """x [T, D] by one expert's gate, up [D, F] and down [F, D] (float, or int8 with `scales`: their column scales
  [F], [F], [D]) -> [T, D]."""
  def mm(a, w, i):
    y = jnp.dot(a, w.astype(dtype), preferred_element_type=jnp.float32)
    return y if scales is None else y * scales[i]

  h = (jax.nn.silu(mm(x, gate, 0)) * mm(x, up, 1)).astype(dtype)
  return mm(h, down, 2).astype(dtype)


def _stacked(weight: nnx.Param | QuantizedWeight) -> tuple[jax.Array, jax.Array | None]:
  if isinstance(weight, QuantizedWeight):
    return weight.values[...], weight.scale[...]
  return weight[...], None


def dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array, ffn: tuple, dtype, impl: str = "xla"
             ) -> jax.Array:
  """x [M, D], each token's experts [M, k] and weights [M, k], the experts' (gate, up, down) -> sum over k of
  weight * expert(x), [M, D] (see the module docstring). Under a mesh with an `expert` axis each device runs its
  own E / expert experts (`_expert_parallel`)."""
  arrays = tuple(_stacked(w) for w in ffn)
  mesh = jax.sharding.get_abstract_mesh()
  ep = 1 if mesh.empty else dict(mesh.shape).get("expert", 1)
  if ep == 1:
    return _dispatch(x, experts, weights, arrays, dtype, impl)
  return _expert_parallel(x, experts, weights, arrays, dtype, impl, ep)


def _expert_parallel(x, experts, weights, arrays, dtype, impl, ep: int) -> jax.Array:
  """Expert parallelism by gathering tokens: inside a shard_map manual over the `expert` mesh axis (the others stay
  automatic: an expert's F still splits over tensor, the tokens over data), every device holds the step's tokens
  (XLA all-gathers them over the axis, which splits the batch elsewhere in the layer) and E / ep experts; it runs
  its experts on the assignments that chose them and the partial sums are added over the axis (one all-reduce of
  [M, D]). Tokens are gathered rather than sent all-to-all because shapes are static: an all-to-all needs a
  per-device capacity, which either drops tokens (not exact) or is the whole step's rows anyway. The axis divides
  the experts' memory. On the Pallas path it divides the experts' matmuls too: another device's assignments go to
  a group past the local ones, sorted after every local row, which the grouped-matmul kernels never multiply (a
  row in no group). The "xla" path's tiles are static, so there they are weighted 0 on expert 0 instead, and each
  device multiplies the whole step's tiles."""
  e = arrays[0][0].shape[0]
  if e % ep:
    raise ConfigError(f"the mesh's expert axis ({ep}) does not divide num_experts ({e}).")
  expert_spec = jax.sharding.PartitionSpec("expert")
  specs = tuple((expert_spec, None if s is None else expert_spec) for _, s in arrays)

  def local(x, experts, weights, arrays):
    e_local = arrays[0][0].shape[0]
    ids = experts - jax.lax.axis_index("expert") * e_local
    mine = (ids >= 0) & (ids < e_local)
    elsewhere = e_local if _takes_kernel(impl, arrays) else 0  # Pallas: a group of none, never multiplied
    out = _dispatch(x, jnp.where(mine, ids, elsewhere), jnp.where(mine, weights, 0), arrays, dtype, impl)
    return jax.lax.psum(out, "expert")

  replicated = jax.sharding.PartitionSpec()
  # A pallas_call's outputs carry no varying-axes type, which shard_map's check requires (jax 0.10.2: "manual_axis_type
  # on jax.ShapeDtypeStruct must not be None"), so the kernel path runs unchecked; its psum still makes the sum whole.
  return jax.shard_map(local, in_specs=(replicated, replicated, replicated, specs), out_specs=replicated,
                       axis_names={"expert"}, check_vma=not _takes_kernel(impl, arrays))(x, experts, weights, arrays)


def _takes_kernel(impl: str, arrays: tuple) -> bool:
  """Whether `_dispatch` runs the grouped-matmul kernel: impl "pallas" on float experts."""
  return impl == "pallas" and arrays[0][1] is None


def _dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array, arrays: tuple, dtype, impl: str) -> jax.Array:
  """`dispatch` on one device: arrays ((gate, its scale or None), (up, ...), (down, ...)). On the kernel path an
  expert id past the last (E) is an assignment of no group: sorted last, never multiplied, its output 0."""
  m, k = experts.shape
  (gate, gate_s), (up, up_s), (down, down_s) = arrays
  e, d, f = gate.shape
  a = m * k
  flat = experts.reshape(-1)  # [A] assignment (token i, slot j) at i*k + j
  quantized = gate_s is not None
  if _takes_kernel(impl, arrays):
    out = _grouped(x, flat, k, (gate.astype(dtype), up.astype(dtype), down.astype(dtype)), dtype, "pallas")
  else:
    tile, num_tiles = tiling(a, e)
    if tile == 1:  # a tile per assignment, in assignment order
      rows, tile_expert, dest = jnp.repeat(x, k, axis=0)[:, None, :], flat, None  # [A, 1, D], [A]
    else:
      order = jnp.argsort(flat, stable=True)  # [A]
      sorted_expert = flat[order]
      sizes = jnp.bincount(flat, length=e)  # [E]
      padded = -(-sizes // tile) * tile  # [E] each run padded to whole tiles
      starts, pstarts = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
      dest = pstarts[sorted_expert] + jnp.arange(a) - starts[sorted_expert]  # [A] padded row of each sorted one
      rows = jnp.zeros((num_tiles * tile, d), x.dtype).at[dest].set(x[order // k]).reshape(num_tiles, tile, d)
      # [NT] the expert whose padded run holds each tile: how many runs end at or before its first row (tiles past
      # the last run: zero rows, any expert). A comparison, not jnp.searchsorted, which fails under shard_map.
      ends = jnp.cumsum(padded)  # [E]
      tile_expert = jnp.minimum(jnp.sum(ends[None, :] <= (jnp.arange(num_tiles) * tile)[:, None], axis=1), e - 1)
    chunk = gather_chunk(num_tiles, d, f, jnp.dtype(gate.dtype).itemsize)

    def tile_ffn(args):  # one tile (jax.lax.map vectorizes it over `chunk` tiles at a time)
      xt, ex = args  # [T, D], its expert
      scales = None if not quantized else (gate_s[ex], up_s[ex], down_s[ex])
      return _swiglu(xt.astype(dtype), gate[ex], up[ex], down[ex], scales, dtype)

    out = jax.lax.map(tile_ffn, (rows, tile_expert), batch_size=chunk)  # [NT, T, D]
    out = out.reshape(-1, d)
    if dest is not None:  # padded rows -> sorted -> assignment order
      out = jnp.zeros((a, d), out.dtype).at[order].set(out[dest])
  return jnp.einsum("mkd,mk->md", out.reshape(m, k, d), weights.astype(out.dtype))


def _grouped(x: jax.Array, flat: jax.Array, k: int, ffn: tuple, dtype, impl: str) -> jax.Array:
  """The assignments `flat` [A] sorted by expert and run group by group through `grouped_matmul` (`impl`) on float
  weights `ffn` (gate, up, down) -> [A, D] in assignment order (0 for an id past the last expert: in no group)."""
  gate, up, down = ffn
  order = jnp.argsort(flat, stable=True)  # [A]
  rows = x[order // k].astype(dtype)  # [A, D] sorted by expert
  sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)  # [E]
  h = jax.nn.silu(grouped_matmul(rows, gate, sizes, impl=impl, out_dtype=jnp.float32)) * grouped_matmul(
      rows, up, sizes, impl=impl, out_dtype=jnp.float32)
  out = grouped_matmul(h.astype(dtype), down, sizes, impl=impl, out_dtype=dtype)
  return jnp.zeros_like(out).at[order].set(out)


def dispatch_reference(x: jax.Array, experts: jax.Array, weights: jax.Array, ffn: tuple, dtype) -> jax.Array:
  """`dispatch` through jax.lax.ragged_dot (dense under XLA: the reference, never the serving path)."""
  m, k = experts.shape
  out = _grouped(x, experts.reshape(-1), k, tuple(read(w, dtype) for w in ffn), dtype, "xla")
  return jnp.einsum("mkd,mk->md", out.reshape(m, k, -1), weights.astype(out.dtype))
