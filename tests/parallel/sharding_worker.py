"""The 8-device half of tests/test_sharding.py, run there in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the pytest process has already started JAX on one device).

    python tests/sharding_worker.py TEXT_CHECKPOINT_DIR [VL_CHECKPOINT_DIR [MOE_CHECKPOINT_DIR]]

TEXT_CHECKPOINT_DIR: a tiny Qwen2 with a tokenizer beside it; VL_CHECKPOINT_DIR: tests/test_multimodal.py's tiny
Qwen2.5-VL (its image token ids); MOE_CHECKPOINT_DIR: a tiny Qwen3-MoE with a tokenizer, run on the meshes of
`MOE_MESHES` (an expert axis).

For one single-device reference and each mesh of `MESHES` it loads the tiny checkpoint straight into its shardings,
runs the same greedy workload through an Engine (prompts of several lengths, chunked prefill, more requests than
slots), prefills a batch with every position's logits, and counts compilations; it prints one JSON object
with the tokens, the largest logit difference, and every layout mismatch it found. The test asserts on them.
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from flax import nnx  # noqa: E402

import qwenjax  # noqa: E402
from qwenjax.checkpoints.hf import load_model  # noqa: E402
from qwenjax.engine import programs  # noqa: E402
from qwenjax.engine.engine import Engine  # noqa: E402
from qwenjax.engine.profiling import count_compilations  # noqa: E402
from qwenjax.engine.requests import Request  # noqa: E402
from qwenjax.engine.sampling import SamplingParams  # noqa: E402
from qwenjax.model.kv_cache import KVCache, cache_sharding, paged_cache_sharding  # noqa: E402
from qwenjax.model.moe import dispatch, dispatch_reference  # noqa: E402
from qwenjax.multimodal import features as features_lib  # noqa: E402
from qwenjax.parallel import sharding  # noqa: E402

# mesh -> scan_layers. data x tensor 1x8, 2x4, 4x2, 8x1, and fsdp with stacked (scanned) layers.
MESHES = {"tensor:8": False, "data:2,tensor:4": False, "data:4,tensor:2": False, "data:8": False,
          "fsdp:2,tensor:4": True}
INT8_MESHES = ("data:2,tensor:4", "fsdp:2,tensor:4")  # int8 weights: unrolled and scanned
# Qwen3-MoE: experts over an expert axis with tensor (scanned), with data (unrolled, two experts per device), and
# with fsdp and tensor; int8 experts on the first.
MOE_MESHES = {"expert:2,tensor:4": True, "data:2,expert:4": False, "fsdp:2,expert:2,tensor:2": True}
SLOTS, CONTEXT, CHUNK, PAGE = 8, 64, 8, 8
VL_IMAGE, VL_START, VL_END = 290, 292, 293  # tests/test_multimodal.py's build_tiny_vl ids


def _weight_layout_errors(model, mesh) -> list[str]:
  """Every weight whose sharding is not what the rules say."""
  errors = []
  want = sharding.param_shardings(model, mesh)
  for (path, var), (_, expected) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(want)):
    if not var.value.sharding.is_equivalent_to(expected.value, var.value.ndim):
      errors.append(f"{'/'.join(map(str, path))}: {var.value.sharding.spec} != {expected.value.spec}")
  return errors


def _engine_layout_errors(engine: Engine, mesh) -> list[str]:
  """Every weight, cache and slot-state array of the engine whose sharding is not what the rules say."""
  # pylint: disable=protected-access
  errors = _weight_layout_errors(engine.model, mesh)
  cache = engine.runner.cache
  # The page pool: pages over data, KV heads over tensor.
  want = paged_cache_sharding(engine.cfg, mesh, cache.num_pages, cache.page_size, cache.quantized, engine.rules)
  names = ("k", "v") + (("k_scale", "v_scale") if cache.quantized else ())
  slot = sharding.named_sharding(mesh, ("batch", "vocab"), engine.runner.slots.counts.shape, engine.rules)
  arrays = {f"cache.{name}": (getattr(cache, name), getattr(want, name)) for name in names}
  slots = engine.runner.slots
  arrays.update({"prompt_mask": (slots.prompt_mask, slot), "counts": (slots.counts, slot)})
  for name, (got, expected) in arrays.items():
    if not got.sharding.is_equivalent_to(expected, got.ndim):
      errors.append(f"{name}: {got.sharding.spec} != {expected.spec}")
  return errors


def _prefill_logits(engine: Engine, mesh, prompts) -> tuple[np.ndarray, list[str]]:
  """Every position's logits of a batch prefilled through the public jitted `programs.prefill` on a fresh cache,
  and any way in which it did not take the cache donated and return it in the layout it came in."""
  b = len(prompts)
  tokens = np.zeros((b, CHUNK), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  where = None if mesh is None else cache_sharding(engine.cfg, mesh, b, CONTEXT, engine.rules)
  given = KVCache.zeros(engine.cfg, b, CONTEXT, sharding=where)
  with sharding.use_mesh(mesh, engine.rules):
    runner = engine.runner
    logits, cache = programs.prefill(runner.graphdef, runner.params, given, tokens, lengths, all_logits=True)
  errors = [] if given.k.is_deleted() else ["prefill did not take the donated cache"]
  if mesh is not None:
    for name in ("k", "v", "lengths"):
      got, want = getattr(cache, name), getattr(where, name)
      if not got.sharding.is_equivalent_to(want, got.ndim):
        errors.append(f"prefill cache.{name}: {got.sharding.spec} != {want.spec}")
  valid = np.arange(CHUNK)[None, :] < lengths[:, None]
  return np.asarray(logits)[valid], errors


def _text_run(directory: str, mesh_text: str | None, scan: bool, quantize: str | None = None) -> dict:
  mesh = sharding.mesh_from_flags(mesh_text)
  rng = np.random.default_rng(0)
  # Ten prompts for eight slots, one to three chunks each (fresh and appended prefill), different budgets.
  lengths = [3, 13, 9, 16, 1, 11, 20, 5, 24, 7]
  prompts = [rng.integers(0, 250, size=n).tolist() for n in lengths]
  budgets = [6, 12, 3, 9, 12, 5, 8, 12, 4, 10]
  again = [rng.integers(0, 250, size=n).tolist() for n in (14, 2)]
  loaded = qwenjax.load(directory, scan_layers=scan, mesh=mesh, quantize=quantize)  # straight into its shards
  errors = [] if mesh is None else [f"loaded {e}" for e in _weight_layout_errors(loaded.model, mesh)]
  engine = Engine(loaded.model, loaded.tokenizer, eos_token_ids=(), max_batch_size=SLOTS, max_seq_len=CONTEXT,
                  max_prefill_chunk=CHUNK, page_size=PAGE, decode_steps=4, mesh=mesh)
  requests = [Request(prompt=p, sampling=SamplingParams(max_tokens=m)) for p, m in zip(prompts, budgets)]
  with count_compilations() as first:
    outs = engine.generate(requests)
  with count_compilations() as second:
    engine.generate(again, SamplingParams(max_tokens=6))
  # Prompts sharing a header of one and a half pages: later ones read its full page from the cache and copy
  # its partial page (copy_pages) on the mesh; compiles what it needs (copy_pages) outside the counts above.
  ps = PAGE
  header = rng.integers(0, 250, size=ps + ps // 2).tolist()
  shared = [header + rng.integers(0, 250, size=n).tolist() for n in (1, 3, 5, 2)]
  cached_before = engine.stats()["cached_tokens"]
  shared_outs = engine.generate(shared, SamplingParams(max_tokens=6))
  shared_run = {"tokens": [o.token_ids for o in shared_outs], "cached": engine.stats()["cached_tokens"] - cached_before}
  if mesh is None:  # the reference: the same prompts without prefix caching
    plain = Engine(loaded.model, loaded.tokenizer, eos_token_ids=(), max_batch_size=SLOTS, max_seq_len=CONTEXT,
                   max_prefill_chunk=CHUNK, page_size=PAGE, decode_steps=4, prefix_caching=False)
    shared_run["unshared_tokens"] = [o.token_ids for o in plain.generate(shared, SamplingParams(max_tokens=6))]
  errors += [] if mesh is None else _engine_layout_errors(engine, mesh)
  logits, prefill_errors = _prefill_logits(engine, mesh, [p[:CHUNK] for p in prompts[:SLOTS]])
  return {
      "tokens": [o.token_ids for o in outs],
      "shared_prefix": shared_run,
      "logits": logits,
      "compiled_first": dict(first),
      "compiled_again": dict(second),
      "layout_errors": errors + prefill_errors,
  }


def _vl_run(directory: str, mesh_text: str | None) -> dict:
  """A Qwen2.5-VL prompt with an image and a text prompt through two slots (vision tower, 3D positions)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  mesh = sharding.mesh_from_flags(mesh_text)
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
  with_image = Request(prompt=[5, 6, VL_START, VL_IMAGE, VL_END, 7, 8, 9], images=[image],
                       sampling=SamplingParams(max_tokens=8))
  text = Request(prompt=rng.integers(0, 250, size=20).tolist(), sampling=SamplingParams(max_tokens=8))
  model = load_model(directory, scan_layers=False, mesh=mesh)
  errors = [] if mesh is None else _weight_layout_errors(model, mesh)
  engine = Engine(model, None, eos_token_ids=(), max_batch_size=2, max_seq_len=CONTEXT, max_prefill_chunk=CHUNK,
                  mesh=mesh)
  tokens = [o.token_ids for o in engine.generate([with_image, text])]
  with sharding.use_mesh(mesh):  # the tower's output alone, as the engine computes it
    visuals = engine.prepare(with_image).visuals
    features = features_lib.encode_visuals(model.visual, visuals, engine.runner.patch_buckets)
  return {"tokens": tokens, "layout_errors": errors, "features": features}


def main(argv):
  assert jax.device_count() == 8, jax.devices()
  text_dir = argv[1]
  reference = _text_run(text_dir, None, scan=False)
  result = {"reference": {k: v for k, v in reference.items() if k != "logits"}, "meshes": {}}
  for mesh_text, scan in MESHES.items():
    run = _text_run(text_dir, mesh_text, scan)
    run["max_logit_diff"] = float(np.max(np.abs(run.pop("logits") - reference["logits"])))
    run["scan_layers"] = scan
    result["meshes"][mesh_text] = run
  # int8 weights (values and per-channel scales, each in its own sharding) on a mesh against one device.
  result["int8"] = _against_one_device(text_dir, {m: MESHES[m] for m in INT8_MESHES}, quantize="int8")
  if len(argv) > 2:
    reference, run = _vl_run(argv[2], None), _vl_run(argv[2], "data:2,tensor:4")
    run["max_feature_diff"] = float(np.max(np.abs(run.pop("features") - reference.pop("features"))))
    result["vl"] = {"reference": reference, "data:2,tensor:4": run}
  if len(argv) > 3:
    result["moe"] = _against_one_device(argv[3], MOE_MESHES)
    result["moe_int8"] = _against_one_device(argv[3], {"expert:2,tensor:4": True}, quantize="int8")
  result["moe_pallas_dispatch"] = _pallas_dispatch_on_expert_meshes()
  print(json.dumps(result))


def _pallas_dispatch_on_expert_meshes() -> dict:
  """The MoE dispatch through the Pallas grouped matmul (interpret mode) with the experts split over an expert
  axis, where another device's assignments are routed to no group: 12 tokens, top 2 of 8 experts (uneven, one
  expert chosen by none), against `dispatch_reference` (jax.lax.ragged_dot) on one device. The unchosen expert's
  weights are NaN on the mesh: on expert 8 its device holds it alone, and only a row it multiplied (another
  device's assignment, weighted 0) could spread them. -> max |diff| by mesh (NaN if one spread)."""
  rng = np.random.default_rng(5)
  m, k, e, d, f = 12, 2, 8, 64, 32
  x = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
  experts = jnp.asarray(np.stack([rng.choice([0, 1, 2, 3, 5, 6, 7], k, replace=False, p=[.3, .2, .1, .1, .1, .1, .1])
                                  for _ in range(m)]), jnp.int32)  # [M, k]; expert 4 chosen by none
  weights = jnp.asarray(rng.uniform(0.1, 1.0, (m, k)), jnp.float32)
  ffn = tuple(jnp.asarray(rng.standard_normal(shape) * 0.2, jnp.float32) for shape in ((e, d, f), (e, d, f), (e, f, d)))
  want = np.asarray(dispatch_reference(x, experts, weights, ffn, jnp.float32))
  poisoned = tuple(w.at[4].set(jnp.nan) for w in ffn)
  out = {}
  for mesh_text in ("expert:2,tensor:4", "expert:8"):
    mesh = sharding.mesh_from_flags(mesh_text)
    with sharding.use_mesh(mesh):
      got = jax.jit(lambda *a: dispatch(*a, jnp.float32, impl="pallas"))(x, experts, weights, poisoned)
    out[mesh_text] = float(np.max(np.abs(np.asarray(got) - want)))
  return out


def _against_one_device(directory: str, meshes: dict, quantize: str | None = None) -> dict:
  """`_text_run` on one device and on each mesh (-> scan_layers), with each mesh's largest logit difference."""
  reference = _text_run(directory, None, scan=False, quantize=quantize)
  out = {"reference": {k: v for k, v in reference.items() if k != "logits"}}
  for mesh_text, scan in meshes.items():
    run = _text_run(directory, mesh_text, scan, quantize=quantize)
    run["max_logit_diff"] = float(np.max(np.abs(run.pop("logits") - reference["logits"])))
    out[mesh_text] = run
  return out


if __name__ == "__main__":
  main(sys.argv)
