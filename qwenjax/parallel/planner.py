r"""How much memory each device needs to serve a Qwen2.5 model: weights, KV cache, sampling state, activations.

    plan = plan_memory("qwen2.5-7b", mesh="data:2,tensor:4", dtype="bfloat16", max_batch_size=64,
                       max_seq_len=8192)
    print(format_table([plan], memory_gib=16, margin=0.1))
    topology = load_topology("v5e-8")               # tpu_configs/v5e-8.json; or a path to a JSON file
    plans = plan_topology(topology)                  # one plan per model the topology lists

    python -m qwenjax.parallel.planner --topology=v5e-8
    python -m qwenjax.parallel.planner --model=qwen2.5-72b --mesh=tensor:8 --max_batch_size=32 --max_seq_len=16384
    python -m qwenjax.parallel.planner --readme               # the tables of tpu_configs/README.md

Every figure is bytes on one device, for an `Engine(max_batch_size=B, max_seq_len=C, max_prefill_chunk=T)`
serving the model on a mesh of (data, fsdp, tensor) devices. Letters as in `qwenjax.model.decoder`'s legend (L layers,
K KV heads, N query heads, H head dim, D hidden, F MLP, V vocabulary, S cache positions) and `qwenjax.model.vision`'s
(P patches, Q queries of one attention block, C pixel values per patch).

  weights      each weight's shard under `qwenjax.parallel.sharding.spec_for` with the rules: read from the abstract
               model (`nnx.eval_shape`, nothing allocated), so a weight whose heads the tensor axis does not
               divide (0.5B's 14 query heads over 4) counts whole.
  kv_cache     k and v [L, B, K, S, H] in the compute dtype, S = C + T (the engine keeps one prefill chunk of
               headroom), split as `spec_for(KVCache.AXES)` splits it (B over the batch axes, K over tensor when it
               divides); plus lengths and rope offsets, [B] int32 each, split like B.
  sampling     the engine's [B, V] prompt mask (bool) and token counts (int32), split by (batch, vocab).
  activations  the peak of three programs, each the larger of its stages (their buffers are not live together):
    decode     one token for each of B rows attending to all S positions, then sampling:
                 layer stage: one layer's weights, gathered over fsdp (the scan slices the stacked weights, and
                   fsdp all-gathers them) + that layer's keys and values as attention reads them, 2 [B, K, S, H]
                   (XLA:CPU materialises the slice) + scores and probabilities 2 [B, N, 1, S] float32 (+ probs in
                   the compute dtype) + the MLP's 3 [B, F] + 8 [B, D] of hidden states, q, k, v, outputs
                 head stage: logits [B, V] float32 + 4 [B, V] float32 of sampling (penalties, filters); with
                   fsdp, the embedding table gathered over fsdp twice (token lookup, logits), as XLA's SPMD
                   partitioner does
    prefill    one chunk of T tokens of one prompt (the engine prefills one row at a time) appended after S
               positions: the same terms with B -> 1 and T tokens, scores 2 [1, N, T, S] float32
    vision     (Qwen2.5-VL) the scanned tower on its largest patch bucket P: one block's weights + the gathered
               patches [P, C] + the larger of attention (5 [P, D]: residual, q, k, v, output; scores 2 [N, Q, P]
               float32 of one query block of a full-attention block) and the MLP (2 [P, D] + 3 [P, F]).
               Every activation is split by the mesh where its logical axes allow.
  reserve      a fixed allowance per device, `RUNTIME_RESERVE_BYTES` (1 GiB): compiled programs, the runtime's
               own buffers, collectives' scratch, cuBLAS workspaces on GPU.

The activation model follows what XLA:CPU's buffer assignment holds (it materialises the layer's cache slice
and the scan's weight slice); XLA on TPU or GPU may fuse those slices into the matmuls, which only lowers the
peak. tests/test_planner.py holds the model within 2x of XLA's own temp figure (`memory_analysis()`) for the
0.5B decoder on one and on 8 devices, and for a VL tower. Only the scanned tower is modelled: XLA:CPU's unrolled
one holds up to 6x more (790 MiB against 126 MiB at 1024 patches).

A topology file (tpu_configs/*.json) names a slice or host and, per model it serves, the mesh and engine sizes:

    {"name": "v5e-8", "accelerator": "TPU v5e", "chips": 8, "hosts": 1, "chips_per_host": 8,
     "memory_per_chip_gib": 16, "margin": 0.1, "dtype": "bfloat16",
     "models": {"qwen2.5-7b": {"mesh": {"data": 2, "fsdp": 1, "tensor": 4}, "max_batch_size": 64,
                               "max_seq_len": 8192, "max_prefill_chunk": 512}}}

margin: the fraction of each chip's memory kept free; a plan fits when its total is at most
memory_per_chip_gib * (1 - margin).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.config import DTYPES, PRESETS, QwenConfig, check_dtype, read_json
from qwenjax.model.decoder import Qwen2, weight_declarations
from qwenjax.model.kv_cache import KVCache
from qwenjax.model.qwen2_vl import VL_PRESETS, Qwen2VL, QwenVLConfig
from qwenjax.multimodal.vision_plan import PatchBuckets, query_block
from qwenjax.parallel.axes import BATCH, DEFAULT_RULES, HEADS, KV_HEADS, LAYERS, LENGTH, MLP, VOCAB, ShardingRules
from qwenjax.parallel.sharding import MESH_AXES, parse_mesh, shard_shape

GiB = 1 << 30
RUNTIME_RESERVE_BYTES = 1 * GiB
# The shipped topology files: the top-level tpu_configs/ of a checkout, installed with the wheel as a package.
TOPOLOGY_DIR = pathlib.Path(importlib.resources.files("tpu_configs"))
_MISSING = object()
_SAMPLING_BUFFERS = 4  # [B, V] float32 buffers the sampler holds besides the logits (measured on XLA:CPU: 2.4-4)
_FLOAT32 = 4


def all_presets() -> dict[str, QwenConfig | QwenVLConfig]:
  """Text and VL presets by name."""
  return {**PRESETS, **VL_PRESETS}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one model served on one mesh. `activations` is the peak of the decode step, the prefill
  chunk and (VL) the vision tower; `total` adds everything up."""

  model: str
  dtype: str
  param_dtype: str
  mesh: Mapping[str, int]
  max_batch_size: int
  max_seq_len: int
  max_prefill_chunk: int
  weights: int
  kv_cache: int
  sampling: int
  decode_activations: int
  prefill_activations: int
  vision_activations: int
  reserve: int

  @property
  def cache_len(self) -> int:
    """S: the cache positions the engine allocates (context plus one prefill chunk of headroom)."""
    return self.max_seq_len + self.max_prefill_chunk

  @property
  def activations(self) -> int:
    return max(self.decode_activations, self.prefill_activations, self.vision_activations)

  @property
  def total(self) -> int:
    return self.weights + self.kv_cache + self.sampling + self.activations + self.reserve

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
def _declarations(config: QwenConfig | QwenVLConfig, param_dtype: str
                  ) -> tuple[tuple[tuple, tuple[str | None, ...], tuple[int, ...], int], ...]:
  """(path, logical axes, shape, itemsize) of every weight of the scanned-layer model, from `nnx.eval_shape`."""
  cls = Qwen2VL if isinstance(config, QwenVLConfig) else Qwen2
  dt = DTYPES[param_dtype]
  model = nnx.eval_shape(lambda: cls(config, dtype=dt, param_dtype=dt, scan_layers=True, rngs=nnx.Rngs(0)))
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


def plan_memory(model: str | QwenConfig | QwenVLConfig, *, mesh: Mapping[str, int] | str | None = None,
                dtype: str = "bfloat16", param_dtype: str | None = None, max_batch_size: int = 8,
                max_seq_len: int = 4096, max_prefill_chunk: int = 512, scan_layers: bool = True,
                vision_patches: int = PatchBuckets().maximum,
                rules: ShardingRules = DEFAULT_RULES, reserve_bytes: int = RUNTIME_RESERVE_BYTES) -> MemoryPlan:
  """The per-device memory of serving `model` (a preset name, a QwenConfig or a QwenVLConfig).

  mesh: {"data", "fsdp", "tensor"} sizes, or "data:2,tensor:4". dtype: compute and KV-cache dtype; param_dtype:
  weight storage (default: dtype). max_batch_size, max_seq_len, max_prefill_chunk: as `qwenjax.Engine` takes
  them. scan_layers: stacked layers under `lax.scan` (the TPU/GPU default), whose step holds one layer's weights
  as a temporary. vision_patches: a VL model's largest vision bucket (`PatchBuckets().maximum` by default).
  """
  name, config = _resolve(model)
  mesh = _mesh(mesh)
  param_dtype = param_dtype or dtype
  for label, value in (("dtype", dtype), ("param_dtype", param_dtype)):
    check_dtype(value, label)
  for label, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                       ("max_prefill_chunk", max_prefill_chunk), ("vision_patches", vision_patches)):
    if int(value) < 1:
      raise ConfigError(f"{label} is {value}; it must be at least 1.")
  cb = np.dtype(DTYPES[dtype]).itemsize
  text = getattr(config, "text", config)  # QwenVLConfig holds its decoder in .text
  vision = getattr(config, "vision", None)
  chunk = min(max_prefill_chunk, max_seq_len)  # as the engine caps its buckets
  s = max_seq_len + chunk
  sharder = _Sharder(mesh, rules)
  gathered = _Sharder({**mesh, "fsdp": 1}, rules)  # a layer's weights as fsdp all-gathers them for use

  decls = _declarations(config, param_dtype)
  weights = sum(sharder.nbytes(axes, shape, item) for _, axes, shape, item in decls)

  def layer_weights(prefix: tuple) -> int:
    """One layer's weights of the stack under `prefix`, gathered over fsdp (0: unrolled layers and no fsdp)."""
    if not scan_layers and mesh["fsdp"] == 1:
      return 0
    return sum(gathered.nbytes(axes, shape, item) // shape[0] for path, axes, shape, item in decls
               if path[:len(prefix)] == prefix and axes[:1] == (LAYERS,))

  b = max_batch_size
  t_shape = (text.num_layers, b, text.num_kv_heads, s, text.head_dim)
  kv_cache = 2 * sharder.nbytes(KVCache.AXES, t_shape, cb) + 2 * sharder.nbytes((BATCH,), (b,), 4)
  v = text.vocab_size
  sampling = sharder.nbytes((BATCH, VOCAB), (b, v), 1) + sharder.nbytes((BATCH, VOCAB), (b, v), 4)

  def decoder_step(rows: int, tokens: int) -> int:
    """Peak temporaries of one decoder step: `rows` sequences of `tokens` tokens attending to S positions."""
    d, n, k, h, f = text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim, text.intermediate_size
    kv_read = 2 * sharder.nbytes((BATCH, KV_HEADS, LENGTH, None), (rows, k, s, h), cb)
    score_shape = (rows, n, tokens, s)
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
  return MemoryPlan(model=name, dtype=dtype, param_dtype=param_dtype, mesh=mesh, max_batch_size=b,
                    max_seq_len=max_seq_len, max_prefill_chunk=chunk, weights=weights, kv_cache=kv_cache,
                    sampling=sampling, decode_activations=decode, prefill_activations=prefill,
                    vision_activations=vision_peak, reserve=int(reserve_bytes))


def mesh_text(mesh: Mapping[str, int]) -> str:
  """{'data': 2, 'fsdp': 1, 'tensor': 4} -> 'data:2,tensor:4' (axes of size 1 left out; '1' for one device)."""
  return ",".join(f"{a}:{mesh[a]}" for a in MESH_AXES if mesh.get(a, 1) > 1) or "1"


def format_table(plans: Sequence[MemoryPlan], memory_gib: float | None = None, margin: float = 0.0) -> str:
  """A Markdown table of plans in GiB per device; with `memory_gib`, a column saying whether each fits."""
  gib = lambda n: f"{n / GiB:.2f}"
  head = ["model", "mesh", "batch", "context", "weights", "KV cache", "sampling", "activations", "reserve",
          "total"]
  if memory_gib is not None:
    head.append(f"fits {memory_gib:g} GiB - {margin:.0%}")
  rows = []
  for p in plans:
    row = [p.model, mesh_text(p.mesh), str(p.max_batch_size), str(p.max_seq_len), gib(p.weights),
           gib(p.kv_cache), gib(p.sampling), gib(p.activations), gib(p.reserve), gib(p.total)]
    if memory_gib is not None:
      row.append("yes" if p.fits(memory_gib * GiB, margin) else "NO")
    rows.append(row)
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


# --- Topology files -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServingEntry:
  """How one model is served on a topology: its mesh and the engine's sizes."""

  mesh: Mapping[str, int]
  max_batch_size: int
  max_seq_len: int
  max_prefill_chunk: int = 512


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


_TOPOLOGY_FIELDS = frozenset({"name", "accelerator", "chips", "hosts", "chips_per_host", "memory_per_chip_gib",
                               "margin", "dtype", "notes", "models"})


def topology_names() -> list[str]:
  """Names of the topology files shipped in tpu_configs/."""
  return sorted(p.stem for p in TOPOLOGY_DIR.glob("*.json"))


def load_topology(name_or_path: str | pathlib.Path) -> Topology:
  """A topology by bare name ("v5e-8": tpu_configs/v5e-8.json) or by path to a JSON file.

  A missing file, bad JSON or a field of the wrong kind is one ConfigError naming the file and the field."""
  path = pathlib.Path(name_or_path)
  if path.suffix != ".json" and path.parent == pathlib.Path("."):
    path = TOPOLOGY_DIR / f"{name_or_path}.json"
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
  unknown = sorted(set(raw) - _TOPOLOGY_FIELDS)
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
    unknown = sorted(set(entry) - {"mesh", "max_batch_size", "max_seq_len", "max_prefill_chunk"})
    if unknown:
      raise fail(prefix + unknown[0], "only mesh, max_batch_size, max_seq_len, max_prefill_chunk", unknown[0])
    models[model] = ServingEntry(
        mesh=mesh, max_batch_size=get(entry, "max_batch_size", prefix, "a positive integer"),
        max_seq_len=get(entry, "max_seq_len", prefix, "a positive integer"),
        max_prefill_chunk=get(entry, "max_prefill_chunk", prefix, "a positive integer", 512))
  return Topology(
      name=get(raw, "name", "", "a string"), accelerator=get(raw, "accelerator", "", "a string"), chips=chips,
      hosts=hosts, chips_per_host=per_host, memory_per_chip_gib=get(raw, "memory_per_chip_gib", "",
                                                                     "a positive number"),
      margin=get(raw, "margin", "", "a number in [0, 1)"), dtype=dtype, models=models,
      notes=get(raw, "notes", "", "a string", ""), source=str(path))


def plan_topology(topology: Topology, **kwargs) -> list[MemoryPlan]:
  """One plan per model the topology serves, in its dtype (kwargs go to `plan_memory`)."""
  return [plan_memory(model, mesh=e.mesh, dtype=topology.dtype, max_batch_size=e.max_batch_size,
                      max_seq_len=e.max_seq_len, max_prefill_chunk=e.max_prefill_chunk, **kwargs)
          for model, e in topology.models.items()]


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
# groups splitting the batch; each at a batch of 32 sequences of 8192 tokens, in bfloat16.
README_MESHES = ("1", "tensor:8", "data:4,tensor:8")
README_SHAPE = dict(max_batch_size=32, max_seq_len=8192, max_prefill_chunk=512)


def readme_tables() -> str:
  """The tables of tpu_configs/README.md: every Qwen2.5 size on README_MESHES, then every topology file."""
  out = [f"Per device, bfloat16, batch {README_SHAPE['max_batch_size']}, context {README_SHAPE['max_seq_len']}, "
         f"prefill chunk {README_SHAPE['max_prefill_chunk']}, GiB:", ""]
  plans = [plan_memory(m, mesh="" if mesh == "1" else mesh, dtype="bfloat16", **README_SHAPE)
           for m in all_presets() for mesh in README_MESHES]
  out.append(format_table(plans))
  summary = ["", "| topology | chips | GiB per chip | margin | models (mesh, batch, context, planned GiB per chip) |",
             "| --- | --- | --- | --- | --- |"]
  for name in topology_names():
    topo = load_topology(name)
    cells = [f"{p.model} ({mesh_text(p.mesh)}, {p.max_batch_size}, {p.max_seq_len}, {p.total / GiB:.1f})"
             for p in plan_topology(topo)]
    summary.append(f"| {name} | {topo.chips} | {topo.memory_per_chip_gib:g} | {topo.margin:g} | "
                   f"{'; '.join(cells)} |")
  return "\n".join(out + summary)


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
      max_seq_len=flags.DEFINE_integer("max_seq_len", 4096, "With --model: context per slot.", lower_bound=1),
      max_prefill_chunk=flags.DEFINE_integer("max_prefill_chunk", 512, "With --model: largest prefill bucket.",
                                             lower_bound=1),
      memory_gib=flags.DEFINE_float("memory_gib", None, "With --model: memory per device, to say whether it fits."),
      margin=flags.DEFINE_float("margin", 0.1, "With --model and --memory_gib: fraction of memory kept free."),
      readme=flags.DEFINE_bool("readme", False, "Print the tables of tpu_configs/README.md."),
  )


def main(argv, f: dict[str, flags.FlagHolder]):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if f["readme"].value:
      print(readme_tables())
    elif f["topology"].value:
      topo = load_topology(f["topology"].value)
      print(f"{topo.name}: {topo.chips} x {topo.accelerator}, {topo.memory_per_chip_gib:g} GiB each, "
            f"{topo.dtype}")
      print(format_table(plan_topology(topo), topo.memory_per_chip_gib, topo.margin))
    elif f["model"].value:
      memory = f["memory_gib"].value
      plan = plan_memory(f["model"].value, mesh=f["mesh"].value, dtype=f["dtype"].value,
                         max_batch_size=f["max_batch_size"].value, max_seq_len=f["max_seq_len"].value,
                         max_prefill_chunk=f["max_prefill_chunk"].value)
      print(format_table([plan], memory, f["margin"].value if memory else 0.0))
    else:
      raise app.UsageError("give --topology, --model or --readme.")
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(functools.partial(main, f=_flags))
