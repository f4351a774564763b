r"""Topology files: a TPU slice or GPU host (one tpu_configs/*.json file) and, per model it serves, the mesh and the
engine's sizes; the memory plans of those models (`qwenjax.engine.planner`), and the tables of tpu_configs/README.md.

    topology = load_topology("v5e-8")               # tpu_configs/v5e-8.json; or a path to a JSON file
    plans = plan_topology(topology)                  # one plan per model the topology lists
    name, entry = serving_entry(topology, config)   # the entry for a QwenConfig's or QwenVLConfig's architecture

Of each entry, page_size (`PAGE_SIZES` of the accelerator's backend) and kv_cache_memory_gib are derived by the
planner (`derive_topologies`; `python -m launch.plan --derive_topologies`), never written by hand, and a test holds
every file to what the planner derives:

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
import importlib.resources
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from qwenjax._errors import ConfigError
from qwenjax.config import QwenConfig, check_dtype, read_json
from qwenjax.engine.planner import (
  DEFAULT_PAGE_SIZE,
  TYPICAL_LENGTHS,
  GiB,
  MemoryPlan,
  all_presets,
  format_table,
  markdown_table,
  mesh_text,
  plan_memory,
  tokens_text,
)
from qwenjax.model.kv_cache import PAGE_SIZES
from qwenjax.model.qwen2_vl import QwenVLConfig
from qwenjax.parallel.sharding import MESH_AXES

# The shipped topology files: the top-level tpu_configs/ of a checkout, installed with the wheel as a package.
TOPOLOGY_DIR = pathlib.Path(importlib.resources.files("tpu_configs"))
_MISSING = object()


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
  """What decides a model's memory: decoder sizes (a MoE's experts; for VL, the tower's). Tying and eos ids do
  not."""
  text = getattr(config, "text", config)
  key = (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_layers, text.num_heads,
         text.num_kv_heads, text.head_dim)
  if text.num_experts:  # a MoE's experts (dense models keep their keys)
    key += (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size, text.sparse_layers())
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
    raise ConfigError(f"{topology.source or topology.name}: the model matches no preset, so no entry of "
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
           "pages", "seqs at context"] + [f"seqs at {tokens_text(n)}" for n in reversed(TYPICAL_LENGTHS)]
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
          "the same GiB of int8 pages):", "", markdown_table(head, rows)]
  return "\n".join(out)
