"""qwenjax.parallel.planner: the shipped topology files, the planner against independent counts, and against what XLA
and real allocations measure.

Run as a script, this file is the 8-device worker of `test_sharded_plans_match_xla` (XLA_FLAGS set by the test):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_planner.py qwen2.5-0.5b:data:2,tensor:4
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.config import PRESETS
from qwenjax.engine import programs
from qwenjax.engine import sampling as sampling_lib
from qwenjax.model.decoder import Qwen2
from qwenjax.model.kv_cache import KVCache
from qwenjax.model.qwen2_vl import VL_PRESETS
from qwenjax.model.vision import VisionTower, encode
from qwenjax.multimodal.vision_plan import plan as vision_plan
from qwenjax.parallel import planner, sharding
from qwenjax.parallel.axes import BATCH, VOCAB

GiB = 1 << 30
ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = ("v4-8", "v4-32", "v5e-8", "v5e-256", "v5p-8", "v5p-128", "v6e-8", "v6e-256",
           "h100-1", "h100-8", "h200-1", "h200-8")
# The engine's costliest decode variant: penalties and every filter.
FULL_SAMPLING = sampling_lib.SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=True)
XLA_FACTOR = 2.0  # the planner's activations lie within [1/2, 2] x XLA's temp bytes


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


# --- (a) topology files ---------------------------------------------------------------------------------------


def test_every_topology_ships():
  assert set(SHIPPED) <= set(planner.topology_names())


@pytest.mark.parametrize("name", planner.topology_names())
def test_topology_file_parses_and_every_entry_fits(name):
  raw = json.loads((planner.TOPOLOGY_DIR / f"{name}.json").read_text())
  topology = planner.load_topology(name)
  assert topology.name == name and topology.chips == raw["chips"]
  assert topology.hosts * topology.chips_per_host == topology.chips
  assert raw["models"] and set(raw["models"]) <= set(PRESETS) | set(VL_PRESETS)
  for model, entry in raw["models"].items():
    assert set(entry["mesh"]) <= set(sharding.MESH_AXES)
    assert math.prod(entry["mesh"].values()) == topology.chips, model
    plan = planner.plan_memory(model, mesh=entry["mesh"], dtype=raw["dtype"], max_batch_size=entry["max_batch_size"],
                               max_seq_len=entry["max_seq_len"], max_prefill_chunk=entry["max_prefill_chunk"])
    limit = raw["memory_per_chip_gib"] * GiB * (1 - raw["margin"])
    assert plan.total <= limit, planner.format_table([plan], raw["memory_per_chip_gib"], raw["margin"])


def _power_of_two_meshes(chips: int):
  sizes = [2 ** i for i in range(chips.bit_length()) if chips % 2 ** i == 0]
  for data, fsdp in itertools.product(sizes, sizes):
    if chips % (data * fsdp) == 0:
      yield {"data": data, "fsdp": fsdp, "tensor": chips // (data * fsdp)}


@pytest.mark.parametrize("name", planner.topology_names())
def test_absent_models_fit_nowhere_on_the_topology(name):
  """A model missing from a file does not fit that topology on any mesh, even with one slot of 512 tokens."""
  topology = planner.load_topology(name)
  absent = sorted(set(planner.all_presets()) - set(topology.models))
  for model, mesh in itertools.product(absent, _power_of_two_meshes(topology.chips)):
    plan = planner.plan_memory(model, mesh=mesh, dtype=topology.dtype, max_batch_size=1, max_seq_len=512)
    assert plan.total > topology.usable_bytes, (model, mesh)


def test_the_large_models_are_absent_where_they_cannot_fit():
  assert "qwen2.5-72b" not in planner.load_topology("v5e-8").models
  assert "qwen2.5-72b" not in planner.load_topology("v4-8").models
  assert "qwen2.5-32b" not in planner.load_topology("h100-1").models
  assert "qwen2.5-72b" in planner.load_topology("v5e-256").models


def test_readme_tables_are_current():
  readme = (ROOT / "tpu_configs" / "README.md").read_text()
  marker = "<!-- python -m qwenjax.parallel.planner --readme: {} -->"
  begin, end = marker.format("begin") + "\n", "\n" + marker.format("end")
  generated = readme[readme.index(begin) + len(begin):readme.index(end)]
  assert generated == planner.readme_tables(), "regenerate with: python -m qwenjax.parallel.planner --readme"


def _write(tmp_path, doc, name="t.json") -> pathlib.Path:
  path = tmp_path / name
  path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
  return path


GOOD = {"name": "t", "accelerator": "TPU v5e", "chips": 8, "hosts": 1, "chips_per_host": 8,
        "memory_per_chip_gib": 16, "margin": 0.1, "dtype": "bfloat16",
        "models": {"qwen2.5-7b": {"mesh": {"data": 2, "tensor": 4}, "max_batch_size": 8, "max_seq_len": 4096}}}


def test_load_topology_by_path_and_defaults(tmp_path):
  topology = planner.load_topology(_write(tmp_path, GOOD))
  entry = topology.models["qwen2.5-7b"]
  assert entry.mesh == {"data": 2, "fsdp": 1, "tensor": 4} and entry.max_prefill_chunk == 512
  assert topology.usable_bytes == pytest.approx(16 * GiB * 0.9)


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
])
def test_bad_topology_is_one_config_error_naming_file_and_field(tmp_path, change, field):
  doc = json.loads(json.dumps(GOOD))
  change(doc)
  path = _write(tmp_path, doc)
  with pytest.raises(ConfigError) as e:
    planner.load_topology(path)
  assert str(path) in str(e.value) and field in str(e.value)


def test_unreadable_topology_files(tmp_path):
  with pytest.raises(ConfigError, match=r"not valid JSON"):
    planner.load_topology(_write(tmp_path, "{chips: 8"))
  with pytest.raises(ConfigError, match=r"no-such-slice\.json: no such topology file \(shipped: .*v5e-8"):
    planner.load_topology("no-such-slice")


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


@pytest.mark.parametrize("name, mesh, kv_split, row_split", [
    ("qwen2.5-7b", "", 1, 1),
    ("qwen2.5-7b", "data:2,tensor:4", 8, 2),  # 8 rows over 2, 4 KV heads over 4
    ("qwen2.5-7b", "tensor:8", 1, 1),  # 4 KV heads do not divide by 8: the cache is whole on every device
    ("qwen2.5-0.5b", "data:8", 8, 8),
    ("qwen2.5-72b", "data:2,tensor:4", 8, 2),
])
def test_kv_cache_equals_the_hand_formula(name, mesh, kv_split, row_split):
  cfg = PRESETS[name]
  b, context, chunk = 8, 4000, 256
  plan = planner.plan_memory(name, mesh=mesh, dtype="bfloat16", max_batch_size=b, max_seq_len=context,
                             max_prefill_chunk=chunk)
  s = context + chunk  # the engine's headroom of one prefill chunk
  kv = 2 * cfg.num_layers * b * cfg.num_kv_heads * s * cfg.head_dim * 2
  assert plan.kv_cache == kv // kv_split + 2 * (b // row_split) * 4  # + lengths, rope offsets [B] int32


def test_plan_rejects_unknown_things():
  with pytest.raises(ConfigError, match="qwen3"):
    planner.plan_memory("qwen3")
  with pytest.raises(ConfigError, match="int4"):
    planner.plan_memory("qwen2.5-7b", dtype="int4")
  with pytest.raises(ConfigError, match="pipeline"):
    planner.plan_memory("qwen2.5-7b", mesh={"pipeline": 2})


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


def _decode_temp(graphdef, params, cache, vocab: int) -> int:
  b = cache.lengths.shape[0]
  compiled = _decode_and_sample_jit.lower(graphdef, params, cache, _sds((b,), jnp.int32), _sds((b, vocab), bool),
                                          _sds((b, vocab), jnp.int32), _sampling_arrays(b)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _prefill_temp(graphdef, params, cache, chunk: int) -> int:
  """One prompt chunk appended to one cache row, as the engine prefills."""
  one = _sds((1,), jnp.int32)
  compiled = _extend_jit.lower(graphdef, params, cache, _sds((1, chunk), jnp.int32), one, one).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _within_factor(planned: int, measured: int) -> bool:
  return measured / XLA_FACTOR <= planned <= measured * XLA_FACTOR


@pytest.mark.real_model
def test_weights_and_cache_equal_the_loaded_model_and_allocation(real_gguf_path):
  """The embedded Qwen2.5-0.5B (Coder) loaded in float32: weights to the byte; a KVCache.zeros and the engine's
  slot state to the byte; the decode step's temporaries within 2x of XLA's figure for these very arrays."""
  import qwenjax  # pylint: disable=g-import-not-at-top

  model = qwenjax.load(str(real_gguf_path), dtype="float32", scan_layers=True).model
  cfg = model.cfg
  b, context, chunk = 8, 1536, 512
  plan = planner.plan_memory(cfg, dtype="float32", max_batch_size=b, max_seq_len=context, max_prefill_chunk=chunk)
  params = nnx.state(model, nnx.Param)
  assert plan.weights == sum(x.nbytes for x in jax.tree.leaves(params))
  assert plan.weights == cfg.num_params() * 4  # this GGUF stores an untied output head: 630,167,424 parameters

  cache = KVCache.zeros(cfg, b, context + chunk, jnp.float32)
  assert plan.kv_cache == sum(x.nbytes for x in jax.tree.leaves(cache))
  slot_state = [jnp.zeros((b, cfg.vocab_size), bool), jnp.zeros((b, cfg.vocab_size), jnp.int32)]
  assert plan.sampling == sum(x.nbytes for x in slot_state)

  graphdef, state = nnx.split(model)
  measured = _decode_temp(graphdef, state, cache, cfg.vocab_size)
  assert _within_factor(plan.decode_activations, measured), (plan.decode_activations, measured)


@pytest.fixture(scope="module")
def abstract_05b():
  """The 0.5B model as ShapeDtypeStructs, scanned and unrolled: XLA's buffer sizes depend on shapes alone."""
  cfg = PRESETS["qwen2.5-0.5b"]
  return {scan: nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), scan_layers=scan)))
          for scan in (True, False)}


@pytest.mark.parametrize("scan, b, context", [
    (True, 1, 512),
    (True, 32, 1536),
    (True, 64, 3584),
    pytest.param(False, 8, 1536, marks=pytest.mark.slow),
    pytest.param(False, 128, 512, marks=pytest.mark.slow),
])
def test_activations_within_2x_of_xla(abstract_05b, scan, b, context):
  """0.5B in float32 on one CPU device: the decode step with sampling, and one 512-token prefill chunk."""
  cfg, chunk = PRESETS["qwen2.5-0.5b"], 512
  graphdef, params = abstract_05b[scan]
  cache = jax.eval_shape(lambda: KVCache.zeros(cfg, b, context + chunk))
  plan = planner.plan_memory("qwen2.5-0.5b", dtype="float32", max_batch_size=b, max_seq_len=context,
                             max_prefill_chunk=chunk, scan_layers=scan)
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
  compiled = encode.lower(graphdef, params, _sds((patches, vl.vision.patch_dim), jnp.float32), arrays).compile()
  measured = compiled.memory_analysis().temp_size_in_bytes
  planned = planner.plan_memory("qwen2.5-vl-3b", dtype="float32", vision_patches=patches).vision_activations
  assert _within_factor(planned, measured), (planned, measured)


# (model, mesh) pairs the 8-device worker compiles: KV and query heads replicated or split, fsdp, untied head.
SHARDED_CASES = ("qwen2.5-0.5b:data:2,tensor:4", "qwen2.5-0.5b:tensor:8", "qwen2.5-0.5b:data:8",
                 "qwen2.5-0.5b:fsdp:2,tensor:4", "qwen2.5-0.5b:fsdp:8", "qwen2.5-7b:data:2,tensor:4",
                 "qwen2.5-7b:tensor:8", "qwen2.5-7b:fsdp:2,tensor:4")
SHARDED_SHAPE = dict(max_batch_size=16, max_seq_len=1536, max_prefill_chunk=512)


def _sharded_worker(cases) -> dict[str, dict[str, int]]:
  """Per case: each device's argument bytes of the decode step (weights, cache, tokens) and temp bytes of decode
  with sampling, from XLA's memory_analysis, with every input laid out by the sharding rules."""
  out = {}
  b, s = SHARDED_SHAPE["max_batch_size"], SHARDED_SHAPE["max_seq_len"] + SHARDED_SHAPE["max_prefill_chunk"]
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
    with jax.set_mesh(mesh):
      decode = jax.jit(programs.decode_step_impl, static_argnames=("graphdef",), donate_argnames=("cache",),
                       in_shardings=(param_shardings, cache_shardings, whole))
      args = decode.lower(graphdef, params, cache, _sds((b,), jnp.int32)).compile().memory_analysis()
      full = jax.jit(_decode_and_sample, static_argnames=("graphdef",), donate_argnames=("cache",),
                     in_shardings=(param_shardings, cache_shardings, whole, slot_state, slot_state, whole))
      temp = full.lower(graphdef, params, cache, _sds((b,), jnp.int32), _sds((b, cfg.vocab_size), bool),
                        _sds((b, cfg.vocab_size), jnp.int32), _sampling_arrays(b)).compile().memory_analysis()
    out[case] = {"arguments": args.argument_size_in_bytes, "temp": temp.temp_size_in_bytes}
  return out


@pytest.mark.slow
def test_sharded_plans_match_xla():
  """On 8 CPU devices (a subprocess: this process has started JAX on one), per device: weights + KV cache equal
  XLA's argument bytes exactly, and activations lie within 2x of XLA's temp bytes."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, __file__, *SHARDED_CASES], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  measured = json.loads(run.stdout.strip().splitlines()[-1])
  for case in SHARDED_CASES:
    name, mesh = case.split(":", 1)
    plan = planner.plan_memory(name, mesh=mesh, dtype="float32", **SHARDED_SHAPE)
    tokens = SHARDED_SHAPE["max_batch_size"] * 4
    assert plan.weights + plan.kv_cache + tokens == measured[case]["arguments"], case
    assert _within_factor(plan.decode_activations, measured[case]["temp"]), (case, plan.decode_activations,
                                                                             measured[case]["temp"])


def test_entry_point_prints_a_topology_plan():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, "-m", "qwenjax.parallel.planner", "--topology=v5e-8"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| qwen2.5-7b | data:2,tensor:4 | 32 | 32768 |" in run.stdout
  assert "NO" not in run.stdout
  bad = subprocess.run([sys.executable, "-m", "qwenjax.parallel.planner", "--topology=v9z-1"], env=env,
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
