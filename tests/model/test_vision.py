"""The Qwen2.5-VL vision tower against transformers: merged features within 1e-4 in float32, every layout of
images; plans equal transformers' window index and positions; one compiled program per patch bucket."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenjax import InputError
from qwenjax.checkpoints.hf import SafetensorsSource, expected_tensors, load_params
from qwenjax.engine.profiling import count_compilations
from qwenjax.kernels.attention import vision_attention_reference
from qwenjax.model.vision import VisionTower, encode
from qwenjax.model.vision_config import VISION_PRESETS, VisionConfig
from qwenjax.model.vision_plan import PatchBuckets, plan

TOL = 1e-4

# Depth 4 with full attention in blocks 1 and 3; a 56-pixel window is 2 x 2 merge units (16 patches), so small
# grids hold several windows, some cut by the image border.
VISION = dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
              fullatt_block_indexes=[1, 3], window_size=56, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)

CASES = {
    "image": [(1, 8, 12)],  # 4 x 6 merge units: whole windows
    "border_windows": [(1, 10, 6)],  # 5 x 3 merge units: windows cut on both axes
    "two_images": [(1, 8, 12), (1, 6, 10)],
    "video": [(3, 8, 12)],  # 288 patches: bucket 512, three frames
}


class _Visual:
  """The `visual.*` tensors of a full Qwen2.5-VL checkpoint (the tower alone declares only those)."""

  def __init__(self, source):
    self.source = source

  def tensor_names(self):
    return [n for n in self.source.tensor_names() if n.startswith("visual.")]

  def __getattr__(self, name):
    return getattr(self.source, name)


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
  """(checkpoint dir, torch model) of a random Qwen2_5_VLForConditionalGeneration saved by transformers."""
  import transformers

  cfg = transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2,
                       rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}),
      vision_config=VISION, image_token_id=290, video_token_id=291, vision_start_token_id=292)
  torch.manual_seed(0)
  model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  # Weights 4x their init scale: features of order 1 and sharp attention, so that a wrong rotary id or window
  # moves them by 1e-2 or more (at the init scale swapping h and w moved them by under 1e-4). Random biases
  # and norm scales too, so a transposed or skipped one shows.
  with torch.no_grad():
    for name, p in model.model.visual.named_parameters():
      if p.dim() == 1:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
      else:
        p.mul_(4.0)
  path = tmp_path_factory.mktemp("tiny_vl")
  model.save_pretrained(path)
  return path, model


def _load_tower(path, **kwargs) -> VisionTower:
  cfg = VisionConfig.from_hf(json.loads((path / "config.json").read_text()))
  tower = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0), **kwargs))
  load_params(tower, _Visual(SafetensorsSource(path)))
  return tower


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def tower(request, tiny_vl):
  # Unrolled with 64-query blocks: several blocks per bucket, window blocks reading 64 + 2 * 16 keys.
  kw = dict(scan_layers=True) if request.param else dict(scan_layers=False, max_query_block=64)
  return _load_tower(tiny_vl[0], **kw)


def _hf_features(hf, pixels: np.ndarray, grids) -> np.ndarray:
  with torch.no_grad():
    out = hf.model.visual(torch.as_tensor(pixels), grid_thw=torch.tensor(grids))
  return out.pooler_output.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_tower_matches_transformers(tiny_vl, tower, case):
  _, hf = tiny_vl
  grids = CASES[case]
  rng = np.random.default_rng(0)
  images = [(rng.standard_normal((t * h * w, 1176)).astype(np.float32), (t, h, w)) for t, h, w in grids]
  ref = _hf_features(hf, np.concatenate([p for p, _ in images]), grids)  # [sum t*h*w/4, 48]
  got = tower.encode_images(images)
  assert [g.shape for g in got] == [(t * h * w // 4, 48) for t, h, w in grids]
  np.testing.assert_allclose(np.concatenate(got), ref, atol=TOL, rtol=0)


def test_bfloat16_compute_stays_near_float32(tiny_vl):
  images = [(np.random.default_rng(4).standard_normal((96, 1176)).astype(np.float32), (1, 8, 12))]
  [f32] = _load_tower(tiny_vl[0]).encode_images(images)
  [b16] = _load_tower(tiny_vl[0], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).encode_images(images)
  assert b16.dtype == jnp.bfloat16
  err = np.abs(b16.astype(np.float32) - f32).max() / np.abs(f32).max()
  assert err < 3e-2, err


def test_padded_rows_are_zero_and_do_not_change_real_ones(tiny_vl):
  tower = _load_tower(tiny_vl[0])
  graphdef, params = nnx.split(tower)
  patches = np.random.default_rng(1).standard_normal((96, 1176)).astype(np.float32)
  outs = []
  for bucket in (256, 512):
    p = plan([(1, 8, 12)], bucket, tower.cfg)
    padded = np.zeros((bucket, 1176), np.float32)
    padded[:96] = patches
    padded[96:] = 7.0  # garbage in the padding must not leak into real tokens
    out = np.asarray(encode(graphdef, params, padded, p.arrays))
    assert out.shape == (bucket // 4, 48) and not out[24:].any()
    outs.append(out[:24])
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("grids", [[(1, 8, 12)], [(1, 10, 6), (2, 4, 14)], [(3, 6, 6), (1, 2, 2), (1, 16, 18)]])
def test_plan_matches_transformers_indices(grids):
  """Window permutation, rotary ids and both kinds of segments equal transformers' for the real tokens."""
  from transformers import vision_utils

  cfg = VisionConfig(**{**VISION, "fullatt_block_indexes": (1, 3)})
  n = sum(t * h * w for t, h, w in grids)
  p = plan(grids, 1024, cfg)
  a = p.arrays
  thw = torch.tensor(grids)
  window_index, cu_windows = vision_utils.get_vision_window_index(thw, 2, 56, 14)
  expected_patch = (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
  np.testing.assert_array_equal(a.patch_index[:n], expected_patch)
  np.testing.assert_array_equal(a.patch_index[n:], np.arange(n, 1024))
  positions = vision_utils.get_vision_position_ids(thw, 2).numpy()  # processor order
  np.testing.assert_array_equal(a.positions[:n], positions[expected_patch])
  cu_frames = vision_utils.get_vision_cu_seqlens(thw).numpy()
  for segments, cu in ((a.window_segments, cu_windows.numpy()), (a.frame_segments, cu_frames)):
    assert (segments[n:] == -1).all()
    starts = np.flatnonzero(np.diff(segments[:n], prepend=-2))  # segment runs are contiguous and distinct
    assert len(np.unique(segments[:n])) == len(starts)
    np.testing.assert_array_equal(np.append(starts, n), cu)
  assert a.valid.sum() == n and a.valid[:n].all()
  np.testing.assert_array_equal(a.patch_index[::4][a.merge_restore] // 4, np.arange(256))
  assert p.tokens == [t * h * w // 4 for t, h, w in grids]


def test_windowed_attention_reads_only_nearby_keys():
  """kv_span and query blocks change the schedule, never the result: against one dense masked softmax."""
  rng = np.random.default_rng(2)
  p, n, h, span = 256, 2, 8, 16
  q, k, v = (jnp.asarray(rng.standard_normal((p, n, h)), jnp.float32) for _ in range(3))
  lengths = rng.integers(1, span + 1, size=p)
  segments = np.repeat(np.arange(p), lengths)[:p].astype(np.int32)
  mask = segments[:, None] == segments[None, :]
  scores = np.einsum("qnh,knh->nqk", q, k) / np.sqrt(h)
  probs = np.exp(np.where(mask, scores, -np.inf) - np.where(mask, scores, -np.inf).max(-1, keepdims=True))
  dense = np.einsum("nqk,knh->qnh", probs / probs.sum(-1, keepdims=True), v)
  for block_q, kv_span in ((32, span), (64, span), (256, None), (16, None)):
    got = vision_attention_reference(q, k, v, jnp.asarray(segments), block_q=block_q, kv_span=kv_span)
    np.testing.assert_allclose(np.asarray(got), dense, atol=1e-5, rtol=0, err_msg=f"{block_q}, {kv_span}")


def test_thirty_image_sizes_compile_one_program_per_bucket(tiny_vl):
  tower = _load_tower(tiny_vl[0], max_query_block=128)  # its own graphdef: no programs cached by other tests
  buckets = PatchBuckets(maximum=2048)
  assert buckets.sizes == (256, 512, 1024, 2048)
  rng = np.random.default_rng(3)
  grids = [(int(rng.integers(1, 3)), 2 * int(rng.integers(1, 17)), 2 * int(rng.integers(1, 17))) for _ in range(30)]
  images = [(rng.standard_normal((t * h * w, 1176)).astype(np.float32), (t, h, w)) for t, h, w in grids]
  with count_compilations() as compiled:
    for image in images:
      [out] = tower.encode_images([image], buckets)
      assert out.shape == (image[0].shape[0] // 4, 48)
  used = {buckets.bucket(t * h * w) for t, h, w in grids}
  assert len(used) >= 3  # the sizes really span several buckets
  encodes = sum(c for name, c in compiled.items() if "encode_impl" in name)
  assert encodes == len(used) and sum(compiled.values()) == len(used), compiled

  with count_compilations() as again:  # warm: nothing compiles, even packing several images per call
    tower.encode_images(images[:6], buckets)
  assert sum(again.values()) == 0, again


def test_too_many_patches_is_a_clear_error(tiny_vl):
  cfg = VisionConfig(**{**VISION, "fullatt_block_indexes": (1, 3)})
  with pytest.raises(InputError, match=r"4096 patches .* exceed the vision bucket of 1024 patches"):
    plan([(1, 64, 64)], 1024, cfg)
  with pytest.raises(InputError, match=r"5000 patches exceed the largest vision bucket \(2048 patches\)"):
    PatchBuckets(maximum=2048).bucket(5000)
  with pytest.raises(InputError, match=r"image 1: 4096 patches"):
    nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0))).encode_images(
        [(np.zeros((16, 1176), np.float32), (1, 4, 4)), (np.zeros((4096, 1176), np.float32), (1, 64, 64))],
        PatchBuckets(maximum=2048))
  with pytest.raises(InputError, match=r"image 0: grid_thw \(1, 3, 4\)"):
    plan([(1, 3, 4)], 256, cfg)


def test_config_from_released_and_transformers5_forms(tiny_vl):
  released = {  # Qwen2.5-VL-7B-Instruct's vision_config as shipped
      "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
      "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
      "temporal_patch_size": 2}
  assert VisionConfig.from_hf(released) == VISION_PRESETS["qwen2.5-vl-7b"]
  assert VisionConfig.from_hf({"vision_config": released, "model_type": "qwen2_5_vl"}) == VISION_PRESETS[
      "qwen2.5-vl-7b"]
  saved = json.loads((tiny_vl[0] / "config.json").read_text())  # transformers 5: rope_parameters, in_channels
  assert VisionConfig.from_hf(saved) == VisionConfig(**{**VISION, "fullatt_block_indexes": (1, 3)})
  from qwenjax import ConfigError
  with pytest.raises(ConfigError, match="'out_hidden_size' is missing"):
    VisionConfig.from_hf({k: v for k, v in released.items() if k != "out_hidden_size"})


@pytest.mark.parametrize("name", sorted(VISION_PRESETS))
def test_presets_declare_the_released_checkpoint_shapes(name):
  cfg = VISION_PRESETS[name]
  tower = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(tower, nnx.Param)))
  assert count == cfg.num_params()
  tensors = expected_tensors(tower)
  assert len(tensors) == 1 + 32 * 12 + 5
  assert tensors["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
  assert tensors["visual.blocks.31.attn.qkv.weight"] == (3840, 1280)
  assert tensors["visual.blocks.0.mlp.down_proj.weight"] == (1280, cfg.intermediate_size)
  assert tensors["visual.merger.mlp.2.weight"] == (cfg.out_hidden_size, 5120)
