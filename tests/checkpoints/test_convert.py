"""launch.convert and qwenjax.checkpoints.orbax_store: tiny Qwen2 (safetensors and GGUF) and Qwen2.5-VL checkpoints
converted to Orbax and restored bit-exactly, into one device and into a fake 8-device mesh; broken checkpoints."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenjax import CheckpointError, KVCache, load, prefill
from qwenjax.checkpoints import loader, orbax_store
from qwenjax.checkpoints.hf import load_model
from qwenjax.model.qwen2_vl import QwenVLConfig
from qwenjax.multimodal.processing import ImageProcessorConfig
from qwenjax.text.tokenizer import Tokenizer

from conftest import (
    build_tiny_qwen2,
    write_gguf_from_hf,
    output_major_paths,
    qwen_chat_template,
    save_tiny_tokenizer_dir,
    xla_flags,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
TEXTS = ["", "def fibonacci(n):\n    return n", "你好，世界！ Café 😀", "<|im_start|>user\nhi<|im_end|>\n",
         "<tool_call>\n{\"name\": \"f\"}\n</tool_call><|endoftext|>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Adds.", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A tiny Qwen2 safetensors checkpoint with the tiny Qwen2.5-style tokenizer and chat template."""
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("source"))
  tok = Tokenizer.from_directory(d)
  model = build_tiny_qwen2(d, vocab_size=640, bos_token_id=tok.pad_token_id,
                           eos_token_id=tok.token_to_id("<|im_end|>"))
  return d, model


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
  """The source converted by `python -m launch.convert`, in a subprocess."""
  out = tmp_path_factory.mktemp("converted") / "orbax"
  proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--source={source[0]}", f"--output={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout == f"{out}\n"
  return out


@pytest.fixture(scope="module")
def converted_int8(source, tmp_path_factory):
  """The source converted with `--quantize=int8 --quantize_embeddings`, in a subprocess."""
  out = tmp_path_factory.mktemp("converted_int8") / "orbax"
  proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--source={source[0]}", f"--output={out}",
                         "--quantize=int8", "--quantize_embeddings"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return out


def test_int8_checkpoint_restores_the_quantized_model_exactly(source, converted_int8):
  """int8 values and float32 scales on disk; restored, they equal the weights quantized while loading the source,
  and the logits are the quantized model's."""
  meta = json.loads((converted_int8 / "qwenjax_checkpoint.json").read_text())
  assert meta["quantize"] == "int8" and meta["quantize_embeddings"] is True and meta["dtype"] == "float32"
  arrays = {p.name for p in (converted_int8 / "params").iterdir() if (p / "zarr.json").exists()}
  assert {"layers.mlp.up.values", "layers.mlp.up.scale", "embed.values", "embed.scale"} <= arrays
  zarr = json.loads((converted_int8 / "params" / "layers.mlp.up.values" / "zarr.json").read_text())
  assert zarr["data_type"] == "int8"
  loaded = load_model(source[0], quantize="int8", quantize_embeddings=True, scan_layers=True)
  restored = {scan: load(str(converted_int8), scan_layers=scan).model for scan in (True, False)}
  assert all(m.quantize == "int8" and m.quantize_embeddings for m in restored.values())
  _assert_same_weights(restored[True], loaded)
  ids = jnp.asarray([[3, 17, 99, 4, 250, 7, 0, 0]], jnp.int32)
  logits = [np.asarray(prefill(*nnx.split(m), KVCache.zeros(m.cfg, 1, 16), ids, jnp.array([6]))[0])
            for m in (loaded, restored[True], restored[False])]
  np.testing.assert_array_equal(logits[0], logits[1])
  np.testing.assert_allclose(logits[0], logits[2], atol=1e-5, rtol=0)  # unrolled: another float32 order
  with pytest.raises(CheckpointError, match="holds 'int8' weights, not 'w8a8'"):
    load(str(converted_int8), quantize="w8a8")


def test_int8_checkpoints_of_either_layout_restore_into_the_other(source, converted_int8, tmp_path):
  """converted_int8 holds its projections [K..., O...], as every int8 checkpoint written before the output-major
  layout did. Restored where the processor's paths want output-major [O..., K...], each is transposed on load:
  the same matrices, the same logits. Saved again from there, the metadata names the output-major arrays, and a
  restore that wants [K..., O...] transposes them back to the original arrays."""
  from qwenjax.kernels import cpu_paths  # noqa: PLC0415

  assert json.loads((converted_int8 / "qwenjax_checkpoint.json").read_text())["int8_output_major"] == []
  with cpu_paths.using():
    as_stored = load(str(converted_int8), scan_layers=True)
  with cpu_paths.using(*output_major_paths()):
    converted = load(str(converted_int8), scan_layers=True)
    unrolled = load(str(converted_int8), scan_layers=False).model
    up = converted.model.layers.mlp.up
    assert up.output_major and up.values.shape == (3, 160, 64)  # the tiny model: 3 layers, D=64, F=160
    assert unrolled.layers[1].mlp.up.output_major
    np.testing.assert_array_equal(np.asarray(up.dequantized()), np.asarray(as_stored.model.layers.mlp.up.dequantized()))
    ids = jnp.asarray([[3, 17, 99, 4, 250, 7, 0, 0]], jnp.int32)
    logits = [np.asarray(prefill(*nnx.split(m), KVCache.zeros(m.cfg, 1, 16), ids, jnp.array([6]))[0])
              for m in (converted.model, unrolled)]
    again = tmp_path / "output_major"
    orbax_store.save(again, converted.model, converted.tokenizer,
                     json.loads((converted_int8 / "config.json").read_text()), source="test")
  with cpu_paths.using():
    want = np.asarray(prefill(*nnx.split(as_stored.model), KVCache.zeros(as_stored.model.cfg, 1, 16), ids,
                              jnp.array([6]))[0])
  np.testing.assert_allclose(logits[0], want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[1], want, atol=1e-5, rtol=0)
  meta = json.loads((again / "qwenjax_checkpoint.json").read_text())
  assert "layers.mlp.up.values" in meta["int8_output_major"] and "embed.values" not in meta["int8_output_major"]
  with cpu_paths.using():
    back = load(str(again), scan_layers=True).model
  _assert_same_weights(back, as_stored.model)


def _weights(model):
  return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_weights(a, b):
  wa, wb = _weights(a), _weights(b)
  assert wa.keys() == wb.keys()
  for path in wa:
    assert wa[path].dtype == wb[path].dtype, path
    np.testing.assert_array_equal(wa[path], wb[path], err_msg=str(path))


def _logits(model, ids):
  graphdef, params = nnx.split(model)
  logits, _ = prefill(graphdef, params, KVCache.zeros(model.cfg, 1, 256), np.asarray([ids], np.int32),
                      np.array([len(ids)], np.int32), all_logits=True)
  return np.asarray(logits)


def _assert_same_tokenizer(restored, original):
  assert restored.vocab_size == original.vocab_size
  assert restored.eos_token_ids == original.eos_token_ids
  assert restored.pad_token_id == original.pad_token_id
  assert restored.chat_template == original.chat_template
  present = lambda tok: {k: v for k, v in tok.special_tokens.items() if v is not None}
  assert present(restored) == present(original)
  for text in TEXTS:
    ids = original.encode(text)
    assert restored.encode(text) == ids, text
    assert restored.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)
  for tools in (None, TOOLS):
    assert restored.apply_chat_template(MESSAGES, tools=tools) == original.apply_chat_template(MESSAGES, tools=tools)


def test_layout_on_disk(source, converted):
  names = {p.name for p in converted.iterdir()}
  assert {"qwenjax_checkpoint.json", "config.json", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json", "params"} <= names
  assert "preprocessor_config.json" not in names
  meta = json.loads((converted / "qwenjax_checkpoint.json").read_text())
  assert meta == {"format": "qwenjax-orbax", "format_version": 1, "dtype": "float32", "source": str(source[0]),
                  "layout": "stacked", "model": "Qwen2", "quantize": "none", "quantize_embeddings": False,
                  "int8_output_major": []}
  assert json.loads((converted / "config.json").read_text()) == json.loads((source[0] / "config.json").read_text())
  # One Orbax array directory per weight, stacked over layers: the tiny model has 15 weights.
  arrays = sorted(p.name for p in (converted / "params").iterdir() if (p / "zarr.json").exists())
  assert len(arrays) == 15 and "embed" in arrays and "layers.attn.q_kernel" in arrays
  assert orbax_store.is_orbax_checkpoint(converted)
  assert not orbax_store.is_orbax_checkpoint(source[0])


@pytest.mark.parametrize("scan", [False, True])
def test_restore_equals_the_source(source, converted, scan):
  d, _ = source
  model, tokenizer, processor = orbax_store.restore(converted, scan_layers=scan)
  original = load_model(d, scan_layers=scan)
  assert processor is None and model.scan_layers == scan and model.cfg == original.cfg
  _assert_same_weights(model, original)
  ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True)
  np.testing.assert_array_equal(_logits(model, ids), _logits(original, ids))
  _assert_same_tokenizer(tokenizer, Tokenizer.from_directory(d))


def test_bfloat16_checkpoint_and_cast_on_restore(source, converted, tmp_path):
  d, _ = source
  out = loader.convert(d, tmp_path / "bf16", dtype="bfloat16")
  assert json.loads((out / "qwenjax_checkpoint.json").read_text())["dtype"] == "bfloat16"
  model, _, _ = orbax_store.restore(out, scan_layers=False)  # dtype defaults to the checkpoint's
  _assert_same_weights(model, load_model(d, scan_layers=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
  cast, _, _ = orbax_store.restore(converted, scan_layers=False, dtype="bfloat16")  # float32 read as bf16
  _assert_same_weights(cast, model)


def test_gguf_source(source, tmp_path):
  from qwenjax.checkpoints.gguf_file import GGUFCheckpoint

  path = tmp_path / "tiny.gguf"
  write_gguf_from_hf(path, source[1], source[0], qwen_chat_template())
  out = loader.convert(path, tmp_path / "orbax")
  with GGUFCheckpoint(path) as gguf:
    assert json.loads((out / "config.json").read_text()) == gguf.hf_config()
  model, tokenizer, _ = orbax_store.restore(out, scan_layers=False)
  original = load(str(path), scan_layers=False)
  _assert_same_weights(model, original.model)
  _assert_same_tokenizer(tokenizer, original.tokenizer)
  ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True)
  np.testing.assert_array_equal(_logits(model, ids), _logits(original.model, ids))


@pytest.fixture(scope="module")
def converted_vl(tiny_vl_chat, tmp_path_factory):  # noqa: F811
  return loader.convert(tiny_vl_chat[0], tmp_path_factory.mktemp("vl") / "orbax")


def test_vl_source(tiny_vl_chat, converted_vl):  # noqa: F811
  d, _ = tiny_vl_chat
  hf = json.loads((converted_vl / "config.json").read_text())
  assert "vision_config" in hf and "text_config" not in hf and hf["model_type"] == "qwen2_5_vl"  # Qwen's flat form
  assert QwenVLConfig.from_hf_config(hf) == QwenVLConfig.from_file(d / "config.json")
  model, tokenizer, processor = orbax_store.restore(converted_vl, scan_layers=False)
  _assert_same_weights(model, load_model(d, scan_layers=False))
  assert processor == ImageProcessorConfig.from_file(d / "preprocessor_config.json")
  _assert_same_tokenizer(tokenizer, Tokenizer.from_directory(d))
  assert json.loads((converted_vl / "qwenjax_checkpoint.json").read_text())["model"] == "Qwen2VL"


_SHARDED = """
import os
import sys
import jax.numpy as jnp
import numpy as np
from qwenjax.checkpoints import orbax_store
from qwenjax.model.decoder import weight_declarations
from qwenjax.parallel.axes import spec_for
from qwenjax.parallel.sharding import make_mesh, parse_mesh

mesh = make_mesh(parse_mesh(os.environ.get("MESH", "data:2,tensor:4")))
split = 0
for arg in sys.argv[1:]:  # directory:layout
  directory, layout = arg.rsplit(":", 1)
  for scan in {"both": (True, False), "scanned": (True,), "unrolled": (False,)}[layout]:
    single = dict(weight_declarations(orbax_store.restore(directory, scan_layers=scan)[0]))
    model = orbax_store.restore(directory, scan_layers=scan, mesh=mesh)[0]
    for path, var in weight_declarations(model):
      array = var[...]
      spec = spec_for(var.axes, var.shape, dict(mesh.shape))
      assert array.sharding.mesh.shape == mesh.shape, path
      assert array.sharding.spec == spec, (path, array.sharding.spec, spec)
      np.testing.assert_array_equal(np.asarray(array), np.asarray(single[path][...]), err_msg=str(path))
      split += any(axis is not None for axis in spec)
print(split)
"""


def test_sharded_restore_into_a_mesh(source, converted, converted_vl, converted_int8, tmp_path):
  # Small chunks as well, so that a shard reads some chunks of an array, not all of it.
  chunked = loader.convert(source[0], tmp_path / "chunked", chunk_bytes=4096)
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _SHARDED, f"{converted}:both", f"{chunked}:scanned",
                         f"{converted_vl}:unrolled", f"{converted_int8}:both"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert int(proc.stdout.split()[-1]) > 40  # most weights are split over the tensor axis


def test_a_qwen3_moe_converts_and_restores_onto_an_expert_mesh(tmp_path):
  """A tiny Qwen3-MoE through Orbax: restored on one device it gives transformers' logits within 1e-4; restored
  onto expert:2,tensor:4 (8 CPU devices) every weight is in its rules' sharding (experts over expert) and equal to
  the one-device restore, scanned and unrolled, float and int8."""
  from conftest import build_tiny_qwen3_moe, check_prefill_then_decode

  import torch

  d = save_tiny_tokenizer_dir(tmp_path / "moe")
  hf = build_tiny_qwen3_moe(d, vocab_size=512, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
  converted_moe = loader.convert(d, tmp_path / "orbax")
  converted_moe_int8 = loader.convert(d, tmp_path / "orbax_int8", quantize="int8")
  ids = np.random.default_rng(1).integers(0, 500, size=(1, 20))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).logits.numpy()
  check_prefill_then_decode(orbax_store.restore(converted_moe, scan_layers=True)[0], ids, ref)
  env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu",
         "MESH": "expert:2,tensor:4"}
  proc = subprocess.run([sys.executable, "-c", _SHARDED, f"{converted_moe}:both", f"{converted_moe_int8}:scanned"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert int(proc.stdout.split()[-1]) > 20


def _copy(converted, tmp_path):
  return pathlib.Path(shutil.copytree(converted, tmp_path / "copy"))


def _error(directory):
  with pytest.raises(CheckpointError) as e:
    orbax_store.restore(directory, scan_layers=False)
  message = str(e.value)
  assert "\n" not in message and str(directory) in message
  return message


def test_missing_metadata(converted, tmp_path):
  d = _copy(converted, tmp_path)
  (d / "qwenjax_checkpoint.json").unlink()
  assert orbax_store.is_orbax_checkpoint(d)  # still recognised, so loading explains what is wrong
  assert "qwenjax_checkpoint.json is missing" in _error(d)


def test_missing_array(converted, tmp_path):
  d = _copy(converted, tmp_path)
  shutil.rmtree(d / "params" / "layers.mlp.up")
  assert "tensor 'layers.mlp.up' is missing" in _error(d)


def test_config_that_does_not_match(converted, tmp_path):
  d = _copy(converted, tmp_path)
  hf = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**hf, "intermediate_size": hf["intermediate_size"] * 2}))
  assert re.search(r"tensor 'layers.mlp.down' has shape \(3, 160, 64\), but config.json implies \(3, 320, 64\)",
                   _error(d))


def test_convert_refuses_a_non_empty_output(source, converted):
  with pytest.raises(CheckpointError, match="already exists and is not an empty directory"):
    loader.convert(source[0], converted)


def test_model_flag_accepts_an_orbax_directory(source, converted):
  """`qwenjax.load` (what every --model flag goes through) restores a converted directory, equal to the source."""
  import qwenjax

  loaded = qwenjax.load(str(converted), scan_layers=False)
  original = qwenjax.load(str(source[0]), scan_layers=False)
  assert loaded.source == str(converted)
  ours, theirs = _weights(loaded.model), _weights(original.model)
  assert ours.keys() == theirs.keys()
  for path in ours:
    np.testing.assert_array_equal(ours[path], theirs[path], err_msg=str(path))
  assert loaded.tokenizer.encode("def f(x):") == original.tokenizer.encode("def f(x):")


def test_convert_onto_a_full_disk_is_one_error_and_leaves_nothing(source, tmp_path):
  """The weights do not fit: one `error:` line, no traceback, and neither the output nor a partial temporary (nor
  the lock) is left in the directory."""
  parent = tmp_path / "disk"
  parent.mkdir()
  out = parent / "orbax"
  # Files past 64 KiB cannot grow (EFBIG, SIGXFSZ ignored), as on a disk that is full.
  limited = ["bash", "-c", 'trap "" XFSZ; ulimit -f 64; exec "$@"', "bash"]
  proc = subprocess.run([*limited, sys.executable, "-m", "launch.convert", f"--source={source[0]}", f"--output={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {out}: writing the checkpoint failed ("), proc.stderr[-3000:]
  assert last.endswith("); the partial copy was removed."), last
  assert list(parent.iterdir()) == []


def test_convert_refuses_a_concurrent_writer_and_an_existing_destination(source, converted, tmp_path):
  from qwenjax import InputError, _files

  out = tmp_path / "orbax"
  with _files.OwnedLock(_files.lock_path_for(out), "a convert in this test"):
    with pytest.raises(InputError, match=rf"^{out} is being written by another job \(pid {os.getpid()} on "):
      loader.convert(source[0], out)
  assert not out.exists()
  proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--source={source[0]}", f"--output={converted}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (f"error: {converted}: already exists and is not an empty "
                                                   "directory; convert writes a new one.")


def test_a_save_goes_through_a_temporary_of_its_own(tmp_path):
  """orbax_store's temporary directory: renamed onto the destination when whole; removed, with one CheckpointError
  naming the destination, when the write fails; a killed writer's temporary (its pid gone, our marker inside) is
  removed by the next save, anything else of that name left alone."""
  from qwenjax import _files

  out = tmp_path / "orbax"
  stale = tmp_path / f".orbax{_files.TMP_INFIX}999999999"  # no such pid
  stale.mkdir()
  _files.write_json(stale / "qwenjax_partial.json", {}, marker="partial orbax checkpoint")
  foreign = tmp_path / f".orbax{_files.TMP_INFIX}999999998"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("not ours")
  with pytest.raises(CheckpointError, match=rf"^{out}: writing the checkpoint failed \(\[Errno 28\] No space left "
                     r"on device\); the partial copy was removed\.$"):
    with orbax_store._partial(out) as tmp:
      (tmp / "params").mkdir()
      raise OSError(28, "No space left on device")
  assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name]
  with orbax_store._partial(out) as tmp:
    (tmp / "config.json").write_text("{}")
  assert sorted(p.name for p in out.iterdir()) == ["config.json"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, "orbax"]
