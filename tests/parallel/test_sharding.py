"""Sharding over device meshes: the rules table's golden layouts per preset, memory per device, the --mesh flag, and
(in one 8-device subprocess, tests/sharding_worker.py) tokens and logits on every mesh shape against one device."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwenjax import PRESETS, VL_PRESETS, ConfigError, Qwen2VL
from qwenjax.model import kv_cache
from qwenjax.model.decoder import abstract_model
from qwenjax.parallel import sharding

from conftest import build_tiny_qwen2, build_tiny_qwen3_moe, save_tiny_tokenizer_dir, xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
T, F = "tensor", "fsdp"
_ = None


# ---- golden layouts, written out by hand from the rules: heads, KV heads, MLP and vocabulary over tensor where
# it divides them, embed over fsdp; abstract models (scanned: a leading layers axis), nothing allocated ----

def _decoder(embed, q_kernel, q_bias, kv_kernel, kv_bias, o_kernel, norm, up, down, final_norm, lm_head=None):
  table = {
      "embed": embed, "final_norm/scale": final_norm,
      "layers/attn/q_kernel": q_kernel, "layers/attn/q_bias": q_bias,
      "layers/attn/k_kernel": kv_kernel, "layers/attn/k_bias": kv_bias,
      "layers/attn/v_kernel": kv_kernel, "layers/attn/v_bias": kv_bias,
      "layers/attn/o_kernel": o_kernel,
      "layers/attn_norm/scale": norm, "layers/mlp_norm/scale": norm,
      "layers/mlp/gate": up, "layers/mlp/up": up, "layers/mlp/down": down,
  }
  if lm_head is not None:
    table["lm_head"] = lm_head
  return {k: P(*v) for k, v in table.items()}


GOLDEN = {
    # 0.5B: 14 query heads, 2 KV heads (neither divides by 8 or 4: attention stays whole), MLP 4864, vocab
    # 151936, embed 896; tied embeddings (no lm_head).
    ("qwen2.5-0.5b", "tensor:8"): _decoder(
        embed=(T, _), q_kernel=(_, _, _, _), q_bias=(_, _, _), kv_kernel=(_, _, _, _), kv_bias=(_, _, _),
        o_kernel=(_, _, _, _), norm=(_, _), up=(_, _, T), down=(_, T, _), final_norm=(_,)),
    ("qwen2.5-0.5b", "fsdp:2,tensor:4"): _decoder(
        embed=(T, F), q_kernel=(_, F, _, _), q_bias=(_, _, _), kv_kernel=(_, F, _, _), kv_bias=(_, _, _),
        o_kernel=(_, _, _, F), norm=(_, F), up=(_, F, T), down=(_, T, F), final_norm=(F,)),
    # 7B: 28 query heads and 4 KV heads split 4 ways, not 8; MLP 18944, vocab 152064, embed 3584; lm_head.
    ("qwen2.5-7b", "tensor:8"): _decoder(
        embed=(T, _), q_kernel=(_, _, _, _), q_bias=(_, _, _), kv_kernel=(_, _, _, _), kv_bias=(_, _, _),
        o_kernel=(_, _, _, _), norm=(_, _), up=(_, _, T), down=(_, T, _), final_norm=(_,), lm_head=(T, _)),
    ("qwen2.5-7b", "fsdp:2,tensor:4"): _decoder(
        embed=(T, F), q_kernel=(_, F, T, _), q_bias=(_, T, _), kv_kernel=(_, F, T, _), kv_bias=(_, T, _),
        o_kernel=(_, T, _, F), norm=(_, F), up=(_, F, T), down=(_, T, F), final_norm=(F,), lm_head=(T, F)),
}

# The Qwen2.5-VL-7B tower: 16 heads (split 8 ways too), MLP 3420 (split 4 ways, not 8), merger 5120 -> 3584. The
# pixel axis of patch_embed and the q|k|v axis of qkv have no logical name: never split.
VISION_GOLDEN = {
    "tensor:8": {
        "patch_embed": (_, _), "layers/attn/qkv_kernel": (_, _, _, T, _), "layers/attn/qkv_bias": (_, _, T, _),
        "layers/attn/o_kernel": (_, T, _, _), "layers/attn/o_bias": (_, _),
        "layers/norm1/scale": (_, _), "layers/norm2/scale": (_, _),
        "layers/mlp/gate": (_, _, _), "layers/mlp/gate_bias": (_, _), "layers/mlp/up": (_, _, _),
        "layers/mlp/up_bias": (_, _), "layers/mlp/down": (_, _, _), "layers/mlp/down_bias": (_, _),
        "merger/ln_q/scale": (_,), "merger/fc1": (_, T), "merger/fc1_bias": (T,), "merger/fc2": (T, _),
        "merger/fc2_bias": (_,),
    },
    "fsdp:2,tensor:4": {
        "patch_embed": (_, F), "layers/attn/qkv_kernel": (_, F, _, T, _), "layers/attn/qkv_bias": (_, _, T, _),
        "layers/attn/o_kernel": (_, T, _, F), "layers/attn/o_bias": (_, F),
        "layers/norm1/scale": (_, F), "layers/norm2/scale": (_, F),
        "layers/mlp/gate": (_, F, T), "layers/mlp/gate_bias": (_, T), "layers/mlp/up": (_, F, T),
        "layers/mlp/up_bias": (_, T), "layers/mlp/down": (_, T, F), "layers/mlp/down_bias": (_, F),
        "merger/ln_q/scale": (F,), "merger/fc1": (F, T), "merger/fc1_bias": (T,), "merger/fc2": (T, F),
        "merger/fc2_bias": (F,),
    },
}


@pytest.mark.parametrize("preset, mesh", sorted(GOLDEN))
def test_weight_layouts_follow_the_rules(preset, mesh):
  model = abstract_model(PRESETS[preset])
  assert sharding.param_specs(model, sharding.parse_mesh(mesh)) == GOLDEN[preset, mesh]


@pytest.mark.parametrize("mesh", sorted(VISION_GOLDEN))
def test_vl_weight_layouts_follow_the_rules(mesh):
  model = nnx.eval_shape(lambda: Qwen2VL(VL_PRESETS["qwen2.5-vl-7b"], rngs=nnx.Rngs(0)))
  specs = sharding.param_specs(model, sharding.parse_mesh(mesh))
  vision = {k.removeprefix("visual/"): v for k, v in specs.items() if k.startswith("visual/")}
  assert vision == {k: P(*v) for k, v in VISION_GOLDEN[mesh].items()}
  decoder = {k: v for k, v in specs.items() if not k.startswith("visual/")}
  assert decoder == GOLDEN["qwen2.5-7b", mesh]  # the VL decoder is the 7B decoder


def test_qwen3_moe_experts_split_over_the_expert_axis():
  """Qwen3-30B-A3B on expert 4 x fsdp 2 x tensor 4: each expert weight [L, E, ...] splits its 128 experts over
  expert, its F (768) over tensor and its D (2048) over fsdp; the router [L, D, E] its experts over expert and D
  over fsdp; attention as in a dense Qwen3 (32 query heads, 4 KV heads over tensor); q/k norms whole."""
  E = "expert"
  mesh = sharding.parse_mesh("fsdp:2,expert:4,tensor:4")
  specs = sharding.param_specs(abstract_model(PRESETS["qwen3-30b-a3b"]), mesh)
  assert specs["layers/mlp/gate"] == specs["layers/mlp/up"] == P(_, E, F, T)
  assert specs["layers/mlp/down"] == P(_, E, T, F)
  assert specs["layers/mlp/router"] == P(_, F, E)
  assert specs["layers/attn/q_kernel"] == P(_, F, T, _) and specs["layers/attn/k_kernel"] == P(_, F, T, _)
  assert specs["layers/attn/q_norm/scale"] == P(_, _)


def test_unrolled_layers_shard_like_scanned():
  unrolled = sharding.param_specs(abstract_model(PRESETS["qwen2.5-7b"], scan_layers=False),
                                  sharding.parse_mesh("fsdp:2,tensor:4"))
  for layer in (0, 27):
    assert unrolled[f"layers/{layer}/attn/q_kernel"] == P(F, T, _)
    assert unrolled[f"layers/{layer}/mlp/down"] == P(T, F)


def test_cache_layout_and_batch_fallback():
  cfg = PRESETS["qwen2.5-7b"]
  cache = kv_cache.cache_sharding(cfg, sharding.abstract_mesh({"data": 2, "tensor": 4}), 16, 1024)
  assert cache.k.spec == P(_, "data", T, _, _) and cache.lengths.spec == P("data")
  # 2 KV heads over a tensor axis of 8: the cache's heads stay whole (every device keeps both).
  cache = kv_cache.cache_sharding(PRESETS["qwen2.5-0.5b"], sharding.abstract_mesh({"tensor": 8}), 16, 1024)
  assert cache.k.spec == P(_, _, _, _, _)
  # Slots split over data, then fsdp; over the longest prefix of the two that divides them.
  mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.spec_for(("batch", "vocab"), (8, 64), mesh) == P(("data", "fsdp"), T)
  assert sharding.spec_for(("batch", "vocab"), (2, 64), mesh) == P("data", T)
  assert sharding.spec_for(("batch", "vocab"), (1, 64), mesh) == P(_, T)


def test_weight_bytes_per_device_fall_with_the_tensor_axis():
  """Qwen2.5-7B in bfloat16, from shard shapes on abstract meshes. By hand: 7,615,616,512 parameters; norms
  (2 x 28 + 1) x 3584 = 204,288 never split (fsdp 1); with tensor 2 and 4 every other weight splits evenly; with
  tensor 8 attention (28 query, 4 KV heads: 29,364,736 per layer, 822,212,608 in all) stays whole too."""
  model = abstract_model(PRESETS["qwen2.5-7b"], param_dtype=jnp.bfloat16)
  per_device = {t: sharding.param_bytes_per_device(model, sharding.abstract_mesh({"tensor": t})) for t in (1, 2, 4, 8)}
  total, norms, attention = 7_615_616_512, 204_288, 822_212_608
  assert per_device == {
      1: 2 * total,  # 15,231,233,024
      2: 2 * ((total - norms) // 2 + norms),  # 7,615,820,800
      4: 2 * ((total - norms) // 4 + norms),  # 3,808,114,688
      8: 2 * ((total - norms - attention) // 8 + attention + norms),  # 3,343,133,696
  }
  small = abstract_model(PRESETS["qwen2.5-0.5b"])
  sizes = [sharding.param_bytes_per_device(small, sharding.abstract_mesh({"tensor": t})) for t in (1, 2, 4, 8)]
  assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes
  assert sizes[0] == 4 * 494_032_768


@pytest.mark.parametrize("value, message", [
    ("model:2", "'model:2' is not axis:size with axis one of data, fsdp, expert, tensor"),
    ("data:x", "size 'x' of axis 'data' is not an integer"),
    ("tensor:0", "axis 'tensor' has size 0"),
    ("data2", "'data2' is not axis:size"),
    ("data:2,tensor:4", "needs 8 devices; there are 1"),
])
def test_bad_mesh_values_are_one_clear_error(value, message):
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_from_flags(value)


def test_mesh_flag_defaults_to_no_mesh():
  assert sharding.mesh_from_flags(None) is None and sharding.mesh_from_flags("") is None
  assert sharding.parse_mesh("data:2, tensor:4") == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
  assert dict(sharding.mesh_from_flags("tensor:1").shape) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}


@pytest.mark.parametrize("module", ["launch.generate", "launch.batch_generate"])
def test_launch_rejects_a_bad_mesh_before_loading(module, tmp_path):
  args = ["--mesh=data:2,model:4", "--model=/nonexistent"]
  args += ["--prompt=hi"] if module == "launch.generate" else [f"--input={tmp_path}/in", f"--output={tmp_path}/out"]
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "error: --mesh: 'model:4' is not axis:size" in proc.stderr, proc.stderr[-2000:]


# ---- 8 devices, in one subprocess ----

MESHES = ["tensor:8", "data:2,tensor:4", "data:4,tensor:2", "data:8", "fsdp:2,tensor:4"]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """tests/sharding_worker.py's results on 8 fake CPU devices, for a tiny Qwen2, a tiny Qwen2.5-VL and a tiny
  Qwen3-MoE.

  12 query heads in 2 KV groups of 6, as in Qwen2.5-1.5B: tensor 2 splits both; tensor 4 exceeds the KV heads and
  splits the query heads 3 per device, half a group each (the [N] -> [K, G] reshape crosses devices); tensor 8
  divides neither, so attention stays whole (as Qwen2.5-0.5B's 14 heads on 4 or 8). MLP 128, vocabulary 256 and
  embed 96 split on every mesh."""
  from conftest import build_tiny_vl

  text = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("sharding_text"))
  build_tiny_qwen2(text, vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=12, num_key_value_heads=2, bos_token_id=254, eos_token_id=255)
  vl = tmp_path_factory.mktemp("sharding_vl")
  build_tiny_vl(vl, seed=2)  # a seed whose greedy tokens vary (seed 0's repeat one token after an image)
  moe = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("sharding_moe"))
  build_tiny_qwen3_moe(moe, vocab_size=256, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  worker = REPO / "tests" / "parallel" / "sharding_worker.py"
  proc = subprocess.run([sys.executable, str(worker), str(text), str(vl), str(moe)], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_greedy_tokens_and_logits_equal_one_device(eight_devices, mesh):
  """Ten prompts (1 to 24 tokens, chunked prefill) through eight slots, refilled as they finish."""
  run, reference = eight_devices["meshes"][mesh], eight_devices["reference"]
  assert run["tokens"] == reference["tokens"]
  assert run["max_logit_diff"] < 1e-5  # every prompt position, float32, matmul precision highest


@pytest.mark.parametrize("mesh", MESHES)
def test_shared_prefix_pages_on_a_mesh(eight_devices, mesh):
  """Four prompts sharing a page and a half: cached full pages and copied partial pages on the mesh give the tokens
  of one device, which equal those of an engine without prefix caching."""
  run, reference = eight_devices["meshes"][mesh]["shared_prefix"], eight_devices["reference"]["shared_prefix"]
  assert reference["tokens"] == reference["unshared_tokens"]
  assert run["tokens"] == reference["tokens"]
  assert run["cached"] == reference["cached"] > 0


@pytest.mark.parametrize("mesh", MESHES)
def test_layouts_hold_and_nothing_recompiles(eight_devices, mesh):
  """Weights load into the rules' shardings; after prefill and decode the cache and slot state keep theirs (the
  donated cache is taken and returned in place); a mesh compiles the same programs as one device, and nothing
  after warm-up."""
  run, reference = eight_devices["meshes"][mesh], eight_devices["reference"]
  assert run["layout_errors"] == [] and reference["layout_errors"] == []
  assert run["compiled_first"] == reference["compiled_first"]
  assert run["compiled_again"] == {} and reference["compiled_again"] == {}


@pytest.mark.parametrize("mesh", ["data:2,tensor:4", "fsdp:2,tensor:4"])
def test_int8_weights_on_a_mesh_equal_one_device(eight_devices, mesh):
  """quantize="int8": int8 values shard like the float weights and their per-channel scales like the output axes
  (the loader places both straight into their shards); tokens and logits equal the int8 model on one device."""
  run, reference = eight_devices["int8"][mesh], eight_devices["int8"]["reference"]
  assert run["layout_errors"] == []
  assert run["tokens"] == reference["tokens"]
  assert run["max_logit_diff"] < 1e-5
  assert run["compiled_again"] == {}


def test_the_pallas_moe_dispatch_on_an_expert_mesh_equals_ragged_dot(eight_devices):
  """The Pallas grouped matmul's dispatch with the experts split over expert 2 (x tensor 4) and expert 8 (one expert
  a device): each device routes the others' assignments to no group, which the kernel never multiplies (an unchosen
  expert's NaN weights stay out), and the sum over the axis is jax.lax.ragged_dot's on one device within 1e-5."""
  diffs = eight_devices["moe_pallas_dispatch"]
  assert set(diffs) == {"expert:2,tensor:4", "expert:8"}
  assert all(diff < 1e-5 for diff in diffs.values()), diffs


@pytest.mark.parametrize("mesh", ["expert:2,tensor:4", "data:2,expert:4", "fsdp:2,expert:2,tensor:2",
                                  "int8 expert:2,tensor:4"])
def test_qwen3_moe_on_an_expert_mesh_equals_one_device(eight_devices, mesh):
  """A tiny Qwen3-MoE (8 experts, top 2): its experts split over the expert axis (with tensor splitting each
  expert's F, data and fsdp the batch; float and int8) give one device's greedy tokens and logits within 1e-5, its
  weights hold the rules' layouts (experts over expert), and nothing compiles after the first workload."""
  part, mesh = ("moe_int8", mesh.split()[1]) if mesh.startswith("int8") else ("moe", mesh)
  run, reference = eight_devices[part][mesh], eight_devices[part]["reference"]
  assert run["layout_errors"] == []
  assert run["tokens"] == reference["tokens"]
  assert run["max_logit_diff"] < 1e-5
  assert run["compiled_again"] == {}


def test_vl_on_a_mesh_equals_one_device(eight_devices):
  """An image prompt and a text prompt through two slots on data 2 x tensor 4 (the tower's 2 heads stay whole, its
  MLP and merger split)."""
  vl = eight_devices["vl"]
  assert vl["data:2,tensor:4"]["layout_errors"] == []
  assert vl["data:2,tensor:4"]["max_feature_diff"] < 1e-5
  assert vl["data:2,tensor:4"]["tokens"] == vl["reference"]["tokens"]
