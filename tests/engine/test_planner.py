"""qwenjax.engine.planner and qwenjax.engine.topologies: the shipped topology files (and that they are what the
planner derives), the planner against independent counts, and against what XLA and real allocations measure.

XLA's activation figures come from the contiguous-cache programs: their attention reads [B, K, S, H] keys and
values, as the paged attention's gather of S = max_seq_len positions (rounded up to whole pages) does.

Run as a script, this file is the 8-device worker of `test_sharded_plans_match_xla` (XLA_FLAGS set by the test):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/engine/test_planner.py qwen2.5-0.5b:data:8
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.config import PRESETS
from qwenjax.engine import planner, programs, topologies
from qwenjax.engine import sampling as sampling_lib
from qwenjax.model.decoder import Qwen2
from qwenjax.model.kv_cache import PAGE_SIZES, KVCache, PagedKVCache
from qwenjax.model.qwen2_vl import VL_PRESETS
from qwenjax.model.vision import VisionTower, encode
from qwenjax.model.vision_plan import plan as vision_plan
from qwenjax.parallel import sharding
from qwenjax.parallel.axes import BATCH, VOCAB

GiB = 1 << 30
ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = ("v4-8", "v4-32", "v5e-8", "v5e-256", "v5p-8", "v5p-128", "v6e-8", "v6e-256",
           "h100-1", "h100-8", "h200-1", "h200-8")
# The engine's costliest decode variant: penalties and every filter.
FULL_SAMPLING = sampling_lib.SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=True)
XLA_FACTOR = 2.0  # the planner's activations lie within [1/2, 2] x XLA's temp bytes
CPU_PAGE = PAGE_SIZES["cpu"]  # the measured programs' page size: their S below are multiples of it


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


# --- (a) topology files ---------------------------------------------------------------------------------------


def test_every_topology_ships():
  assert set(SHIPPED) <= set(topologies.topology_names())


@pytest.mark.parametrize("name", topologies.topology_names())
def test_topology_file_parses_and_every_entry_fits(name):
  raw = json.loads((topologies.TOPOLOGY_DIR / f"{name}.json").read_text())
  topology = topologies.load_topology(name)
  assert topology.name == name and topology.chips == raw["chips"]
  assert topology.hosts * topology.chips_per_host == topology.chips
  assert raw["models"] and set(raw["models"]) <= set(PRESETS) | set(VL_PRESETS)
  for model, entry in raw["models"].items():
    assert set(entry["mesh"]) <= set(sharding.MESH_AXES)
    assert math.prod(entry["mesh"].values()) == topology.chips, model
    assert entry["page_size"] == PAGE_SIZES["tpu" if raw["accelerator"].startswith("TPU") else "gpu"], model
    plan = planner.plan_memory(model, mesh=entry["mesh"], dtype=raw["dtype"], max_batch_size=entry["max_batch_size"],
                               max_seq_len=entry["max_seq_len"], max_prefill_chunk=entry["max_prefill_chunk"],
                               page_size=entry["page_size"], kv_cache_memory=entry["kv_cache_memory_gib"])
    limit = raw["memory_per_chip_gib"] * GiB * (1 - raw["margin"])
    assert plan.total <= limit, planner.format_table([plan], raw["memory_per_chip_gib"], raw["margin"])
    assert plan.sequences() >= 1, model
    assert plan.kv_cache <= entry["kv_cache_memory_gib"] * GiB, model


@pytest.mark.parametrize("name", topologies.topology_names())
def test_topology_file_is_what_the_planner_derives(name):
  text = (topologies.TOPOLOGY_DIR / f"{name}.json").read_text()
  derived = topologies.topology_json(topologies.derive_topology(topologies.load_topology(name)))
  assert text == derived, "regenerate with: python -m launch.plan --derive_topologies"


def test_derive_topologies_fills_in_the_derived_fields(tmp_path):
  """A file without page_size and kv_cache_memory_gib (or with stale ones) is rewritten to the shipped one."""
  shipped = topologies.TOPOLOGY_DIR / "v5e-8.json"
  raw = json.loads(shipped.read_text())
  for i, entry in enumerate(raw["models"].values()):
    if i % 2:
      del entry["page_size"], entry["kv_cache_memory_gib"]
    else:
      entry["kv_cache_memory_gib"] = 1.0
  stale = _write(tmp_path, raw, "v5e-8.json")
  assert topologies.derive_topologies([stale]) == [stale]
  assert stale.read_text() == shipped.read_text()
  assert topologies.derive_topologies([stale]) == []  # current: left alone
  untouched = tmp_path / "copy.json"
  shutil.copy(shipped, untouched)
  assert topologies.derive_topologies([untouched]) == []


def _power_of_two_meshes(chips: int):
  sizes = [2 ** i for i in range(chips.bit_length()) if chips % 2 ** i == 0]
  for data, fsdp in itertools.product(sizes, sizes):
    if chips % (data * fsdp) == 0:
      yield {"data": data, "fsdp": fsdp, "tensor": chips // (data * fsdp)}


@pytest.mark.parametrize("name", topologies.topology_names())
def test_absent_models_fit_nowhere_on_the_topology(name):
  """A model missing from a file leaves no room on that topology, on any mesh, for the pages of even one slot of
  512 tokens."""
  topology = topologies.load_topology(name)
  absent = sorted(set(planner.all_presets()) - set(topology.models))
  for model, mesh in itertools.product(absent, _power_of_two_meshes(topology.chips)):
    with pytest.raises(ConfigError, match=f"{model} on mesh {planner.mesh_text(mesh)}: "):
      planner.plan_memory(model, mesh=mesh, dtype=topology.dtype, max_batch_size=1, max_seq_len=512,
                          page_size=PAGE_SIZES[topology.backend], memory_gib=topology.memory_per_chip_gib,
                          margin=topology.margin)


def test_the_large_models_are_absent_where_they_cannot_fit():
  assert "qwen2.5-72b" not in topologies.load_topology("v5e-8").models
  assert "qwen2.5-72b" not in topologies.load_topology("v4-8").models
  assert "qwen2.5-32b" not in topologies.load_topology("h100-1").models
  assert "qwen2.5-72b" in topologies.load_topology("v5e-256").models


def test_readme_tables_are_current():
  readme = (ROOT / "tpu_configs" / "README.md").read_text()
  marker = "<!-- python -m launch.plan --readme: {} -->"
  begin, end = marker.format("begin") + "\n", "\n" + marker.format("end")
  generated = readme[readme.index(begin) + len(begin):readme.index(end)]
  assert generated == topologies.readme_tables(), "regenerate with: python -m launch.plan --readme"


def _write(tmp_path, doc, name="t.json") -> pathlib.Path:
  path = tmp_path / name
  path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
  return path


GOOD = {"name": "t", "accelerator": "TPU v5e", "chips": 8, "hosts": 1, "chips_per_host": 8,
        "memory_per_chip_gib": 16, "margin": 0.1, "dtype": "bfloat16",
        "models": {"qwen2.5-7b": {"mesh": {"data": 2, "tensor": 4}, "max_batch_size": 8, "max_seq_len": 4096}}}


def test_load_topology_by_path_and_defaults(tmp_path):
  topology = topologies.load_topology(_write(tmp_path, GOOD))
  entry = topology.models["qwen2.5-7b"]
  assert entry.mesh == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4} and entry.max_prefill_chunk == 512
  assert entry.page_size is None and entry.kv_cache_memory_gib is None
  assert topology.usable_bytes == pytest.approx(16 * GiB * 0.9)
  # Without the derived fields, a plan derives them: TPU pages, and the pool the rest of 16 GiB - 10% holds.
  (plan,) = topologies.plan_topology(topology)
  assert plan.page_size == PAGE_SIZES["tpu"] and plan.fits(16 * GiB, 0.1)
  assert plan.kv_cache_memory == topologies.derive_topology(topology).models["qwen2.5-7b"].kv_cache_memory_gib


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("chips"), "'chips'"),
    (lambda d: d.update(chips="8"), "'chips'"),
    (lambda d: d.update(hosts=2), "'chips'"),
    (lambda d: d.update(margin=1.5), "'margin'"),
    (lambda d: d.update(dtype="int4"), "'dtype'"),
    (lambda d: d.update(colour="blue"), "'colour'"),
    (lambda d: d["models"].update({"qwen9": d["models"]["qwen2.5-7b"]}), "'models.qwen9'"),
    (lambda d: d["models"]["qwen2.5-7b"]["mesh"].update(data=4), "'models.qwen2.5-7b.mesh'"),
    (lambda d: d["models"]["qwen2.5-7b"]["mesh"].update(pipeline=1), "'models.qwen2.5-7b.mesh.pipeline'"),
    (lambda d: d["models"]["qwen2.5-7b"].update(max_batch_size=0), "'models.qwen2.5-7b.max_batch_size'"),
    (lambda d: d["models"]["qwen2.5-7b"].pop("max_seq_len"), "'models.qwen2.5-7b.max_seq_len'"),
    (lambda d: d["models"]["qwen2.5-7b"].update(page_size=0), "'models.qwen2.5-7b.page_size'"),
    (lambda d: d["models"]["qwen2.5-7b"].update(kv_cache_memory_gib="8"), "'models.qwen2.5-7b.kv_cache_memory_gib'"),
    (lambda d: d["models"]["qwen2.5-7b"].update(num_pages=8), "'models.qwen2.5-7b.num_pages'"),
])
def test_bad_topology_is_one_config_error_naming_file_and_field(tmp_path, change, field):
  doc = json.loads(json.dumps(GOOD))
  change(doc)
  path = _write(tmp_path, doc)
  with pytest.raises(ConfigError) as e:
    topologies.load_topology(path)
  assert str(path) in str(e.value) and field in str(e.value)


def test_unreadable_topology_files(tmp_path):
  with pytest.raises(ConfigError, match=r"not valid JSON"):
    topologies.load_topology(_write(tmp_path, "{chips: 8"))
  with pytest.raises(ConfigError, match=r"no-such-slice\.json: no such topology file \(shipped: .*v5e-8"):
    topologies.load_topology("no-such-slice")


# --- (b) the planner against independent counts ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(planner.all_presets()))
@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_unsharded_weights_equal_parameter_count(name, dtype, itemsize):
  plan = planner.plan_memory(name, dtype=dtype)
  assert plan.weights == planner.all_presets()[name].num_params() * itemsize


@pytest.mark.parametrize("name", sorted(planner.all_presets()))
def test_weights_fall_as_the_tensor_axis_grows(name):
  sizes = (1, 2, 4) if name == "qwen2.5-vl-7b" else (1, 2, 4, 8)  # see the next test
  weights = [planner.plan_memory(name, mesh={"tensor": t}).weights for t in sizes]
  assert weights == sorted(weights, reverse=True) and len(set(weights)) == len(sizes)


def test_vl_7b_holds_more_on_tensor_8_than_on_tensor_4():
  """Its 28 query heads and its tower's MLP of 3420 divide by 4 but not by 8: on tensor:8 those weights are whole."""
  four, eight = (planner.plan_memory("qwen2.5-vl-7b", mesh={"tensor": t}).weights for t in (4, 8))
  assert eight > four


def test_weights_on_tensor_4_count_undivided_heads_whole():
  """0.5B on tensor:4: 14 query and 2 KV heads do not divide by 4, so attention weights stay whole on every
  device; the MLP and the (tied) vocabulary split 4 ways; norms are whole."""
  cfg = PRESETS["qwen2.5-0.5b"]
  d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  attention = d * q + q + 2 * (d * kv + kv) + q * d
  by_hand = layers * (attention + 3 * d * f // 4 + 2 * d) + v * d // 4 + d
  assert planner.plan_memory(cfg, mesh="tensor:4", dtype="float32").weights == by_hand * 4


def test_page_bytes_by_hand():
  """One page over all layers, k and v: 2 * L * PS * K * H * itemsize; int8: H + 4 bytes per token and KV head."""
  small, seven = PRESETS["qwen2.5-0.5b"], PRESETS["qwen2.5-7b"]
  assert (small.num_layers, small.num_kv_heads, small.head_dim) == (24, 2, 64)
  assert (seven.num_layers, seven.num_kv_heads, seven.head_dim) == (28, 4, 128)
  one_device = lambda name, ps, quant: planner.plan_memory(name, page_size=ps, max_batch_size=1, max_seq_len=ps,
                                                           kv_cache_dtype=quant, dtype="bfloat16").kv_cache
  assert one_device("qwen2.5-0.5b", 128, None) == 2 * 24 * 128 * 2 * 64 * 2 == 1_572_864
  assert one_device("qwen2.5-0.5b", 128, "int8") == 2 * 24 * 128 * 2 * (64 + 4) == 835_584
  assert one_device("qwen2.5-7b", 16, None) == 2 * 28 * 16 * 4 * 128 * 2 == 917_504
  assert one_device("qwen2.5-7b", 16, "int8") == 2 * 28 * 16 * 4 * (128 + 4) == 473_088


@pytest.mark.parametrize("name, mesh, page_split, head_split", [
    ("qwen2.5-0.5b", "", 1, 1),
    ("qwen2.5-0.5b", "data:8", 8, 1),
    ("qwen2.5-0.5b", "data:2,tensor:2", 2, 2),  # 2 KV heads over 2
    ("qwen2.5-0.5b", "tensor:8", 1, 1),  # 2 KV heads do not divide by 8: every device holds all heads of the pages
    ("qwen2.5-7b", "", 1, 1),
    ("qwen2.5-7b", "data:2,tensor:4", 2, 4),  # pages over 2, 4 KV heads over 4
    ("qwen2.5-7b", "fsdp:2,tensor:4", 2, 4),  # fsdp splits pages too
    ("qwen2.5-7b", "tensor:8", 1, 1),
])
@pytest.mark.parametrize("dtype, quant", [("bfloat16", None), ("float32", None), ("bfloat16", "int8")])
@pytest.mark.parametrize("page_size", [16, 128])
def test_pool_equals_the_hand_count(name, mesh, page_split, head_split, dtype, quant, page_size):
  """A budget of 3.3 GiB per device: each page shard holds floor(budget / (page bytes / head splits)) pages."""
  cfg, budget = PRESETS[name], 3.3
  per_token_head = cfg.head_dim + 4 if quant else cfg.head_dim * {"bfloat16": 2, "float32": 4}[dtype]
  page = 2 * cfg.num_layers * page_size * cfg.num_kv_heads * per_token_head
  per_shard = int(budget * GiB // (page / head_split))
  plan = planner.plan_memory(name, mesh=mesh, dtype=dtype, max_batch_size=8, max_seq_len=4000, page_size=page_size,
                             kv_cache_dtype=quant, kv_cache_memory=budget)
  assert plan.page_splits == page_split
  assert plan.num_pages == per_shard * page_split
  assert plan.kv_cache == per_shard * page // head_split <= budget * GiB
  assert plan.sequences(4000) == page_split * (per_shard // math.ceil(4000 / page_size))


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b"])
@pytest.mark.parametrize("dtype, ratio", [("bfloat16", 2), ("float32", 4)])
def test_int8_pool_holds_about_2x_bfloat16_and_4x_float32_pages(name, dtype, ratio):
  """Of one budget: H * itemsize against H + 4 bytes per token and KV head (1.88x / 3.76x at H = 64, 1.94x /
  3.88x at H = 128)."""
  h = PRESETS[name].head_dim
  pools = {quant: planner.plan_memory(name, dtype=dtype, max_seq_len=8192, page_size=16, kv_cache_dtype=quant,
                                      kv_cache_memory=6) for quant in (None, "int8")}
  got = pools["int8"].num_pages / pools[None].num_pages
  assert got == pytest.approx(ratio * h / (h + 4), rel=2e-3)  # up to a page of rounding in 1752 or more
  assert 0.9 * ratio < got < ratio
  assert pools["int8"].sequences() >= 1.85 / 2 * ratio * pools[None].sequences()


@pytest.mark.parametrize("quant", [None, "int8"])
def test_derived_pool_is_what_the_memory_leaves(quant):
  """Given a chip's memory, kv_cache_memory is the rest after weights, slot state, activations and the reserve,
  floored to 0.01 GiB; the plan then fits, within a hundredth of a GiB and one page of the limit."""
  limit = 16 * GiB * 0.9
  plan = planner.plan_memory("qwen2.5-7b", mesh="data:2,tensor:4", max_batch_size=32, max_seq_len=32768,
                             kv_cache_dtype=quant, memory_gib=16, margin=0.1)
  fixed = plan.weights + plan.sampling + plan.activations + plan.reserve
  assert plan.kv_cache_memory == math.floor((limit - fixed) / GiB * 100) / 100
  assert plan.fits(16 * GiB, 0.1)
  page_per_device = PRESETS["qwen2.5-7b"].num_layers * 2 * 128 * (132 if quant else 256)  # 4 KV heads over 4
  assert limit - plan.total < 0.01 * GiB + page_per_device
  assert plan.sequences(2048) == 2 * (plan.num_pages // 2 // 16)  # a page shard per data replica


def test_default_pool_holds_every_slot_at_max_seq_len():
  """Each of the 4 page shards holds 2 of the 6 slots' sequences (rounded up) of 8 pages."""
  plan = planner.plan_memory("qwen2.5-7b", mesh="data:4", max_batch_size=6, max_seq_len=1000, page_size=128)
  assert plan.num_pages == 4 * 2 * 8
  assert plan.sequences() == 8 and plan.kv_cache == 16 * 2 * 28 * 128 * 4 * 128 * 2


def test_no_headroom_and_whole_pages():
  """The pool keeps no prefill chunk of headroom: decode reads whole pages of max_seq_len, whatever the chunk."""
  plan = lambda **kw: planner.plan_memory("qwen2.5-0.5b", max_batch_size=16, page_size=128, **kw)
  assert plan(max_seq_len=4096, max_prefill_chunk=256).decode_activations == plan(
      max_seq_len=4096, max_prefill_chunk=1024).decode_activations
  assert plan(max_seq_len=4000).decode_activations == plan(max_seq_len=4096).decode_activations  # 32 pages
  assert plan(max_seq_len=4097).decode_activations > plan(max_seq_len=4096).decode_activations


def test_a_pool_without_room_for_one_sequence_names_model_and_mesh():
  with pytest.raises(ConfigError, match=r"qwen2\.5-72b on mesh tensor:8: 16 GiB per device less the 10% margin.*"
                     r"leaves 0\.00 GiB of KV pages"):
    planner.plan_memory("qwen2.5-72b", mesh="tensor:8", memory_gib=16, margin=0.1)
  with pytest.raises(ConfigError, match=r"qwen2\.5-7b on mesh data:2: kv_cache_memory=0\.1 GiB.*"
                     r"max_seq_len=32768 needs 256 pages"):
    planner.plan_memory("qwen2.5-7b", mesh="data:2", max_seq_len=32768, page_size=128, kv_cache_memory=0.1)


def test_plan_rejects_unknown_things():
  with pytest.raises(ConfigError, match="qwen3"):
    planner.plan_memory("qwen3")
  with pytest.raises(ConfigError, match="int4"):
    planner.plan_memory("qwen2.5-7b", dtype="int4")
  with pytest.raises(ConfigError, match="pipeline"):
    planner.plan_memory("qwen2.5-7b", mesh={"pipeline": 2})
  with pytest.raises(ConfigError, match="kv_cache_dtype is 'fp8'"):
    planner.plan_memory("qwen2.5-7b", kv_cache_dtype="fp8")
  with pytest.raises(ConfigError, match="page_size is 0"):
    planner.plan_memory("qwen2.5-7b", page_size=0)


# --- (c) the planner against measurements ---------------------------------------------------------------------


def _decode_and_sample(graphdef, params, cache, tokens, prompt_mask, counts, arrays):
  """One step of the engine's decode loop: a token for every row, then its costliest sampling variant."""
  logits, cache = programs.decode_step_impl(graphdef, params, cache, tokens)
  new, logprob = sampling_lib.sample(logits, arrays, jnp.zeros_like(tokens), prompt_mask, counts, FULL_SAMPLING)
  return new, logprob, cache


_decode_and_sample_jit = jax.jit(_decode_and_sample, static_argnames=("graphdef",), donate_argnames=("cache",))
_extend_jit = jax.jit(programs.extend_impl, static_argnames=("graphdef",), donate_argnames=("cache",))


def _sampling_arrays(b: int) -> sampling_lib.SamplingArrays:
  dtypes = dict(top_k=jnp.int32, seed=jnp.uint32, sample_index=jnp.int32)
  return sampling_lib.SamplingArrays(**{f: _sds((b,), dtypes.get(f, jnp.float32))
                                        for f in sampling_lib.SamplingArrays.__dataclass_fields__})


def _compile_as_users(lowered):
  """conftest.compile_as_users, imported here: this file is also the 8-device worker script, which runs with
  XLA's default flags and no conftest."""
  from conftest import compile_as_users  # pylint: disable=g-import-not-at-top

  return compile_as_users(lowered)


def _decode_temp(graphdef, params, cache, vocab: int) -> int:
  b = cache.lengths.shape[0]
  compiled = _compile_as_users(_decode_and_sample_jit.lower(graphdef, params, cache, _sds((b,), jnp.int32),
                                                           _sds((b, vocab), bool), _sds((b, vocab), jnp.int32),
                                                           _sampling_arrays(b)))
  return compiled.memory_analysis().temp_size_in_bytes


def _prefill_temp(graphdef, params, cache, chunk: int) -> int:
  """One prompt chunk appended to one cache row, as the engine prefills."""
  one = _sds((1,), jnp.int32)
  compiled = _compile_as_users(_extend_jit.lower(graphdef, params, cache, _sds((1, chunk), jnp.int32), one, one))
  return compiled.memory_analysis().temp_size_in_bytes


def _within_factor(planned: int, measured: int) -> bool:
  return measured / XLA_FACTOR <= planned <= measured * XLA_FACTOR


@pytest.mark.real_model
def test_weights_and_cache_equal_the_loaded_model_and_allocation(real_gguf_path):
  """The embedded Qwen2.5-0.5B (Coder) loaded in float32: weights to the byte; a PagedKVCache.zeros (float and
  int8) and the engine's slot state to the byte; the decode step's temporaries within 2x of XLA's figure."""
  import qwenjax  # pylint: disable=g-import-not-at-top

  model = qwenjax.load(str(real_gguf_path), dtype="float32", scan_layers=True).model
  cfg = model.cfg
  b, s, chunk = 8, 2048, 512  # S: positions attention reads (the contiguous cache's length, a sequence's pages)
  plan = planner.plan_memory(cfg, dtype="float32", max_batch_size=b, max_seq_len=s, max_prefill_chunk=chunk,
                             page_size=CPU_PAGE)
  params = nnx.state(model, nnx.Param)
  assert plan.weights == sum(x.nbytes for x in jax.tree.leaves(params))
  assert plan.weights == cfg.num_params() * 4  # this GGUF stores an untied output head: 630,167,424 parameters

  for quant in (None, "int8"):
    pool_plan = planner.plan_memory(cfg, dtype="float32", max_batch_size=b, max_seq_len=s, page_size=CPU_PAGE,
                                    kv_cache_dtype=quant, kv_cache_memory=0.25)
    pool = PagedKVCache.zeros(cfg, pool_plan.num_pages, CPU_PAGE, jnp.float32, quantized=quant == "int8")
    assert pool_plan.kv_cache == sum(x.nbytes for x in jax.tree.leaves(pool)), quant
  slot_state = [jnp.zeros((b, cfg.vocab_size), bool), jnp.zeros((b, cfg.vocab_size), jnp.int32)]
  assert plan.sampling == sum(x.nbytes for x in slot_state)

  graphdef, state = nnx.split(model)
  cache = KVCache.zeros(cfg, b, s, jnp.float32)  # attention reads [B, K, S, H], as the paged gather does
  measured = _decode_temp(graphdef, state, cache, cfg.vocab_size)
  assert _within_factor(plan.decode_activations, measured), (plan.decode_activations, measured)


@pytest.fixture(scope="module")
def abstract_05b():
  """The 0.5B model as ShapeDtypeStructs, scanned and unrolled: XLA's buffer sizes depend on shapes alone."""
  cfg = PRESETS["qwen2.5-0.5b"]
  return {scan: nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), scan_layers=scan)))
          for scan in (True, False)}


@pytest.mark.parametrize("scan, b, s", [
    (True, 1, 1024),
    (True, 32, 2048),
    (True, 64, 4096),
    pytest.param(False, 8, 2048, marks=pytest.mark.slow),
    pytest.param(False, 128, 1024, marks=pytest.mark.slow),
])
def test_activations_within_2x_of_xla(abstract_05b, scan, b, s):
  """0.5B in float32 on one CPU device: the decode step with sampling, and one 512-token prefill chunk, both
  attending to S positions."""
  cfg, chunk = PRESETS["qwen2.5-0.5b"], 512
  graphdef, params = abstract_05b[scan]
  cache = jax.eval_shape(lambda: KVCache.zeros(cfg, b, s))  # the [B, K, S, H] the paged gather reads
  plan = planner.plan_memory("qwen2.5-0.5b", dtype="float32", max_batch_size=b, max_seq_len=s,
                             max_prefill_chunk=chunk, page_size=CPU_PAGE, scan_layers=scan)
  decode = _decode_temp(graphdef, params, cache, cfg.vocab_size)
  prefill = _prefill_temp(graphdef, params, cache, chunk)
  assert _within_factor(plan.decode_activations, decode), (plan.decode_activations, decode)
  assert _within_factor(plan.prefill_activations, prefill), (plan.prefill_activations, prefill)


@pytest.mark.parametrize("patches", [1024, 4096])
def test_vision_activations_within_2x_of_xla(patches):
  """The Qwen2.5-VL-3B tower (scanned, float32) on one square image filling a bucket."""
  vl = VL_PRESETS["qwen2.5-vl-3b"]
  graphdef, params = nnx.split(nnx.eval_shape(lambda: VisionTower(vl.vision, rngs=nnx.Rngs(0))))
  side = math.isqrt(patches)
  arrays = jax.tree.map(lambda a: _sds(a.shape, a.dtype), vision_plan([(1, side, side)], patches, vl.vision).arrays)
  pixels = _sds((patches, vl.vision.patch_dim), jnp.float32)
  compiled = _compile_as_users(encode.lower(graphdef, params, pixels, arrays))
  measured = compiled.memory_analysis().temp_size_in_bytes
  planned = planner.plan_memory("qwen2.5-vl-3b", dtype="float32", vision_patches=patches).vision_activations
  assert _within_factor(planned, measured), (planned, measured)


# (model, mesh) pairs the 8-device worker compiles: KV and query heads replicated or split, fsdp, untied head.
SHARDED_CASES = ("qwen2.5-0.5b:data:2,tensor:4", "qwen2.5-0.5b:tensor:8", "qwen2.5-0.5b:data:8",
                 "qwen2.5-0.5b:fsdp:2,tensor:4", "qwen2.5-0.5b:fsdp:8", "qwen2.5-7b:data:2,tensor:4",
                 "qwen2.5-7b:tensor:8", "qwen2.5-7b:fsdp:2,tensor:4")
SHARDED_SHAPE = dict(max_batch_size=16, max_seq_len=2048, max_prefill_chunk=512, page_size=CPU_PAGE)


def _argument_bytes(tree, shardings) -> int:
  """Each device's bytes of `tree` laid out by `shardings`, as XLA counts a program's arguments."""
  fn = jax.jit(lambda x: jnp.zeros(()), in_shardings=(shardings,), keep_unused=True)
  return fn.lower(tree).compile().memory_analysis().argument_size_in_bytes


def _sharded_worker(cases) -> dict[str, dict[str, int]]:
  """Per case, from XLA's memory_analysis with every input laid out by the sharding rules: each device's argument
  bytes of the weights and of the planner's page pools (float, int8), and the temp bytes of decode with sampling
  over a contiguous cache of S = max_seq_len."""
  out = {}
  b, s = SHARDED_SHAPE["max_batch_size"], SHARDED_SHAPE["max_seq_len"]
  for case in cases:
    name, mesh_text = case.split(":", 1)
    cfg = PRESETS[name]
    mesh = sharding.make_mesh(sharding.parse_mesh(mesh_text))
    model = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), scan_layers=True))
    graphdef, params = nnx.split(model)
    place = lambda axes, shape: sharding.named_sharding(mesh, axes, shape)
    param_shardings = jax.tree.map(lambda v: v.replace(place(v.axes, v.shape)), params,
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, b, s))
    kv, rows = place(KVCache.AXES, cache.k.shape), place((BATCH,), (b,))
    cache_shardings = KVCache(kv, kv, rows, rows)
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    slot_state = place((BATCH, VOCAB), (b, cfg.vocab_size))
    pools = {}
    for quant in (None, "int8"):
      plan = planner.plan_memory(name, mesh=mesh_text, dtype="float32", kv_cache_dtype=quant, kv_cache_memory=0.25,
                                 **SHARDED_SHAPE)
      pool = jax.eval_shape(lambda: PagedKVCache.zeros(cfg, plan.num_pages, CPU_PAGE, quantized=quant == "int8"))
      pool_shardings = PagedKVCache(*(None if a is None else place(axes, a.shape) for a, axes in zip(
          (pool.k, pool.v, pool.k_scale, pool.v_scale), (PagedKVCache.AXES,) * 2 + (PagedKVCache.SCALE_AXES,) * 2)))
      pools[quant or "float32"] = _argument_bytes(pool, pool_shardings)
    with jax.set_mesh(mesh):
      weights = _argument_bytes(params, param_shardings)
      full = jax.jit(_decode_and_sample, static_argnames=("graphdef",), donate_argnames=("cache",),
                     in_shardings=(param_shardings, cache_shardings, whole, slot_state, slot_state, whole))
      temp = full.lower(graphdef, params, cache, _sds((b,), jnp.int32), _sds((b, cfg.vocab_size), bool),
                        _sds((b, cfg.vocab_size), jnp.int32), _sampling_arrays(b)).compile().memory_analysis()
    out[case] = {"weights": weights, "pools": pools, "temp": temp.temp_size_in_bytes}
  return out


@pytest.mark.slow
def test_sharded_plans_match_xla():
  """On 8 CPU devices (a subprocess: this process has started JAX on one), per device: weights and the page pool
  (float32 and int8) equal XLA's argument bytes exactly, and activations lie within 2x of XLA's temp bytes."""
  # XLA's default flags, not the suite's (conftest.py): the temp bytes users' programs have.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, __file__, *SHARDED_CASES], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  measured = json.loads(run.stdout.strip().splitlines()[-1])
  for case in SHARDED_CASES:
    name, mesh = case.split(":", 1)
    plan = planner.plan_memory(name, mesh=mesh, dtype="float32", **SHARDED_SHAPE)
    assert plan.weights == measured[case]["weights"], case
    for quant in (None, "int8"):
      pool = planner.plan_memory(name, mesh=mesh, dtype="float32", kv_cache_dtype=quant, kv_cache_memory=0.25,
                                 **SHARDED_SHAPE)
      assert pool.kv_cache == measured[case]["pools"][quant or "float32"], (case, quant)
    assert _within_factor(plan.decode_activations, measured[case]["temp"]), (case, plan.decode_activations,
                                                                             measured[case]["temp"])


def test_entry_point_prints_a_topology_plan():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, "-m", "launch.plan", "--topology=v5e-8"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| qwen2.5-7b | data:2,tensor:4 | 32 | 32768 |" in run.stdout
  assert "NO" not in run.stdout
  bad = subprocess.run([sys.executable, "-m", "launch.plan", "--topology=v9z-1"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode != 0 and "v9z-1.json: no such topology file" in bad.stderr


if __name__ == "__main__":
  print(json.dumps(_sharded_worker(sys.argv[1:])))


def test_topology_flag_resolves_mesh_and_sizes_per_host(tmp_path):
  """--topology: the entry of the model's size gives the mesh and sizes; this host takes its share of the data
  axis and of the batch; explicit flags win; a model the topology lacks is a clear error."""
  from absl import flags
  from absl.testing import flagsaver

  from launch import _common

  cfg = PRESETS["qwen2.5-0.5b"]
  model = tmp_path / "qwen05b"  # read_config needs only the config.json
  model.mkdir()
  (model / "config.json").write_text(json.dumps({
      "model_type": "qwen2", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "tie_word_embeddings": True}))
  entry = {"mesh": {"data": 8, "fsdp": 1, "tensor": 1}, "max_batch_size": 64, "max_seq_len": 2048,
           "max_prefill_chunk": 256}
  slice_ = {"name": "slice", "accelerator": "test", "chips": 8, "hosts": 8, "chips_per_host": 1,
            "memory_per_chip_gib": 16, "margin": 0.1, "dtype": "float32", "models": {"qwen2.5-0.5b": entry}}
  topo = tmp_path / "slice.json"
  topo.write_text(json.dumps(slice_))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  assert jax.local_device_count() == 1
  with flagsaver.flagsaver(topology=str(topo), mesh=None):
    got = _common.serving(str(model), max_batch_size=4, max_seq_len=4096)
    assert (got.mesh, got.max_batch_size, got.max_seq_len, got.max_prefill_chunk) == (None, 64 // 8, 2048, 256)
    got = _common.serving(str(model), max_batch_size=4, max_seq_len=4096, explicit_sizes=frozenset({"max_seq_len"}))
    assert (got.max_batch_size, got.max_seq_len) == (8, 4096)
  topo.write_text(json.dumps(dict(slice_, models={"qwen2.5-7b": entry})))
  with flagsaver.flagsaver(topology=str(topo), mesh=None):
    with pytest.raises(ConfigError, match="not qwen2.5-0.5b"):
      _common.serving(str(model), max_batch_size=1, max_seq_len=512)
  topo.write_text(json.dumps(dict(slice_, models={"qwen2.5-0.5b": dict(entry, mesh={"tensor": 8})})))
  with flagsaver.flagsaver(topology=str(topo), mesh=None):
    with pytest.raises(ConfigError, match="divides the 1 processes"):  # tensor:8 needs 8 hosts of 1 device
      _common.serving(str(model), max_batch_size=1, max_seq_len=512)
  with flagsaver.flagsaver(topology=str(topo), mesh="tensor:1"):
    with pytest.raises(ConfigError, match="both name a mesh"):
      _common.serving(str(model), max_batch_size=1, max_seq_len=512)
