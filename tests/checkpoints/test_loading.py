"""Safetensors loading: sharded checkpoints, tensor-by-tensor memory, and one clear error per bad checkpoint."""

import json
import shutil
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from flax import nnx

from qwenjax import CheckpointError
from qwenjax.checkpoints.hf import SafetensorsSource, load_model


@pytest.fixture(scope="module")
def tiny(tiny_factory):
  return tiny_factory("loading", num_hidden_layers=4, num_key_value_heads=2)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _weights(model):
  return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_loaded_weights_equal_the_torch_tensors(tiny):
  path, hf = tiny
  model = load_model(path, scan_layers=False)
  sd = hf.state_dict()
  w = _weights(model)
  np.testing.assert_array_equal(w["layers/2/attn/q_kernel"],
                                sd["model.layers.2.self_attn.q_proj.weight"].numpy().T.reshape(64, 8, 8))
  np.testing.assert_array_equal(w["layers/1/attn/o_kernel"],
                                sd["model.layers.1.self_attn.o_proj.weight"].numpy().T.reshape(8, 8, 64))
  np.testing.assert_array_equal(w["layers/3/mlp/down"], sd["model.layers.3.mlp.down_proj.weight"].numpy().T)
  np.testing.assert_array_equal(w["lm_head"], sd["lm_head.weight"].numpy())


def test_sharded_checkpoint_loads_the_same(tiny, tmp_path):
  path, hf = tiny
  hf.save_pretrained(tmp_path, max_shard_size="100KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
  a, b = _weights(load_model(path)), _weights(load_model(tmp_path))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_host_memory_peaks_near_one_copy_of_the_weights(tiny_factory):
  """Numpy allocations while loading peak at one copy of the weights plus one stacked weight in flight.

  (On CPU, jax may keep the filled numpy buffer as the device array itself, so the weights are counted here
  once; a loader that held every tensor twice would peak near twice `total`.)
  """
  path, _ = tiny_factory("memory", vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                         num_key_value_heads=2)
  total = sum(t.nbytes for t in safetensors.numpy.load_file(str(path / "model.safetensors")).values())
  tracemalloc.start()
  load_model(path, scan_layers=True)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  largest_stack = 8 * 128 * 256 * 4  # one [L, D, F] MLP weight in float32
  assert peak < total + 2 * largest_stack < 2 * total, (peak, largest_stack, total)


def _rewrite(path, edit):
  tensors = safetensors.torch.load_file(str(path / "model.safetensors"))
  edit(tensors)
  safetensors.torch.save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tiny, tmp_path):
  d = _copy(tiny[0], tmp_path / "ckpt")
  _rewrite(d, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' is missing"):
    load_model(d)


def test_unexpected_tensor_is_named(tiny, tmp_path):
  d = _copy(tiny[0], tmp_path / "ckpt")
  _rewrite(d, lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(2)))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.9\.mlp"):
    load_model(d)


def test_misshaped_tensor_is_named_with_both_shapes(tiny, tmp_path):
  d = _copy(tiny[0], tmp_path / "ckpt")
  _rewrite(d, lambda t: t.__setitem__("model.layers.1.self_attn.k_proj.weight", torch.zeros(16, 63)))
  with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(16, 63\), "
                                            r"expected \(16, 64\)"):
    load_model(d)


def test_truncated_file_is_one_clear_error(tiny, tmp_path):
  d = _copy(tiny[0], tmp_path / "ckpt")
  f = d / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(CheckpointError, match=r"model\.safetensors"):
    load_model(d)


def test_bad_header_is_one_clear_error(tiny, tmp_path):
  d = _copy(tiny[0], tmp_path / "ckpt")
  f = d / "model.safetensors"
  data = bytearray(f.read_bytes())
  data[8:16] = b"not json"
  f.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
    SafetensorsSource(d)


def test_nan_weights_are_refused(tiny, tmp_path):
  d = _copy(tiny[0], tmp_path / "ckpt")
  _rewrite(d, lambda t: t["model.norm.weight"].__setitem__(3, float("nan")))
  with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' holds NaN"):
    load_model(d)


def test_pickle_checkpoints_are_never_loaded(tiny, tmp_path):
  d = tmp_path / "ckpt"
  d.mkdir()
  shutil.copy(tiny[0] / "config.json", d)
  torch.save(tiny[1].state_dict(), d / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="pickle files are never loaded"):
    load_model(d)


def test_index_naming_a_missing_shard(tiny, tmp_path):
  tiny[1].save_pretrained(tmp_path, max_shard_size="100KB")
  shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed in the index is missing"):
    load_model(tmp_path)


def test_index_with_a_wrong_entry(tiny, tmp_path):
  tiny[1].save_pretrained(tmp_path, max_shard_size="100KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  wrong = next(n for n, f in index["weight_map"].items() if f != files[0])
  index["weight_map"][wrong] = files[0]
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=f"the index lists tensor '{wrong}', but that file lacks it"):
    load_model(tmp_path)
