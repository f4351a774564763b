r"""How much memory each device needs to serve a Qwen2.5 model, and how large a KV page pool the rest holds.

    plan = plan_memory("qwen2.5-7b", mesh="data:2,tensor:4", dtype="bfloat16", max_batch_size=64,
                       max_seq_len=8192, page_size=128, memory_gib=16, margin=0.1)
    plan.kv_cache_memory, plan.num_pages, plan.sequences()   # 9.42 GiB, 11024 pages, 172 sequences of 8192
    print(format_table([plan], memory_gib=16, margin=0.1))

Topology files (tpu_configs/*.json) and the plans of the models each serves are `qwenjax.engine.topologies`; the
command line is `launch/plan.py`.

Every figure is bytes on one device, for an `Engine(max_batch_size=B, max_seq_len=C, max_prefill_chunk=T,
page_size=PS, kv_cache_memory=GiB, kv_cache_dtype=None | "int8")` serving the model on a mesh of (data, fsdp,
tensor) devices. B decode slots, each holding a sequence of up to C tokens; the KV cache is one pool of NP pages
of PS tokens that sequences take as they grow (`qwenjax.model.kv_cache.PagedKVCache`), so no slot reserves C
positions and a short sequence holds only the pages it fills. Letters as in `qwenjax.model.decoder`'s legend
(L layers, K KV heads, N query heads, H head dim, D hidden, F MLP, V vocabulary) and `qwenjax.model.vision`'s
(P patches, Q queries of one attention block, C pixel values per patch); S' = ceil(C / PS) * PS, the positions of
the pages a sequence of C tokens holds.

  weights      each weight's shard under `qwenjax.parallel.sharding.spec_for` with the rules: read from the abstract
               model (`nnx.eval_shape`, nothing allocated), so a weight whose heads the tensor axis does not
               divide (0.5B's 14 query heads over 4) counts whole.
  kv_cache     the page pool: k and v [L, NP, PS, K, H] in the compute dtype, or int8 plus k_scale and v_scale
               [L, NP, PS, K] float32 (kv_cache_dtype="int8": H + 4 bytes per token and KV head instead of
               H * itemsize), split as `spec_for(PagedKVCache.AXES)` splits it: pages over the batch axes (data,
               fsdp), K over tensor when it divides. Per device NP / page splits * `page_bytes` / head splits.
               From `kv_cache_memory` GiB per device, each page shard holds the pages `pages_for_memory` finds in
               that budget, so NP is a multiple of the page splits; page tables and lengths live on the host.
               A sequence's pages lie on one page shard, so the pool holds page splits * floor(NP / page splits /
               ceil(n / PS)) sequences of n tokens (`sequences`).
  sampling     the engine's [B, V] prompt mask (bool) and token counts (int32), split by (batch, vocab).
  activations  the peak of three programs, each the larger of its stages (their buffers are not live together):
    decode     one token for each of B rows attending to its pages, then sampling. Worst case, every row holds C
               tokens:
                 layer stage: one layer's weights, gathered over fsdp (the scan slices the stacked weights, and
                   fsdp all-gathers them) + that layer's keys and values as XLA's attention gathers them from the
                   pool, 2 [B, K, S', H] in the compute dtype (int8 pages are dequantized as they are gathered) +
                   scores and probabilities 2 [B, N, 1, S'] float32 (+ probs in the compute dtype) + the MLP's
                   3 [B, F] + 8 [B, D] of hidden states, q, k, v, outputs
                 head stage: logits [B, V] float32 + 4 [B, V] float32 of sampling (penalties, filters); with
                   fsdp, the embedding table gathered over fsdp twice (token lookup, logits), as XLA's SPMD
                   partitioner does
    prefill    one call of T tokens in all attending to at most C positions: the same terms with B -> 1 and T
               tokens, keys and values 2 [1, K, S', H], scores 2 [1, N, T, S'] float32
    vision     (Qwen2.5-VL) the scanned tower on its largest patch bucket P: one block's weights + the gathered
               patches [P, C] + the larger of attention (5 [P, D]: residual, q, k, v, output; scores 2 [N, Q, P]
               float32 of one query block of a full-attention block) and the MLP (2 [P, D] + 3 [P, F]).
               Every activation is split by the mesh where its logical axes allow.
  reserve      a fixed allowance per device, `RUNTIME_RESERVE_BYTES` (1 GiB): compiled programs, the runtime's
               own buffers, collectives' scratch, cuBLAS workspaces on GPU.

Sizing the pool. Given a device's memory and margin (`memory_gib`, `margin`), the KV budget is what is left of
memory_gib * (1 - margin) after weights, sampling state, activations and the reserve, floored to 0.01 GiB: that is
`kv_cache_memory`, and the pool is the pages it holds. Given `kv_cache_memory` itself, the pool is its pages.
Given neither, the pool holds every slot at C tokens (each page shard ceil(B / page splits) sequences). A pool
that cannot hold one sequence of C tokens is a ConfigError naming the model and the mesh.

The activation model follows what XLA:CPU's buffer assignment holds (it materialises the gathered pages and the
scan's weight slice); Pallas attention on TPU or GPU reads pages in place, and XLA there may fuse the weight slice,
which only lowers the peak. tests/engine/test_planner.py holds the model within 2x of XLA's own temp figure
(`memory_analysis()`) for the 0.5B decoder on one and on 8 devices, and for a VL tower. Only the scanned tower is
modelled: XLA:CPU's unrolled one holds up to 6x more (790 MiB against 126 MiB at 1024 patches).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.config import DTYPES, PRESETS, QwenConfig, check_dtype
from qwenjax.engine.pages import pages_needed
from qwenjax.kernels.buckets import step_buckets
from qwenjax.model import moe, registry
from qwenjax.model.decoder import weight_declarations
from qwenjax.model.kv_cache import PAGE_SIZES, PagedKVCache, page_bytes, pages_for_memory
from qwenjax.model.layers import check_quantize
from qwenjax.model.qwen2_vl import VL_PRESETS, QwenVLConfig
from qwenjax.model.vision_plan import PatchBuckets, query_block
from qwenjax.parallel.axes import (
  BATCH,
  DEFAULT_RULES,
  EMBED,
  HEADS,
  KV_HEADS,
  LAYERS,
  LENGTH,
  MLP,
  PAGES,
  VOCAB,
  ShardingRules,
)
from qwenjax.parallel.sharding import MESH_AXES, parse_mesh, shard_shape

GiB = 1 << 30
RUNTIME_RESERVE_BYTES = 1 * GiB
KV_CACHE_DTYPES = (None, "int8")  # None: pages in the compute dtype
DEFAULT_PAGE_SIZE = PAGE_SIZES["tpu"]  # plan_memory's, when no page size is given (topologies: their backend's)
TYPICAL_LENGTHS = (2048, 8192)  # sequence lengths the tables count the pool's sequences at, besides max_seq_len
KV_GIB_STEP = 0.01  # a derived kv_cache_memory is floored to this many GiB
_SAMPLING_BUFFERS = 4  # [B, V] float32 buffers the sampler holds besides the logits (measured on XLA:CPU: 2.4-4)
_FLOAT32 = 4


def all_presets() -> dict[str, QwenConfig | QwenVLConfig]:
  """Text and VL presets by name."""
  return {**PRESETS, **VL_PRESETS}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one model served on one mesh, and its KV page pool. `activations` is the peak of the
  decode step, the prefill call and (VL) the vision tower; `total` adds everything up."""

  model: str
  dtype: str
  param_dtype: str
  mesh: Mapping[str, int]
  max_batch_size: int
  max_seq_len: int
  max_prefill_chunk: int
  page_size: int
  kv_cache_dtype: str | None  # None: pages in the compute dtype; "int8": int8 pages with float32 scales
  kv_cache_memory: float  # GiB per device the pool is sized from: Engine(kv_cache_memory=...)
  num_pages: int  # pages of the whole pool (every device's shard together)
  page_splits: int  # shards of the pool's pages (the data x fsdp devices that split them)
  weights: int
  kv_cache: int
  sampling: int
  decode_activations: int
  prefill_activations: int
  vision_activations: int
  reserve: int
  quantize: str | None = None  # None: weights in param_dtype; "int8" / "w8a8": int8 projections, float32 scales

  @property
  def activations(self) -> int:
    return max(self.decode_activations, self.prefill_activations, self.vision_activations)

  @property
  def total(self) -> int:
    return self.weights + self.kv_cache + self.sampling + self.activations + self.reserve

  def sequences(self, tokens: int | None = None) -> int:
    """Sequences of `tokens` tokens (default max_seq_len) the pool holds at once, each within one page shard."""
    need = pages_needed(tokens or self.max_seq_len, self.page_size)
    return self.page_splits * (self.num_pages // self.page_splits // need)

  def fits(self, memory_bytes: float, margin: float) -> bool:
    """Whether the total stays within `memory_bytes` with the fraction `margin` of it kept free."""
    return self.total <= memory_bytes * (1 - margin)


class _Sharder:
  """Per-device sizes of arrays with logical axes on one mesh under one rules table."""

  def __init__(self, mesh: Mapping[str, int], rules: ShardingRules):
    self.mesh, self.rules = dict(mesh), rules

  def nbytes(self, axes: Sequence[str | None], shape: Sequence[int], itemsize: int) -> int:
    return math.prod(shard_shape(axes, shape, self.mesh, self.rules)) * itemsize


@functools.lru_cache(maxsize=32)
def _declarations(config: QwenConfig | QwenVLConfig, param_dtype: str, quantize: str | None = None
                  ) -> tuple[tuple[tuple, tuple[str | None, ...], tuple[int, ...], int], ...]:
  """(path, logical axes, shape, itemsize) of every weight of the scanned-layer model, from `nnx.eval_shape` (a
  quantized model's int8 values and float32 scales as the separate weights they are)."""
  cls = registry.model_class(config)
  dt = DTYPES[param_dtype]
  model = nnx.eval_shape(lambda: cls(config, dtype=dt, param_dtype=dt, scan_layers=True, quantize=quantize,
                                     rngs=nnx.Rngs(0)))
  return tuple((path, tuple(var.axes), tuple(var.shape), np.dtype(var.dtype).itemsize)
               for path, var in weight_declarations(model))


def _resolve(model: str | QwenConfig | QwenVLConfig) -> tuple[str, QwenConfig | QwenVLConfig]:
  if isinstance(model, str):
    presets = all_presets()
    if model not in presets:
      raise ConfigError(f"model {model!r} is not a preset; known: {', '.join(sorted(presets))}.")
    return model, presets[model]
  return type(model).__name__, model


def _mesh(mesh: Mapping[str, int] | str | None) -> dict[str, int]:
  if mesh is None or isinstance(mesh, str):
    return parse_mesh(mesh or "")
  bad = sorted(set(mesh) - set(MESH_AXES))
  if bad:
    raise ConfigError(f"mesh axes {bad} are not among {', '.join(MESH_AXES)}.")
  sizes = {axis: int(mesh.get(axis, 1)) for axis in MESH_AXES}
  if min(sizes.values()) < 1:
    raise ConfigError(f"mesh {sizes}: sizes are at least 1.")
  return sizes


def pool_splits(config: QwenConfig, mesh: Mapping[str, int], page_size: int,
                rules: ShardingRules = DEFAULT_RULES) -> tuple[int, int]:
  """(page splits, head splits): how `spec_for(PagedKVCache.AXES)` splits a pool's pages and KV heads on `mesh`,
  for a pool whose page count the page axes divide (as `pages_for_memory` makes it)."""
  pages = math.prod(mesh.get(a, 1) for a in rules[PAGES])
  probe = (config.num_layers, pages, page_size, config.num_kv_heads, config.head_dim)
  shard = shard_shape(PagedKVCache.AXES, probe, mesh, rules)
  return probe[1] // shard[1], probe[3] // shard[3]


def plan_memory(model: str | QwenConfig | QwenVLConfig, *, mesh: Mapping[str, int] | str | None = None,
                dtype: str = "bfloat16", param_dtype: str | None = None, max_batch_size: int = 8,
                max_seq_len: int = 4096, max_prefill_chunk: int = 512, page_size: int = DEFAULT_PAGE_SIZE,
                kv_cache_dtype: str | None = None, kv_cache_memory: float | None = None,
                memory_gib: float | None = None, margin: float = 0.0, scan_layers: bool = True,
                vision_patches: int = PatchBuckets().maximum, quantize: str | None = None,
                rules: ShardingRules = DEFAULT_RULES, reserve_bytes: int = RUNTIME_RESERVE_BYTES) -> MemoryPlan:
  """The per-device memory of serving `model` (a preset name, a QwenConfig or a QwenVLConfig), and its page pool.

  mesh: {"data", "fsdp", "expert", "tensor"} sizes, or "data:2,tensor:4". dtype: compute dtype (and that of float
  pages); param_dtype: weight storage (default: dtype). max_batch_size, max_seq_len, max_prefill_chunk, page_size,
  kv_cache_dtype (None or "int8"), kv_cache_memory (GiB of pages per device): as `qwenjax.Engine` takes them.
  Without kv_cache_memory, the pool is what `memory_gib` GiB per device less `margin` leave after everything
  else (floored to KV_GIB_STEP), or, without memory_gib either, the pool that holds every slot at max_seq_len.
  ConfigError when the pool cannot hold one sequence of max_seq_len. scan_layers: stacked layers under `lax.scan`
  (the TPU/GPU default), whose step holds one layer's weights as a temporary. vision_patches: a VL model's largest
  vision bucket (`PatchBuckets().maximum` by default). quantize: None, "int8" or "w8a8": int8 projections with
  float32 scales per output channel (`qwenjax.model.layers.QuantizedWeight`), as `qwenjax.load(quantize=...)`.
  """
  name, config = _resolve(model)
  mesh = _mesh(mesh)
  param_dtype = param_dtype or dtype
  for label, value in (("dtype", dtype), ("param_dtype", param_dtype)):
    check_dtype(value, label)
  if kv_cache_dtype not in KV_CACHE_DTYPES:
    raise ConfigError(f"kv_cache_dtype is {kv_cache_dtype!r}; it must be None (the compute dtype) or 'int8'.")
  for label, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                       ("max_prefill_chunk", max_prefill_chunk), ("page_size", page_size),
                       ("vision_patches", vision_patches)):
    if int(value) < 1:
      raise ConfigError(f"{label} is {value}; it must be at least 1.")
  for label, value in (("kv_cache_memory", kv_cache_memory), ("memory_gib", memory_gib)):
    if value is not None and not value > 0:
      raise ConfigError(f"{label} is {value} GiB; it must be positive.")
  if not 0 <= margin < 1:
    raise ConfigError(f"margin is {margin}; it must lie in [0, 1).")
  cb = np.dtype(DTYPES[dtype]).itemsize
  text = getattr(config, "text", config)  # QwenVLConfig holds its decoder in .text
  vision = getattr(config, "vision", None)
  chunk = step_buckets(max_prefill_chunk, max_batch_size, max_seq_len).maximum  # the engine's step budget
  read = pages_needed(max_seq_len, page_size) * page_size  # S': the positions of a full sequence's pages
  sharder = _Sharder(mesh, rules)
  gathered = _Sharder({**mesh, "fsdp": 1}, rules)  # a layer's weights as fsdp all-gathers them for use
  no_expert = _Sharder({**mesh, "expert": 1}, rules)  # tokens inside a MoE layer: whole over the expert axis
  param_item = 1 if check_quantize(quantize) else np.dtype(DTYPES[param_dtype]).itemsize  # expert weights

  decls = _declarations(config, param_dtype, check_quantize(quantize))
  weights = sum(sharder.nbytes(axes, shape, item) for _, axes, shape, item in decls)

  def layer_weights(prefix: tuple) -> int:
    """One layer's weights of the stack under `prefix`, gathered over fsdp (0: unrolled layers and no fsdp)."""
    if not scan_layers and mesh["fsdp"] == 1:
      return 0
    return sum(gathered.nbytes(axes, shape, item) // shape[0] for path, axes, shape, item in decls
               if path[:len(prefix)] == prefix and axes[:1] == (LAYERS,))

  b = max_batch_size
  v = text.vocab_size
  sampling = sharder.nbytes((BATCH, VOCAB), (b, v), 1) + sharder.nbytes((BATCH, VOCAB), (b, v), 4)

  def moe_step(tokens: int) -> int:
    """Peak temporaries of a mixture-of-experts MLP over `tokens` tokens (`qwenjax.model.moe`): inside the expert
    axis's shard_map every device holds the step's assignments (A = tokens x k, their tokens gathered over the
    axis) padded to whole tiles of its own experts, float32 gate/up products over them, the summed output, and one
    chunk of gathered expert weights."""
    d, fm, e_local = text.hidden_size, text.moe_intermediate_size, text.num_experts // mesh["expert"]
    a = tokens * text.num_experts_per_tok
    tile, num_tiles = moe.tiling(a, e_local)
    padded = num_tiles * tile
    rows = 2 * no_expert.nbytes((BATCH, None), (padded, d), cb) + 3 * no_expert.nbytes(
        (BATCH, MLP), (padded, fm), _FLOAT32) + 2 * no_expert.nbytes((BATCH, None), (a, d), _FLOAT32)
    chunk = moe.gather_chunk(num_tiles, d, fm, param_item)
    return rows + gathered.nbytes((None, EMBED, MLP), (3 * chunk, d, fm), param_item)

  def decoder_step(rows: int, tokens: int) -> int:
    """Peak temporaries of one decoder step: `rows` sequences of `tokens` tokens attending to S' positions."""
    d, n, k, h, f = text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim, text.intermediate_size
    kv_read = 2 * sharder.nbytes((BATCH, KV_HEADS, LENGTH, None), (rows, k, read, h), cb)  # gathered pages
    score_shape = (rows, n, tokens, read)
    scores = 2 * sharder.nbytes((BATCH, HEADS, None, LENGTH), score_shape, _FLOAT32)
    if cb != _FLOAT32:
      scores += sharder.nbytes((BATCH, HEADS, None, LENGTH), score_shape, cb)
    mlp = 3 * sharder.nbytes((BATCH, None, MLP), (rows, tokens, f), cb)
    if text.num_experts:
      mlp = max(mlp if not all(text.sparse_layers()) else 0, moe_step(rows * tokens))
    hidden = 8 * sharder.nbytes((BATCH, None, None), (rows, tokens, d), cb)
    layer = layer_weights(("layers",)) + kv_read + scores + mlp + hidden
    logits = sharder.nbytes((BATCH, VOCAB), (rows, v), _FLOAT32)
    sampler = _SAMPLING_BUFFERS * sharder.nbytes((BATCH, None), (rows, v), _FLOAT32)
    return max(layer, logits + sampler + tables)

  # With fsdp, XLA's SPMD partitioner all-gathers the [V, D] table over fsdp for the token lookup and the head
  # for the logits: two gathered tables, tied or not (measured with 8 CPU devices, 0.5B and 7B).
  tables = 0
  if mesh["fsdp"] > 1:
    tables = 2 * max(gathered.nbytes(axes, shape, item) for path, axes, shape, item in decls
                     if path in (("embed",), ("lm_head",)))
  decode = decoder_step(b, 1)
  prefill = decoder_step(1, chunk)
  vision_peak = 0
  if vision is not None:
    p, dv, nv, fv = vision_patches, vision.hidden_size, vision.num_heads, vision.intermediate_size
    q = query_block(p, nv)
    hidden = sharder.nbytes((None, None), (p, dv), cb)  # [P, D]
    attention = 5 * hidden + 2 * sharder.nbytes((HEADS, None, None), (nv, q, p), _FLOAT32)
    mlp = 2 * hidden + 3 * sharder.nbytes((None, MLP), (p, fv), cb)
    vision_peak = (layer_weights(("visual", "layers")) + max(attention, mlp)
                   + sharder.nbytes((None, None), (p, vision.patch_dim), cb))
  fixed = weights + sampling + max(decode, prefill, vision_peak) + int(reserve_bytes)

  # The page pool.
  quantized = kv_cache_dtype == "int8"
  page_splits, head_splits = pool_splits(text, mesh, page_size, rules)
  one_page = page_bytes(text, page_size, DTYPES[dtype], quantized) / head_splits  # per device

  def pool_bytes(num_pages: int) -> int:
    shape = (text.num_layers, num_pages, page_size, text.num_kv_heads, text.head_dim)
    kv = 2 * sharder.nbytes(PagedKVCache.AXES, shape, 1 if quantized else cb)
    if quantized:
      kv += 2 * sharder.nbytes(PagedKVCache.SCALE_AXES, shape[:4], _FLOAT32)
    return kv

  where = f"{name} on mesh {mesh_text(mesh)}"
  need = pages_needed(max_seq_len, page_size)
  if kv_cache_memory is None and memory_gib is None:
    num_pages = -(-b // page_splits) * need * page_splits  # every slot at max_seq_len, its share on each shard
    budget = pool_bytes(num_pages) / GiB
  else:
    if kv_cache_memory is not None:
      budget, source = float(kv_cache_memory), f"kv_cache_memory={kv_cache_memory:g} GiB"
    else:
      left = memory_gib * GiB * (1 - margin) - fixed
      budget = max(0.0, round(math.floor(left / GiB / KV_GIB_STEP) * KV_GIB_STEP, 2))
      source = (f"{memory_gib:g} GiB per device less the {margin:.0%} margin, weights {weights / GiB:.2f}, "
                f"activations {max(decode, prefill, vision_peak) / GiB:.2f}, sampling {sampling / GiB:.2f} and "
                f"reserve {reserve_bytes / GiB:.2f} GiB, leaves {budget:.2f} GiB of KV pages")
    # Each of the page shards holds the pages one device's budget holds (as the engine sizes its pool).
    num_pages = pages_for_memory(text, budget * GiB, page_size, DTYPES[dtype], quantized, page_splits, head_splits)
    if num_pages // page_splits < need:
      raise ConfigError(
          f"{where}: {source}, {num_pages} pages of {page_size} tokens ({kv_cache_dtype or dtype}); one sequence "
          f"of max_seq_len={max_seq_len} needs {need} pages on one page shard, "
          f"{need * one_page / GiB:.2f} GiB per device.")
  return MemoryPlan(model=name, dtype=dtype, param_dtype=param_dtype, mesh=mesh, max_batch_size=b,
                    max_seq_len=max_seq_len, max_prefill_chunk=chunk, page_size=page_size,
                    kv_cache_dtype=kv_cache_dtype, kv_cache_memory=budget, num_pages=num_pages,
                    page_splits=page_splits, weights=weights, kv_cache=pool_bytes(num_pages), sampling=sampling,
                    decode_activations=decode, prefill_activations=prefill, vision_activations=vision_peak,
                    reserve=int(reserve_bytes), quantize=check_quantize(quantize))


def mesh_text(mesh: Mapping[str, int]) -> str:
  """{'data': 2, 'fsdp': 1, 'tensor': 4} -> 'data:2,tensor:4' (axes of size 1 left out; '1' for one device)."""
  return ",".join(f"{a}:{mesh[a]}" for a in MESH_AXES if mesh.get(a, 1) > 1) or "1"


def tokens_text(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def format_table(plans: Sequence[MemoryPlan], memory_gib: float | None = None, margin: float = 0.0) -> str:
  """A Markdown table of plans in GiB per device, with each pool's pages and the sequences it holds at
  TYPICAL_LENGTHS and at max_seq_len; with `memory_gib`, a column saying whether each fits."""
  gib = lambda n: f"{n / GiB:.2f}"
  head = ["model", "mesh", "slots", "context", "page", "KV dtype", "weights", "sampling", "activations", "reserve",
          "KV pool", "pages"] + [f"seqs at {tokens_text(n)}" for n in TYPICAL_LENGTHS] + ["seqs at context", "total"]
  if memory_gib is not None:
    head.append(f"fits {memory_gib:g} GiB - {margin:.0%}")
  rows = []
  for p in plans:
    row = [p.model, mesh_text(p.mesh), str(p.max_batch_size), str(p.max_seq_len), str(p.page_size),
           p.kv_cache_dtype or p.dtype, gib(p.weights), gib(p.sampling), gib(p.activations), gib(p.reserve),
           gib(p.kv_cache), str(p.num_pages)] + [str(p.sequences(n)) for n in TYPICAL_LENGTHS]
    row += [str(p.sequences()), gib(p.total)]
    if memory_gib is not None:
      row.append("yes" if p.fits(memory_gib * GiB, margin) else "NO")
    rows.append(row)
  return markdown_table(head, rows)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
