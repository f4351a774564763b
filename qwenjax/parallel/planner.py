r"""How much memory each device needs to serve a Qwen2.5 model, and how large a KV page pool the rest holds.

    plan = plan_memory("qwen2.5-7b", mesh="data:2,tensor:4", dtype="bfloat16", max_batch_size=64,
                       max_seq_len=8192, page_size=128, memory_gib=16, margin=0.1)
    plan.kv_cache_memory, plan.num_pages, plan.sequences()   # 9.42 GiB, 11024 pages, 172 sequences of 8192
    print(format_table([plan], memory_gib=16, margin=0.1))
    topology = load_topology("v5e-8")               # tpu_configs/v5e-8.json; or a path to a JSON file
    plans = plan_topology(topology)                  # one plan per model the topology lists

    python -m qwenjax.parallel.planner --topology=v5e-8
    python -m qwenjax.parallel.planner --model=qwen2.5-72b --mesh=tensor:8 --max_batch_size=32 --max_seq_len=16384 \
        --memory_gib=32 --kv_cache_dtype=int8
    python -m qwenjax.parallel.planner --readme               # the tables of tpu_configs/README.md
    python -m qwenjax.parallel.planner --derive_topologies    # rewrites tpu_configs/*.json's derived fields

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
which only lowers the peak. tests/parallel/test_planner.py holds the model within 2x of XLA's own temp figure
(`memory_analysis()`) for the 0.5B decoder on one and on 8 devices, and for a VL tower. Only the scanned tower is
modelled: XLA:CPU's unrolled one holds up to 6x more (790 MiB against 126 MiB at 1024 patches).

A topology file (tpu_configs/*.json) names a slice or host and, per model it serves, the mesh and engine sizes;
page_size (`PAGE_SIZES` of the accelerator's backend) and kv_cache_memory_gib are derived by this planner
(`--derive_topologies`), never written by hand, and a test holds every file to what the planner derives:

    {"name": "v5e-8", "accelerator": "TPU v5e", "chips": 8, "hosts": 1, "chips_per_host": 8,
     "memory_per_chip_gib": 16, "margin": 0.1, "dtype": "bfloat16",
     "models": {"qwen2.5-7b": {"mesh": {"data": 2, "fsdp": 1, "tensor": 4}, "max_batch_size": 64,
                               "max_seq_len": 8192, "max_prefill_chunk": 512, "page_size": 128,
                               "kv_cache_memory_gib": 9.42}}}   # 11024 pages: 172 sequences of 8192

margin: the fraction of each chip's memory kept free; a plan fits when its total is at most
memory_per_chip_gib * (1 - margin). max_batch_size still bounds the decode slots (and sizes the decode
activations and the sampling state); max_seq_len bounds one sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.config import DTYPES, PRESETS, QwenConfig, check_dtype, read_json
from qwenjax.engine.pages import pages_needed
from qwenjax.model.decoder import Qwen2, weight_declarations
from qwenjax.model.kv_cache import PAGE_SIZES, PagedKVCache, page_bytes, pages_for_memory
from qwenjax.model.layers import check_quantize
from qwenjax.model.qwen2_vl import VL_PRESETS, Qwen2VL, QwenVLConfig
from qwenjax.model.vision_plan import PatchBuckets, query_block
from qwenjax.parallel.axes import (
  BATCH,
  DEFAULT_RULES,
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
# The shipped topology files: the top-level tpu_configs/ of a checkout, installed with the wheel as a package.
TOPOLOGY_DIR = pathlib.Path(importlib.resources.files("tpu_configs"))
KV_CACHE_DTYPES = (None, "int8")  # None: pages in the compute dtype
DEFAULT_PAGE_SIZE = PAGE_SIZES["tpu"]  # plan_memory's, when no page size is given (topologies: their backend's)
TYPICAL_LENGTHS = (2048, 8192)  # sequence lengths the tables count the pool's sequences at, besides max_seq_len
KV_GIB_STEP = 0.01  # a derived kv_cache_memory is floored to this many GiB
_MISSING = object()
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
  cls = Qwen2VL if isinstance(config, QwenVLConfig) else Qwen2
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

  mesh: {"data", "fsdp", "tensor"} sizes, or "data:2,tensor:4". dtype: compute dtype (and that of float pages);
  param_dtype: weight storage (default: dtype). max_batch_size, max_seq_len, max_prefill_chunk, page_size,
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
  chunk = min(max_prefill_chunk, max_seq_len)  # as the engine caps its buckets
  read = pages_needed(max_seq_len, page_size) * page_size  # S': the positions of a full sequence's pages
  sharder = _Sharder(mesh, rules)
  gathered = _Sharder({**mesh, "fsdp": 1}, rules)  # a layer's weights as fsdp all-gathers them for use

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

  def decoder_step(rows: int, tokens: int) -> int:
    """Peak temporaries of one decoder step: `rows` sequences of `tokens` tokens attending to S' positions."""
    d, n, k, h, f = text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim, text.intermediate_size
    kv_read = 2 * sharder.nbytes((BATCH, KV_HEADS, LENGTH, None), (rows, k, read, h), cb)  # gathered pages
    score_shape = (rows, n, tokens, read)
    scores = 2 * sharder.nbytes((BATCH, HEADS, None, LENGTH), score_shape, _FLOAT32)
    if cb != _FLOAT32:
      scores += sharder.nbytes((BATCH, HEADS, None, LENGTH), score_shape, cb)
    mlp = 3 * sharder.nbytes((BATCH, None, MLP), (rows, tokens, f), cb)
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


def _tokens(n: int) -> str:
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def format_table(plans: Sequence[MemoryPlan], memory_gib: float | None = None, margin: float = 0.0) -> str:
  """A Markdown table of plans in GiB per device, with each pool's pages and the sequences it holds at
  TYPICAL_LENGTHS and at max_seq_len; with `memory_gib`, a column saying whether each fits."""
  gib = lambda n: f"{n / GiB:.2f}"
  head = ["model", "mesh", "slots", "context", "page", "KV dtype", "weights", "sampling", "activations", "reserve",
          "KV pool", "pages"] + [f"seqs at {_tokens(n)}" for n in TYPICAL_LENGTHS] + ["seqs at context", "total"]
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
  return _markdown(head, rows)


def _markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# --- Topology files -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServingEntry:
  """How one model is served on a topology: its mesh, the engine's sizes, and its page pool (page_size and
  kv_cache_memory_gib, derived by `derive_topology`; None where a hand-written file leaves them out)."""

  mesh: Mapping[str, int]
  max_batch_size: int
  max_seq_len: int
  max_prefill_chunk: int = 512
  page_size: int | None = None
  kv_cache_memory_gib: float | None = None


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice or GPU host (one `tpu_configs/*.json` file) and the models it serves."""

  name: str
  accelerator: str
  chips: int
  hosts: int
  chips_per_host: int
  memory_per_chip_gib: float
  margin: float
  dtype: str
  models: Mapping[str, ServingEntry]
  notes: str = ""
  source: str = ""  # the file it was read from

  @property
  def usable_bytes(self) -> float:
    """Memory per chip a plan may take: the chip's memory less the margin."""
    return self.memory_per_chip_gib * GiB * (1 - self.margin)

  @property
  def backend(self) -> str:
    """"tpu" for a TPU slice, "gpu" otherwise: the backend whose `PAGE_SIZES` entry its pools use."""
    return "tpu" if self.accelerator.upper().startswith("TPU") else "gpu"


_TOPOLOGY_FIELDS = ("name", "accelerator", "chips", "hosts", "chips_per_host", "memory_per_chip_gib", "margin",
                    "dtype", "notes", "models")  # in the order `topology_json` writes them
_ENTRY_FIELDS = ("mesh", "max_batch_size", "max_seq_len", "max_prefill_chunk", "page_size", "kv_cache_memory_gib")


def topology_names() -> list[str]:
  """Names of the topology files shipped in tpu_configs/."""
  return sorted(p.stem for p in TOPOLOGY_DIR.glob("*.json"))


def topology_path(name_or_path: str | pathlib.Path) -> pathlib.Path:
  """tpu_configs/NAME.json for a bare name, else the path itself."""
  path = pathlib.Path(name_or_path)
  if path.suffix != ".json" and path.parent == pathlib.Path("."):
    path = TOPOLOGY_DIR / f"{name_or_path}.json"
  return path


def load_topology(name_or_path: str | pathlib.Path) -> Topology:
  """A topology by bare name ("v5e-8": tpu_configs/v5e-8.json) or by path to a JSON file.

  A missing file, bad JSON or a field of the wrong kind is one ConfigError naming the file and the field."""
  path = topology_path(name_or_path)
  if not path.exists():
    raise ConfigError(f"{path}: no such topology file (shipped: {', '.join(topology_names())}).")
  raw = read_json(path)

  def fail(field: str, expected: str, got: Any = None) -> ConfigError:
    found = "missing" if got is _MISSING else f"got {got!r}"
    return ConfigError(f"{path}: field {field!r}: expected {expected}, {found}.")

  def get(obj: Mapping, key: str, prefix: str, kind: str, default: Any = _MISSING):
    value = obj.get(key, default) if isinstance(obj, Mapping) else _MISSING
    field = prefix + key
    if value is _MISSING:
      raise fail(field, kind, _MISSING)
    if value is None and default is None:
      return None
    checks = {
        "a positive integer": lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1,
        "a positive number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0,
        "a number in [0, 1)": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1,
        "a string": lambda x: isinstance(x, str),
        "an object": lambda x: isinstance(x, Mapping),
    }
    if not checks[kind](value):
      raise fail(field, kind, value)
    return value

  if not isinstance(raw, Mapping):
    raise fail("(top level)", "an object", raw)
  unknown = sorted(set(raw) - set(_TOPOLOGY_FIELDS))
  if unknown:
    raise fail(unknown[0], f"only the fields {', '.join(sorted(_TOPOLOGY_FIELDS))}", unknown[0])
  chips = get(raw, "chips", "", "a positive integer")
  hosts = get(raw, "hosts", "", "a positive integer")
  per_host = get(raw, "chips_per_host", "", "a positive integer")
  if hosts * per_host != chips:
    raise fail("chips", f"hosts * chips_per_host = {hosts * per_host}", chips)
  dtype = get(raw, "dtype", "", "a string")
  check_dtype(dtype, f"{path}: field 'dtype'")
  presets = all_presets()
  models = {}
  for model, entry in get(raw, "models", "", "an object").items():
    prefix = f"models.{model}."
    if model not in presets:
      raise fail(f"models.{model}", "a preset name (" + ", ".join(sorted(presets)) + ")", model)
    if not isinstance(entry, Mapping):
      raise fail(f"models.{model}", "an object", entry)
    mesh_obj = get(entry, "mesh", prefix, "an object")
    unknown = sorted(set(mesh_obj) - set(MESH_AXES))
    if unknown:
      raise fail(f"{prefix}mesh.{unknown[0]}", f"only the axes {', '.join(MESH_AXES)}", unknown[0])
    mesh = {a: get(mesh_obj, a, f"{prefix}mesh.", "a positive integer", 1) for a in MESH_AXES}
    if math.prod(mesh.values()) != chips:
      raise fail(f"{prefix}mesh", f"axis sizes whose product is the {chips} chips", mesh_obj)
    unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
    if unknown:
      raise fail(prefix + unknown[0], f"only {', '.join(_ENTRY_FIELDS)}", unknown[0])
    models[model] = ServingEntry(
        mesh=mesh, max_batch_size=get(entry, "max_batch_size", prefix, "a positive integer"),
        max_seq_len=get(entry, "max_seq_len", prefix, "a positive integer"),
        max_prefill_chunk=get(entry, "max_prefill_chunk", prefix, "a positive integer", 512),
        page_size=get(entry, "page_size", prefix, "a positive integer", None),
        kv_cache_memory_gib=get(entry, "kv_cache_memory_gib", prefix, "a positive number", None))
  return Topology(
      name=get(raw, "name", "", "a string"), accelerator=get(raw, "accelerator", "", "a string"), chips=chips,
      hosts=hosts, chips_per_host=per_host, memory_per_chip_gib=get(raw, "memory_per_chip_gib", "",
                                                                     "a positive number"),
      margin=get(raw, "margin", "", "a number in [0, 1)"), dtype=dtype, models=models,
      notes=get(raw, "notes", "", "a string", ""), source=str(path))


def plan_topology(topology: Topology, *, derive: bool = False, **kwargs) -> list[MemoryPlan]:
  """One plan per model the topology serves, in its dtype, on its chips' memory and margin (kwargs, such as
  kv_cache_dtype, go to `plan_memory`). Each pool is the entry's page_size and kv_cache_memory_gib; with `derive`,
  or where the entry lacks them, what the planner derives (the backend's page size; the memory left)."""
  plans = []
  for model, e in topology.models.items():
    page_size = PAGE_SIZES[topology.backend] if derive or e.page_size is None else e.page_size
    memory = None if derive else e.kv_cache_memory_gib
    plans.append(plan_memory(model, mesh=e.mesh, dtype=topology.dtype, max_batch_size=e.max_batch_size,
                             max_seq_len=e.max_seq_len, max_prefill_chunk=e.max_prefill_chunk, page_size=page_size,
                             kv_cache_memory=memory, memory_gib=topology.memory_per_chip_gib,
                             margin=topology.margin, **kwargs))
  return plans


def derive_topology(topology: Topology) -> Topology:
  """The topology with every entry's page_size and kv_cache_memory_gib as the planner derives them: the page size
  of its backend, and the GiB per chip left for pages in the compute dtype (`plan_topology(derive=True)`)."""
  plans = plan_topology(topology, derive=True)
  models = {model: dataclasses.replace(e, page_size=p.page_size, kv_cache_memory_gib=p.kv_cache_memory)
            for (model, e), p in zip(topology.models.items(), plans)}
  return dataclasses.replace(topology, models=models)


def topology_json(topology: Topology) -> str:
  """The text of a topology file: top-level fields one per line, each model's entry on one line."""
  top = {f: getattr(topology, f) for f in _TOPOLOGY_FIELDS[:-1] if f != "notes" or topology.notes}
  lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in top.items()]
  entries = []
  for model, e in topology.models.items():
    entry = {f: getattr(e, f) for f in _ENTRY_FIELDS if getattr(e, f) is not None}
    entry["mesh"] = {a: e.mesh.get(a, 1) for a in MESH_AXES}
    entries.append(f"    {json.dumps(model)}: {json.dumps(entry)}")
  return "\n".join(["{", *lines, '  "models": {', ",\n".join(entries), "  }", "}"]) + "\n"


def derive_topologies(names: Sequence[str] | None = None) -> list[pathlib.Path]:
  """Rewrites the shipped topology files (or those named) with their derived fields; returns those it changed."""
  changed = []
  for name in names or topology_names():
    path = topology_path(name)
    text = topology_json(derive_topology(load_topology(path)))
    if path.read_text() != text:
      path.write_text(text)
      changed.append(path)
  return changed


def _architecture(config: QwenConfig | QwenVLConfig) -> tuple:
  """What decides a model's memory: decoder sizes (and, for VL, the tower's). Tying and eos ids do not."""
  text = getattr(config, "text", config)
  key = (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_layers, text.num_heads,
         text.num_kv_heads, text.head_dim)
  vision = getattr(config, "vision", None)
  return key + ((vision.depth, vision.hidden_size, vision.intermediate_size) if vision else ())


def preset_of(config: QwenConfig | QwenVLConfig) -> str | None:
  """The preset with this model's architecture (a fine-tune or a GGUF of Qwen2.5-7B is "qwen2.5-7b"), or None."""
  key = _architecture(config)
  return next((name for name, preset in all_presets().items() if _architecture(preset) == key), None)


def serving_entry(topology: Topology, config: QwenConfig | QwenVLConfig) -> tuple[str, ServingEntry]:
  """How `topology` serves a model of this architecture: (preset name, its entry). ConfigError if it does not."""
  name = preset_of(config)
  if name is None:
    raise ConfigError(f"{topology.source or topology.name}: the model matches no Qwen2.5 preset, so no entry of "
                      "this topology applies; pass --mesh and the engine sizes instead.")
  if name not in topology.models:
    raise ConfigError(f"{topology.source or topology.name}: serves {', '.join(sorted(topology.models))}, not "
                      f"{name} (it does not fit, or is not planned, on {topology.chips} chips).")
  return name, topology.models[name]


# --- README tables --------------------------------------------------------------------------------------------

# Representative meshes for the README's per-size table: one chip, a tensor-parallel host of 8, and 4 such
# groups splitting the batch; each at a batch of 32 sequences of 8192 tokens, in bfloat16, TPU pages.
README_MESHES = ("1", "tensor:8", "data:4,tensor:8")
README_SHAPE = dict(max_batch_size=32, max_seq_len=8192, max_prefill_chunk=512, page_size=DEFAULT_PAGE_SIZE)


def readme_tables() -> str:
  """The tables of tpu_configs/README.md: every Qwen2.5 size on README_MESHES with a pool that holds every slot
  at full context, then every topology file's entries with their derived pools, in the compute dtype and int8."""
  out = [f"Per device, bfloat16, {README_SHAPE['max_batch_size']} slots, context {README_SHAPE['max_seq_len']}, "
         f"prefill chunk {README_SHAPE['max_prefill_chunk']}, pages of {README_SHAPE['page_size']} tokens, a pool "
         "that holds every slot at full context, GiB:", ""]
  plans = [plan_memory(m, mesh="" if mesh == "1" else mesh, dtype="bfloat16", **README_SHAPE)
           for m in all_presets() for mesh in README_MESHES]
  out.append(format_table(plans))
  head = (["topology", "GiB per chip", "margin", "model", "mesh", "slots", "context", "page", "KV GiB per chip",
           "pages", "seqs at context"] + [f"seqs at {_tokens(n)}" for n in reversed(TYPICAL_LENGTHS)]
          + ["int8 pages", "int8 seqs at context", "planned GiB per chip"])
  rows = []
  for name in topology_names():
    topo = load_topology(name)
    for p, q in zip(plan_topology(topo), plan_topology(topo, kv_cache_dtype="int8")):
      rows.append([name, f"{topo.memory_per_chip_gib:g}", f"{topo.margin:g}", p.model, mesh_text(p.mesh),
                   str(p.max_batch_size), str(p.max_seq_len), str(p.page_size), f"{p.kv_cache_memory:.2f}",
                   str(p.num_pages), str(p.sequences())] + [str(p.sequences(n)) for n in reversed(TYPICAL_LENGTHS)]
                  + [str(q.num_pages), str(q.sequences()), f"{p.total / GiB:.1f}"])
  out += ["", "Every topology file's entries, with the page pool the planner derives for them (the int8 columns: "
          "the same GiB of int8 pages):", "", _markdown(head, rows)]
  return "\n".join(out)


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The entry point's flags, defined only when run as a program (launch/ scripts define --model too)."""
  return dict(
      topology=flags.DEFINE_string("topology", None, "A topology name (tpu_configs/NAME.json) or a JSON file: "
                                   "plans every model it serves and says whether each fits."),
      model=flags.DEFINE_string("model", None, "A preset name (qwen2.5-7b, qwen2.5-vl-7b, ...) to plan alone."),
      mesh=flags.DEFINE_string("mesh", "", "With --model: mesh axes, e.g. 'data:2,tensor:4'."),
      dtype=flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "With --model: compute and weight "
                              "dtype."),
      max_batch_size=flags.DEFINE_integer("max_batch_size", 8, "With --model: decode slots.", lower_bound=1),
      max_seq_len=flags.DEFINE_integer("max_seq_len", 4096, "With --model: longest sequence.", lower_bound=1),
      max_prefill_chunk=flags.DEFINE_integer("max_prefill_chunk", 512, "With --model: tokens of one prefill call.",
                                             lower_bound=1),
      page_size=flags.DEFINE_integer("page_size", DEFAULT_PAGE_SIZE, "With --model: tokens per KV page.",
                                     lower_bound=1),
      kv_cache_dtype=flags.DEFINE_enum("kv_cache_dtype", None, ["int8"], "KV pages in int8 with float32 scales "
                                       "(default: the compute dtype); with --topology, the files' GiB of int8 "
                                       "pages."),
      kv_cache_memory_gib=flags.DEFINE_float("kv_cache_memory_gib", None, "With --model: GiB of KV pages per "
                                             "device (default: what --memory_gib leaves, or every slot at "
                                             "--max_seq_len)."),
      memory_gib=flags.DEFINE_float("memory_gib", None, "With --model: memory per device, to size the page pool "
                                    "from and say whether the plan fits."),
      margin=flags.DEFINE_float("margin", 0.1, "With --model and --memory_gib: fraction of memory kept free."),
      quantize=flags.DEFINE_enum("quantize", "none", ["none", "int8", "w8a8"], "With --model: int8 projections "
                                 "with float32 scales per output channel, as `qwenjax.load(quantize=...)`."),
      readme=flags.DEFINE_bool("readme", False, "Print the tables of tpu_configs/README.md."),
      derive_topologies=flags.DEFINE_bool("derive_topologies", False, "Rewrite every tpu_configs/*.json (or "
                                          "--topology alone) with the page_size and kv_cache_memory_gib the "
                                          "planner derives."),
  )


def main(argv, f: dict[str, flags.FlagHolder]):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if f["derive_topologies"].value:
      names = [f["topology"].value] if f["topology"].value else None
      changed = derive_topologies(names)
      logging.info("rewrote %d topology files: %s", len(changed), ", ".join(map(str, changed)) or "none")
      print("\n".join(map(str, changed)))
    elif f["readme"].value:
      print(readme_tables())
    elif f["topology"].value:
      topo = load_topology(f["topology"].value)
      print(f"{topo.name}: {topo.chips} x {topo.accelerator}, {topo.memory_per_chip_gib:g} GiB each, "
            f"{topo.dtype}")
      plans = plan_topology(topo, kv_cache_dtype=f["kv_cache_dtype"].value)
      print(format_table(plans, topo.memory_per_chip_gib, topo.margin))
    elif f["model"].value:
      memory = f["memory_gib"].value
      margin = f["margin"].value if memory else 0.0
      plan = plan_memory(f["model"].value, mesh=f["mesh"].value, dtype=f["dtype"].value,
                         max_batch_size=f["max_batch_size"].value, max_seq_len=f["max_seq_len"].value,
                         max_prefill_chunk=f["max_prefill_chunk"].value, page_size=f["page_size"].value,
                         kv_cache_dtype=f["kv_cache_dtype"].value, kv_cache_memory=f["kv_cache_memory_gib"].value,
                         memory_gib=memory, margin=margin, quantize=f["quantize"].value)
      print(format_table([plan], memory, margin))
    else:
      raise app.UsageError("give --topology, --model, --readme or --derive_topologies.")
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(functools.partial(main, f=_flags))
