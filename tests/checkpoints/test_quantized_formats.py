"""GPTQ and AWQ checkpoints dequantized exactly: weights packed here by each format's own rules (the loops of
AutoGPTQ's `QuantLinear.pack`, GPTQModel's v2 -> v1 conversion and AutoAWQ's `WQLinear_GEMM.from_linear`, written
out independently of qwenjax's unpacking) must come back as (q - z) * s, bit for bit."""

import importlib
import importlib.util
import json
import pathlib
import re
import sys
import types

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

from qwenjax import CheckpointError
from qwenjax.checkpoints import quantized_formats as qf
from qwenjax.checkpoints.hf import SafetensorsSource, load_from_source, load_model, read_config
from qwenjax.model.layers import QuantizedWeight

# --- Packers, following the formats' own code ----------------------------------------------------------------------


def autogptq_qweight(intweight, bits):
  """AutoGPTQ QuantLinear.pack: int values [I, O] -> qweight int32 [I * bits / 32, O], along the input."""
  intweight = intweight.astype(np.uint32)
  qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), np.uint32)
  i = row = 0
  while row < qweight.shape[0]:
    for j in range(i, i + 32 // bits):
      qweight[row] |= intweight[j] << (bits * (j - i))
    i += 32 // bits
    row += 1
  return qweight.astype(np.int32)


def autogptq_qzeros(zeros, bits, v1=True):
  """AutoGPTQ QuantLinear.pack: zero points [G, O] -> qzeros int32 [G, O * bits / 32], along the output; v1 stores
  `zeros -= 1` (and gptq_v2, GPTQModel's own format, the zeros themselves)."""
  zeros = (zeros.astype(np.int64) - (1 if v1 else 0)).astype(np.uint32)
  qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), np.uint32)
  i = col = 0
  while col < qzeros.shape[1]:
    for j in range(i, i + 32 // bits):
      qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
    i += 32 // bits
    col += 1
  return qzeros.astype(np.int32)


def gptqmodel_v1_qzeros(zeros, bits):
  """GPTQModel's convert_gptq_v2_to_v1_format: the v2 words minus 0b0001..0001 (one 1 per field), word-wide."""
  v2 = autogptq_qzeros(zeros, bits, v1=False).view(np.uint32)
  return (v2 - np.uint32(sum(1 << (bits * k) for k in range(32 // bits)))).view(np.int32)


def autoawq_pack(values, bits=4):
  """AutoAWQ WQLinear_GEMM.from_linear: [rows, O] -> int32 [rows, O / 8], output 8c + order_map[i] at nibble i."""
  order_map = [0, 2, 4, 6, 1, 3, 5, 7]
  pack_num = 32 // bits
  values = values.astype(np.uint32)
  packed = np.zeros((values.shape[0], values.shape[1] // 32 * bits), np.uint32)
  for col in range(values.shape[1] // pack_num):
    for i in range(pack_num):
      packed[:, col] |= values[:, col * pack_num + order_map[i]] << (i * bits)
  return packed.astype(np.int32)


def grid_weight(q, z, s, g_idx):
  """(q - z) * s as the float32 [O, I] a float checkpoint holds: q [I, O]; z, s [G, O]; g_idx [I]."""
  w = (q.astype(np.float64) - z[g_idx].astype(np.float64)) * s[g_idx].astype(np.float64)
  return w.T.astype(np.float32)


def random_grid(rng, in_features, out, bits, g, *, zero_low=0):
  q = rng.integers(0, 2**bits, size=(in_features, out))
  z = rng.integers(zero_low, 2**bits, size=(g, out))
  z[0, :2] = zero_low, 2**bits - 1  # the extremes of the zero range
  s = rng.uniform(1e-3, 0.1, size=(g, out)).astype(np.float16)
  s[0, 2] = np.float16(65504)  # fp16's largest scale: the product still fits float32 exactly
  return q, z, s


class DictSource:
  """A TensorSource over a dict, counting reads."""

  def __init__(self, tensors, file="fake.safetensors"):
    self.tensors, self.file, self.reads = dict(tensors), file, []

  def tensor_names(self):
    return list(self.tensors)

  def tensor_shape(self, name):
    return tuple(self.tensors[name].shape)

  def get_tensor(self, name):
    self.reads.append(name)
    return self.tensors[name]

  def describe(self, name=None):
    return self.file


GPTQ_CFG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
            "checkpoint_format": "gptq"}
AWQ_CFG = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}

# --- GPTQ ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_dequantizes_to_the_integer_grid(bits, group_size, fmt):
  rng = np.random.default_rng(bits)
  in_features, out = 384, 64
  g = 1 if group_size == -1 else in_features // group_size
  q, z, s = random_grid(rng, in_features, out, bits, g, zero_low=1 if fmt == "gptq" else 0)
  g_idx = (np.arange(in_features) // (in_features if group_size == -1 else group_size)).astype(np.int32)
  w = qf.dequantize_gptq(autogptq_qweight(q, bits), autogptq_qzeros(z, bits, v1=fmt == "gptq"), s, g_idx,
                         bits=bits, group_size=group_size, checkpoint_format=fmt)
  assert w.dtype == np.float32 and w.shape == (out, in_features)
  np.testing.assert_array_equal(w, grid_weight(q, z, s, g_idx))
  np.testing.assert_array_equal(qf.dequantize_gptq(autogptq_qweight(q, bits),
                                                   autogptq_qzeros(z, bits, v1=fmt == "gptq"), s, None, bits=bits,
                                                   group_size=group_size, checkpoint_format=fmt), w)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_desc_act_follows_a_permuted_g_idx(bits):
  """desc_act quantizes inputs in a permuted order: g_idx scatters each group over the (unpermuted) rows."""
  rng = np.random.default_rng(7)
  in_features, out, group_size = 512, 32, 128
  perm = rng.permutation(in_features)
  g_idx = np.empty(in_features, np.int32)
  g_idx[perm] = np.arange(in_features) // group_size
  q, z, s = random_grid(rng, in_features, out, bits, in_features // group_size, zero_low=1)
  w = qf.dequantize_gptq(autogptq_qweight(q, bits), autogptq_qzeros(z, bits), s, g_idx, bits=bits,
                         group_size=group_size)
  np.testing.assert_array_equal(w, grid_weight(q, z, s, g_idx))
  uneven = rng.integers(0, in_features // group_size, size=in_features).astype(np.int32)  # act-group-aware orders
  np.testing.assert_array_equal(
      qf.dequantize_gptq(autogptq_qweight(q, bits), autogptq_qzeros(z, bits), s, uneven, bits=bits,
                         group_size=group_size), grid_weight(q, z, s, uneven))


def test_gptq_last_group_may_be_short():
  """AutoGPTQ allots ceil(I / group_size) groups: 320 inputs in groups of 128 leave a last group of 64."""
  rng = np.random.default_rng(3)
  q, z, s = random_grid(rng, 320, 32, 4, 3, zero_low=1)
  g_idx = np.arange(320) // 128
  w = qf.dequantize_gptq(autogptq_qweight(q, 4), autogptq_qzeros(z, 4), s, None, bits=4, group_size=128)
  np.testing.assert_array_equal(w, grid_weight(q, z, s, g_idx))


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_v1_zero_of_zero_as_gptqmodel_writes_it(bits):
  """An asymmetric zero point of 0 is -1 in v1: GPTQModel writes it by a word-wide subtraction (borrowing from the
  next field), and the word-wide +1 used here undoes it exactly."""
  rng = np.random.default_rng(5)
  q, z, s = random_grid(rng, 128, 64, bits, 1)
  z[0, ::3] = 0
  g_idx = np.zeros(128, np.int64)
  w = qf.dequantize_gptq(autogptq_qweight(q, bits), gptqmodel_v1_qzeros(z, bits), s, g_idx, bits=bits,
                         group_size=-1, checkpoint_format="gptq")
  np.testing.assert_array_equal(w, grid_weight(q, z, s, g_idx))


def _package_dir(package):
  """Where an installed package lives, found without running its __init__ (skips when it is not installed)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    pytest.skip(f"{package} is not installed")
  return pathlib.Path(spec.submodule_search_locations[0])


def _load_file(path, module_name):
  file_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(file_spec)
  file_spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_matches_autogptqs_own_pack_and_dequantization(bits, desc_act):
  """AutoGPTQ's QuantLinear (qlinear_cuda.py, its CPU path) packs a float weight and dequantizes it again; both
  agree with ours. (auto_gptq's package __init__ does not import under transformers 5, so the file is loaded.)"""
  ql = _load_file(_package_dir("auto_gptq") / "nn_modules/qlinear/qlinear_cuda.py", "_autogptq_qlinear_cuda")
  rng = np.random.default_rng(11)
  in_features, out, group_size = 256, 64, 64
  g = in_features // group_size
  g_idx = np.arange(in_features) // group_size
  if desc_act:
    g_idx = g_idx[rng.permutation(in_features)]
  q, z, s = random_grid(rng, in_features, out, bits, g, zero_low=1)
  w = grid_weight(q, z, s, g_idx)
  linear = torch.nn.Linear(in_features, out, bias=False)
  linear.weight.data = torch.from_numpy(w)
  layer = ql.QuantLinear(bits, group_size, in_features, out, bias=False, weight_dtype=torch.float32)
  layer.pack(linear, torch.from_numpy(s.astype(np.float32).T.copy()), torch.from_numpy(z.T.copy()),
             g_idx=torch.from_numpy(g_idx.astype(np.int32)))
  mine = qf.dequantize_gptq(layer.qweight.numpy(), layer.qzeros.numpy(), layer.scales.numpy(), layer.g_idx.numpy(),
                            bits=bits, group_size=group_size)
  np.testing.assert_array_equal(mine, w)
  with torch.no_grad():
    theirs = layer(torch.eye(in_features)).numpy()  # [I, O]: x @ W with x = I
  np.testing.assert_array_equal(mine, theirs.T)


def test_bfloat16_and_float32_scales_are_read_as_they_are():
  """GPTQModel may store bfloat16 or float32 scales; each is used at its own value."""
  rng = np.random.default_rng(9)
  q, z, s = random_grid(rng, 256, 32, 4, 2, zero_low=1)
  g_idx = np.arange(256) // 128
  for dtype in (ml_dtypes.bfloat16, np.float32):
    scales = (s.astype(np.float32) * 1.001).astype(dtype)
    w = qf.dequantize_gptq(autogptq_qweight(q, 4), autogptq_qzeros(z, 4), scales, g_idx, bits=4, group_size=128)
    np.testing.assert_array_equal(w, grid_weight(q, z, scales.astype(np.float64), g_idx))


# --- AWQ -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [128, -1])
def test_awq_gemm_dequantizes_to_the_integer_grid(group_size):
  rng = np.random.default_rng(1)
  in_features, out = 256, 64
  g = 1 if group_size == -1 else in_features // group_size
  q, z, s = random_grid(rng, in_features, out, 4, g)
  g_idx = np.arange(in_features) // (in_features if group_size == -1 else group_size)
  w = qf.dequantize_awq(autoawq_pack(q), autoawq_pack(z), s, bits=4, group_size=group_size)
  assert w.dtype == np.float32 and w.shape == (out, in_features)
  np.testing.assert_array_equal(w, grid_weight(q, z, s, g_idx))


@pytest.fixture
def autoawq():
  """AutoAWQ's modules, imported with its package __init__ (which needs `datasets`) skipped: `awq` and its
  subpackages are stand-ins with the real __path__, removed again afterwards."""
  root = _package_dir("awq")
  before = set(sys.modules)
  for package in ("awq", "awq.utils", "awq.modules", "awq.modules.linear"):
    stand_in = types.ModuleType(package)
    stand_in.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
    sys.modules[package] = stand_in
  try:
    yield types.SimpleNamespace(packing=importlib.import_module("awq.utils.packing_utils"),
                                gemm=importlib.import_module("awq.modules.linear.gemm"))
  finally:
    for name in set(sys.modules) - before:
      del sys.modules[name]


def test_awq_matches_autoawqs_own_pack_and_dequantization(autoawq):
  """AutoAWQ's WQLinear_GEMM.from_linear packs a float weight and its dequantize_gemm unpacks it; both agree with
  ours."""
  packing, gemm = autoawq.packing, autoawq.gemm
  assert tuple(packing.AWQ_REVERSE_ORDER) == qf.AWQ_REVERSE_ORDER and tuple(packing.AWQ_ORDER) == qf.AWQ_ORDER
  rng = np.random.default_rng(2)
  in_features, out, group_size = 256, 64, 64
  q, z, s = random_grid(rng, in_features, out, 4, in_features // group_size)
  w = grid_weight(q, z, s, np.arange(in_features) // group_size)
  linear = torch.nn.Linear(in_features, out, bias=False)
  linear.weight.data = torch.from_numpy(w)
  layer = gemm.WQLinear_GEMM.from_linear(linear, 4, group_size, scales=torch.from_numpy(s.astype(np.float32)),
                                         zeros=torch.from_numpy(z.astype(np.float32)))
  mine = qf.dequantize_awq(layer.qweight.numpy(), layer.qzeros.numpy(), layer.scales.numpy(), bits=4,
                           group_size=group_size)
  np.testing.assert_array_equal(mine, w)
  theirs = packing.dequantize_gemm(layer.qweight, layer.qzeros, layer.scales.float(), 4, group_size)  # [I, O]
  np.testing.assert_array_equal(mine, theirs.numpy().T)


# --- quantization_config -------------------------------------------------------------------------------------------

# As Qwen2.5-*-Instruct-GPTQ-Int4 and -AWQ ship them in config.json (optimum's GPTQ config, AutoAWQ's GEMM).
QWEN_GPTQ = {"batch_size": 1, "bits": 4, "block_name_to_quantize": None, "cache_block_outputs": True,
             "damp_percent": 0.01, "dataset": None, "desc_act": False, "exllama_config": {"version": 1},
             "group_size": 128, "max_input_length": None, "model_seqlen": None,
             "module_name_preceding_first_block": None, "modules_in_block_to_quantize": None, "pad_token_id": None,
             "quant_method": "gptq", "sym": True, "tokenizer": None, "true_sequential": True, "use_cuda_fp16": False,
             "use_exllama": True}
QWEN_AWQ = {"bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq", "version": "gemm",
            "zero_point": True}


def test_quantization_config_of_qwens_releases(tmp_path):
  assert qf.quantization_config({"model_type": "qwen2"}, tmp_path) is None
  gptq = qf.quantization_config({"quantization_config": QWEN_GPTQ}, tmp_path)
  assert {k: v for k, v in gptq.items() if k != "source"} == GPTQ_CFG
  assert gptq["source"] == str(tmp_path / "config.json")
  awq = qf.quantization_config({"quantization_config": QWEN_AWQ}, None)
  assert {k: v for k, v in awq.items() if k != "source"} == AWQ_CFG
  v2 = qf.quantization_config({"quantization_config": {**QWEN_GPTQ, "bits": 8, "format": "gptq_v2"}}, None)
  assert (v2["bits"], v2["checkpoint_format"]) == (8, "gptq_v2")


def test_quantization_config_from_separate_files(tmp_path):
  (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": -1, "desc_act": True}))
  cfg = qf.quantization_config({"model_type": "qwen2"}, tmp_path)
  assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["desc_act"]) == ("gptq", 8, -1, True)
  assert cfg["source"] == str(tmp_path / "quantize_config.json")
  awq_dir = tmp_path / "awq"
  awq_dir.mkdir()
  (awq_dir / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 64, "w_bit": 4,
                                                         "version": "GEMM"}))
  cfg = qf.quantization_config({}, awq_dir)
  assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["version"]) == ("awq", 4, 64, "gemm")


@pytest.mark.parametrize("raw, message", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quant_method 'fp8' is not supported"),
    ({**QWEN_GPTQ, "bits": 3}, "3-bit GPTQ is not supported"),
    ({**QWEN_GPTQ, "checkpoint_format": "marlin"}, "GPTQ checkpoint_format 'marlin' is not supported"),
    ({**QWEN_GPTQ, "dynamic": {"-:.*down_proj": {}}}, "per-module GPTQ overrides"),
    ({**QWEN_GPTQ, "group_size": 0}, "group_size 0 is invalid"),
    ({**QWEN_AWQ, "bits": 8}, "8-bit AWQ is not supported"),
    ({**QWEN_AWQ, "version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({**QWEN_AWQ, "version": None, "format": "gemv_fast"}, "AWQ version 'gemv_fast' is not supported"),
    ({**QWEN_AWQ, "zero_point": False}, "zero_point false"),
])
def test_unsupported_quantization_is_one_clear_error(tmp_path, raw, message):
  with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'config.json'}: ") + ".*" + re.escape(message)):
    qf.quantization_config({"quantization_config": raw}, tmp_path)


# --- DequantizedSource ---------------------------------------------------------------------------------------------


def _gptq_linear(rng, prefix, in_features=256, out=64, bits=4, group_size=128):
  g = in_features // group_size
  q, z, s = random_grid(rng, in_features, out, bits, g, zero_low=1)
  g_idx = (np.arange(in_features) // group_size).astype(np.int32)
  tensors = {f"{prefix}.qweight": autogptq_qweight(q, bits), f"{prefix}.qzeros": autogptq_qzeros(z, bits),
             f"{prefix}.scales": s, f"{prefix}.g_idx": g_idx}
  return tensors, grid_weight(q, z, s, g_idx)


def test_source_presents_float_weights_and_reads_one_linear_at_a_time():
  rng = np.random.default_rng(4)
  up, up_w = _gptq_linear(rng, "model.layers.0.mlp.up_proj")
  q_proj, q_w = _gptq_linear(rng, "model.layers.0.self_attn.q_proj", out=32)
  bias = rng.standard_normal(32).astype(np.float32)
  base = DictSource({**up, **q_proj, "model.layers.0.self_attn.q_proj.bias": bias,
                     "model.norm.weight": np.ones(8, np.float32)})
  src = qf.DequantizedSource(base, {**GPTQ_CFG, "group_size": 128})
  assert src.tensor_names() == ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                                "model.layers.0.self_attn.q_proj.bias", "model.norm.weight"]
  assert src.tensor_shape("model.layers.0.mlp.up_proj.weight") == (64, 256)
  assert src.tensor_shape("model.layers.0.self_attn.q_proj.weight") == (32, 256)
  assert base.reads == []  # building the source and its shapes reads headers only
  np.testing.assert_array_equal(src.get_tensor("model.layers.0.self_attn.q_proj.weight"), q_w)
  assert sorted(base.reads) == sorted(q_proj)
  np.testing.assert_array_equal(src.get_tensor("model.layers.0.mlp.up_proj.weight"), up_w)
  np.testing.assert_array_equal(src.get_tensor("model.layers.0.self_attn.q_proj.bias"), bias)
  assert src.describe("model.layers.0.mlp.up_proj.weight") == "fake.safetensors"


def test_missing_companion_tensor_is_named():
  tensors, _ = _gptq_linear(np.random.default_rng(0), "model.layers.0.mlp.up_proj")
  del tensors["model.layers.0.mlp.up_proj.scales"]
  with pytest.raises(CheckpointError, match=r"fake\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.scales' "
                                            r"is missing; a GPTQ linear needs"):
    qf.DequantizedSource(DictSource(tensors), GPTQ_CFG)


def test_g_idx_is_needed_only_with_desc_act():
  tensors, w = _gptq_linear(np.random.default_rng(0), "model.layers.0.mlp.up_proj")
  del tensors["model.layers.0.mlp.up_proj.g_idx"]
  src = qf.DequantizedSource(DictSource(tensors), GPTQ_CFG)
  np.testing.assert_array_equal(src.get_tensor("model.layers.0.mlp.up_proj.weight"), w)
  with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.g_idx' is missing; a GPTQ with "
                                            r"desc_act linear"):
    qf.DequantizedSource(DictSource(tensors), {**GPTQ_CFG, "desc_act": True})


def test_misshaped_companion_is_named_with_both_shapes():
  tensors, _ = _gptq_linear(np.random.default_rng(0), "model.layers.0.mlp.up_proj")
  tensors["model.layers.0.mlp.up_proj.scales"] = np.ones((3, 64), np.float16)
  with pytest.raises(CheckpointError, match=r"fake\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.scales' "
                                            r"has shape \(3, 64\), expected \(2, 64\) for 4-bit GPTQ"):
    qf.DequantizedSource(DictSource(tensors), GPTQ_CFG)
  tensors, _ = _gptq_linear(np.random.default_rng(0), "model.layers.0.mlp.up_proj")
  with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.g_idx' has shape \(256,\), "
                                            r"expected \(128,\) for 8-bit GPTQ"):
    qf.DequantizedSource(DictSource(tensors), {**GPTQ_CFG, "bits": 8})  # the config's bits do not fit the tensors


def test_float_and_quantized_weight_of_one_linear_is_refused():
  tensors, w = _gptq_linear(np.random.default_rng(0), "model.layers.0.mlp.up_proj")
  tensors["model.layers.0.mlp.up_proj.weight"] = w
  with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' is stored beside"):
    qf.DequantizedSource(DictSource(tensors), GPTQ_CFG)


def test_a_quantized_embedding_is_refused():
  tensors, _ = _gptq_linear(np.random.default_rng(0), "model.embed_tokens")
  with pytest.raises(CheckpointError, match=r"'model\.embed_tokens\.qweight' is a quantized embedding"):
    qf.DequantizedSource(DictSource(tensors), GPTQ_CFG)


def test_bad_tensor_data_is_named():
  tensors, _ = _gptq_linear(np.random.default_rng(0), "model.layers.0.mlp.up_proj")
  bad_dtype = {**tensors, "model.layers.0.mlp.up_proj.qweight": np.zeros((32, 64), np.float32)}
  with pytest.raises(CheckpointError, match=r"fake\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.qweight' "
                                            r"has dtype float32, expected int32 words"):
    qf.DequantizedSource(DictSource(bad_dtype), GPTQ_CFG).get_tensor("model.layers.0.mlp.up_proj.weight")
  bad_g_idx = {**tensors, "model.layers.0.mlp.up_proj.g_idx": np.full(256, 2, np.int32)}
  with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.g_idx' puts input 0 in group 2, "
                                            r"outside the 2 groups"):
    qf.DequantizedSource(DictSource(bad_g_idx), GPTQ_CFG).get_tensor("model.layers.0.mlp.up_proj.weight")
  with pytest.raises(CheckpointError, match="3-bit GPTQ is not supported"):
    qf.dequantize_gptq(tensors["model.layers.0.mlp.up_proj.qweight"], tensors["model.layers.0.mlp.up_proj.qzeros"],
                       tensors["model.layers.0.mlp.up_proj.scales"], None, bits=3, group_size=128)


# --- A whole tiny checkpoint ---------------------------------------------------------------------------------------

_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def _quantize(w, method, bits, group_size, rng, desc_act):
  """A float weight [O, I] -> (checkpoint tensors of the linear, its integer-grid weight [O, I]): GPTQ symmetric
  (z = 2^(bits-1)), AWQ asymmetric (z from each group's min and max)."""
  out, in_features = w.shape
  groups = np.arange(in_features) // group_size
  if desc_act:
    groups = groups[rng.permutation(in_features)]
  g = in_features // group_size
  wt = w.T.astype(np.float64)  # [I, O]
  s, z = np.empty((g, out), np.float16), np.empty((g, out), np.int64)
  for k in range(g):
    rows = wt[groups == k]
    if method == "gptq":
      s[k] = np.maximum(np.abs(rows).max(0), 1e-3) / (2 ** (bits - 1) - 1)
      z[k] = 2 ** (bits - 1)
    else:
      lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
      s[k] = np.maximum(hi - lo, 1e-3) / (2**bits - 1)
      z[k] = np.clip(np.round(-lo / s[k].astype(np.float64)), 0, 2**bits - 1)
  q = np.clip(np.round(wt / s[groups].astype(np.float64)) + z[groups], 0, 2**bits - 1).astype(np.int64)
  if method == "gptq":
    tensors = {"qweight": autogptq_qweight(q, bits), "qzeros": autogptq_qzeros(z, bits), "scales": s,
               "g_idx": groups.astype(np.int32)}
  else:
    tensors = {"qweight": autoawq_pack(q, bits), "qzeros": autoawq_pack(z, bits), "scales": s}
  return tensors, grid_weight(q, z, s, groups)


@pytest.mark.parametrize("method, bits, desc_act", [("gptq", 4, False), ("gptq", 8, True), ("awq", 4, False)])
def test_a_quantized_tiny_qwen2_reads_as_its_integer_grid(tiny_factory, tmp_path, method, bits, desc_act):
  float_dir, hf = tiny_factory("quantized_formats", num_hidden_layers=2)
  rng = np.random.default_rng(bits)
  group_size = 32
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  tensors, grids = {}, {}
  for name, value in safetensors.numpy.load_file(str(float_dir / "model.safetensors")).items():
    if not _LINEAR.fullmatch(name):
      tensors[name] = value
      continue
    parts, grids[name] = _quantize(state[name], method, bits, group_size, rng, desc_act)
    tensors.update({f"{name[:-len('.weight')]}.{part}": v for part, v in parts.items()})
  assert len(grids) == 2 * 7
  d = tmp_path / f"{method}-int{bits}"
  d.mkdir()
  safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
  hf_config = json.loads((float_dir / "config.json").read_text())
  hf_config["quantization_config"] = (
      {**QWEN_GPTQ, "bits": bits, "group_size": group_size, "desc_act": desc_act} if method == "gptq"
      else {**QWEN_AWQ, "group_size": group_size})
  (d / "config.json").write_text(json.dumps(hf_config))

  qcfg = qf.quantization_config(json.loads((d / "config.json").read_text()), d)
  src = qf.DequantizedSource(SafetensorsSource(d), qcfg)
  float_src = SafetensorsSource(float_dir)
  assert sorted(src.tensor_names()) == sorted(float_src.tensor_names())
  for name in float_src.tensor_names():
    assert src.tensor_shape(name) == float_src.tensor_shape(name), name
    got = src.get_tensor(name)
    np.testing.assert_array_equal(got, grids[name] if name in grids else float_src.get_tensor(name), err_msg=name)
    if name in grids:  # the grid is the quantized weight, close to the float one it came from
      assert got.dtype == np.float32
      np.testing.assert_allclose(got, state[name], atol=np.abs(state[name]).max() / 2 ** (bits - 2))
  assert str(d / "model.safetensors") in src.describe("model.layers.1.mlp.down_proj.weight")

  model = load_from_source(read_config(d), src, scan_layers=False)  # the float loader, unchanged
  np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.down), grids["model.layers.1.mlp.down_proj.weight"].T)

  # load_model reads the directory the same way and serves it in int8, one scale per output channel: within half
  # an int8 step of the grid.
  served = load_model(d, scan_layers=False)
  down = served.layers[1].mlp.down
  assert isinstance(down, QuantizedWeight) and down.values[...].dtype == np.int8
  grid = grids["model.layers.1.mlp.down_proj.weight"].T  # [in, out]
  step = np.abs(grid).max(axis=0) / 127
  assert np.all(np.abs(np.asarray(down.dequantized()) - grid) <= step / 2 + 1e-7)
