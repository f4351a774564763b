"""`quantize="int8"` (w8a16) and `"w8a8"` on tiny Qwen2 checkpoints, against transformers models whose weights
(and, for w8a8, whose Linear inputs) were quantized and dequantized by numpy, independently of qwenjax:
logits within 1e-5 (w8a16) and greedy tokens identical; the loader quantizes one tensor at a time. Each runs with
the int8 projections stored as declared ([K..., O...]) and output-major ([O..., K...], what the CPU path probe
chooses where it is faster)."""

import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenjax import Engine, KVCache, SamplingParams, prefill
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine import planner
from qwenjax.kernels import cpu_paths
from qwenjax.model.layers import QuantizedWeight

from conftest import fake_quantized_reference, output_major_paths

CONFIG = dict(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6)


def _logits(model, ids: np.ndarray) -> np.ndarray:
  graphdef, params = nnx.split(model)
  b, t = ids.shape
  cache = KVCache.zeros(model.cfg, b, 64)
  tokens = jnp.asarray(np.pad(ids, ((0, 0), (0, 32 - t))), jnp.int32)
  logits, _ = prefill(graphdef, params, cache, tokens, jnp.full((b,), t, jnp.int32), all_logits=True)
  return np.asarray(logits)[:, :t]


@pytest.fixture(scope="module")
def tiny(tiny_factory):
  return tiny_factory("quantized", **CONFIG)


@pytest.fixture(params=["kn", "nk"])
def layout(request):
  """The int8 layout of every projection: "kn" as declared (no record active), "nk" output-major."""
  with cpu_paths.using(*(output_major_paths() if request.param == "nk" else ())):
    yield request.param


@pytest.mark.parametrize("embeddings", [False, True], ids=["layers", "with_embeddings"])
def test_int8_logits_match_a_numpy_quantized_reference(tiny, embeddings, layout):
  path, hf = tiny
  model = load_model(path, quantize="int8", quantize_embeddings=embeddings, scan_layers=False)
  ids = np.random.default_rng(0).integers(0, 300, size=(2, 20))
  ref = fake_quantized_reference(hf, embeddings=embeddings, activations=False)
  with torch.no_grad():
    expected = ref(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_logits(model, ids), expected, atol=1e-5, rtol=0)
  # The quantization itself moved the logits far more than that: the comparison is with the quantized model.
  with torch.no_grad():
    float_logits = hf(torch.as_tensor(ids)).logits.numpy()
  assert np.abs(float_logits - expected).max() > 1e-3


def test_w8a8_logits_match_a_fake_quantized_reference(tiny, layout):
  path, hf = tiny
  model = load_model(path, quantize="w8a8", scan_layers=True)
  ids = np.random.default_rng(1).integers(0, 300, size=(2, 20))
  with torch.no_grad():
    expected = fake_quantized_reference(hf, embeddings=False, activations=True)(torch.as_tensor(ids)).logits.numpy()
  # int32 accumulation is exact; what is left is float32 rounding before the per-token rounding, which can move
  # one activation by one step.
  np.testing.assert_allclose(_logits(model, ids), expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("quantize", ["int8", "w8a8"])
def test_engine_greedy_tokens_match_the_reference(tiny, quantize, layout):
  path, hf = tiny
  ref = fake_quantized_reference(hf, embeddings=False, activations=quantize == "w8a8")
  engine = Engine(load_model(path, quantize=quantize, scan_layers=False), None, max_batch_size=2, max_seq_len=64)
  prompts = [[5, 17, 42, 7, 99, 3], [8, 1, 250, 31]]
  outs = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
  for prompt, out in zip(prompts, outs):
    with torch.no_grad():
      want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert out.token_ids == want[0, len(prompt):].tolist()


def test_quantized_weights_are_int8_with_per_channel_scales(tiny, layout):
  path, _ = tiny
  model = load_model(path, quantize="int8", scan_layers=True)
  up = model.layers.mlp.up
  assert isinstance(up, QuantizedWeight) and up.shape == (3, 64, 160) and up.output_major == (layout == "nk")
  o = model.layers.attn.o_kernel
  assert o.shape == (3, 8, 8, 64) and o.scale.shape == (3, 64) and o.scale.axes == ("layers", "embed")
  assert up.values[...].dtype == jnp.int8 and up.scale.shape == (3, 160) and up.scale.axes == ("layers", "mlp")
  if layout == "kn":
    assert up.values.shape == (3, 64, 160) and up.values.axes == ("layers", "embed", "mlp")
    assert o.values.shape == (3, 8, 8, 64)
  else:  # output-major: the torch Linear's own [out, in], the axes moved with the dims
    assert up.values.shape == (3, 160, 64) and up.values.axes == ("layers", "mlp", "embed")
    assert o.values.shape == (3, 64, 8, 8) and o.values.axes == ("layers", "embed", "heads", "head_dim")
  # Norms, biases and (by default) the embedding stay float32.
  assert model.layers.attn.q_bias[...].dtype == jnp.float32 and model.embed[...].dtype == jnp.float32


def test_loading_quantizes_one_tensor_at_a_time(tiny, layout):
  """Host allocations while loading peak near the int8 model plus one float32 tensor, not the float model."""
  path, _ = tiny
  tracemalloc.start()
  try:
    model = load_model(path, quantize="int8", quantize_embeddings=True, scan_layers=True)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  state = nnx.to_flat_state(nnx.state(model, nnx.Param))
  stored = sum(np.asarray(v[...]).nbytes for _, v in state)
  float_model = sum(np.prod(v.shape) * 4 for _, v in state if v[...].dtype == jnp.int8)
  largest_float = max(np.prod(v.shape[1:] if v.axes[0] == "layers" else v.shape) * 4 for _, v in state)
  assert stored < 0.45 * float_model
  # One float32 tensor at a time, quantized in chunks (no temporaries its size): the model plus about that tensor.
  assert peak < stored + 1.5 * largest_float + (1 << 20), (peak, stored, largest_float)


@pytest.mark.parametrize("shape, axes", [((300, 70), (1,)), ((70, 300), (0,)), ((3, 8, 8, 40), (0, 1)),
                                         ((5, 40, 64), (1,)), ((0, 16), (1,))])
def test_chunked_host_quantization_equals_the_formula(shape, axes, monkeypatch):
  """quantize_host in chunks of a few channels (a tiny chunk size forces many) gives the formula's numbers,
  written here in plain numpy over the whole array: scale = amax / 127, values = round(w / scale), zeros kept."""
  from qwenjax.model import layers  # noqa: PLC0415

  monkeypatch.setattr(layers, "_QUANTIZE_CHUNK", 500)
  w = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
  if w.size:
    w[(0,) * w.ndim] = 0.0
    w[tuple(slice(0, 1) if d not in axes else slice(None) for d in range(w.ndim))] = 0.0  # a zero channel
  scale = np.max(np.abs(w), axis=axes) / np.float32(127) if w.size else np.zeros(
      [d for i, d in enumerate(shape) if i not in axes], np.float32)
  safe = np.expand_dims(np.where(scale > 0, scale, np.float32(1)), axes)
  want = np.clip(np.round(w / safe), -127, 127).astype(np.int8)
  values, got_scale = layers.quantize_host(w, axes)
  np.testing.assert_array_equal(values, want)
  np.testing.assert_array_equal(got_scale, scale)


def test_int8_weight_bytes_against_bfloat16():
  """Bytes of the 0.5B and 7B models as declared (nnx.eval_shape: nothing allocated): int8 values and float32
  scales against bfloat16, with the embedding and head in int8 too (<= 0.55x) and without (the planner's count)."""
  from qwenjax import PRESETS, Qwen2  # noqa: PLC0415

  def nbytes(model):
    return sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for _, v in nnx.to_flat_state(nnx.state(model)))

  for name in ("qwen2.5-0.5b", "qwen2.5-7b"):
    make = lambda **kw: nnx.eval_shape(lambda: Qwen2(PRESETS[name], rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16,
                                                     dtype=jnp.bfloat16, **kw))
    bf16, int8 = nbytes(make()), nbytes(make(quantize="int8", quantize_embeddings=True))
    assert bf16 == 2 * PRESETS[name].num_params()
    assert int8 / bf16 <= 0.55, (name, int8 / bf16)
    layers_only = planner.plan_memory(name, dtype="bfloat16", quantize="int8")
    assert layers_only.quantize == "int8"
    assert layers_only.weights == nbytes(make(quantize="int8"))  # one device: the planner counts every byte
    assert layers_only.weights / bf16 < (0.65 if name == "qwen2.5-0.5b" else 0.60)  # the 0.5B's embedding: 27%


def test_quantize_must_be_known(tiny):
  from qwenjax import ConfigError  # noqa: PLC0415
  with pytest.raises(ConfigError, match="quantize must be one of"):
    load_model(tiny[0], quantize="int4")


def test_sharded_quantized_weights_follow_their_axes(tiny, layout):
  """On a data x fsdp x tensor mesh each int8 values array shards like the float weight it replaces, and its scale
  like that weight's output dims (the specs come from the logical axes and the rules alone)."""
  from qwenjax.parallel.sharding import param_specs  # noqa: PLC0415
  mesh = {"data": 1, "fsdp": 2, "tensor": 2}
  quantized = param_specs(load_model(tiny[0], quantize="int8", scan_layers=True), mesh)
  floats = param_specs(load_model(tiny[0], scan_layers=True), mesh)
  checked = 0
  for name, spec in floats.items():
    if name + "/values" not in quantized:
      assert quantized[name] == spec, name
      continue
    contract = (1, 2) if name.endswith("o_kernel") else (1,)  # counted with the layers axis
    nd = 4 if "attn" in name else 3  # [L, D, N, H] or [L, N, H, D]; [L, D, F] or [L, F, D]
    dims = tuple(spec) + (None,) * (nd - len(spec))
    if layout == "nk":  # output-major: the spec's entries move with their dims
      dims = dims[:1] + tuple(d for i, d in enumerate(dims[1:], 1) if i not in contract) + tuple(
          dims[i] for i in contract)
    assert tuple(quantized[name + "/values"]) + (None,) * (nd - len(quantized[name + "/values"])) == dims, name
    kept = tuple(a for i, a in enumerate(tuple(spec) + (None,) * 4) if i not in contract)[:len(spec) - len(contract)]
    assert tuple(quantized[name + "/scale"]) == kept, (name, quantized[name + "/scale"], spec)
    checked += 1
  assert checked == 7  # q, k, v, o, gate, up, down


def test_dequantized_weights_equal_values_times_scales(tiny):
  """QuantizedWeight.dequantized on stacked and unrolled weights, against numpy on the stored arrays; output-major
  weights dequantize to the same declared-layout matrices."""
  with cpu_paths.using():
    scanned = load_model(tiny[0], quantize="int8", scan_layers=True)
    unrolled = load_model(tiny[0], quantize="int8", scan_layers=False)
  with cpu_paths.using(*output_major_paths()):
    for kn, nk in ((scanned, load_model(tiny[0], quantize="int8", scan_layers=True)),
                   (unrolled, load_model(tiny[0], quantize="int8", scan_layers=False))):
      for name in ("o_kernel", "q_kernel"):
        get = lambda m, name=name: getattr((m.layers if m.scan_layers else m.layers[1]).attn, name)
        assert get(nk).output_major and not get(kn).output_major
        np.testing.assert_array_equal(np.asarray(get(nk).dequantized()), np.asarray(get(kn).dequantized()))
  for w, contract in ((scanned.layers.attn.o_kernel, (1, 2)), (scanned.layers.mlp.down, (1,)),
                      (unrolled.layers[2].attn.o_kernel, (0, 1)), (unrolled.layers[0].mlp.up, (0,))):
    values, scale = np.asarray(w.values[...]), np.asarray(w.scale[...])
    np.testing.assert_array_equal(np.asarray(w.dequantized()), values * np.expand_dims(scale, contract))
