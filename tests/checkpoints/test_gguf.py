"""qwenjax.checkpoints.gguf_file: small GGUF files written here with gguf.GGUFWriter, and the embedded real one.

Values are checked against independent references: the float originals within each quantizer's
error bound, or transformers' torch dequantizer (a separate implementation) for K-quant blocks.
"""

import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.integrations.gguf import dequant as hf_dequant

from qwenjax._errors import CheckpointError, ConfigError
from qwenjax.checkpoints.gguf_file import GGUFCheckpoint
from qwenjax.text.tokenizer import Tokenizer

from conftest import gguf_tokenizer_metadata

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 160
KV = HIDDEN // HEADS * KV_HEADS

# GGUF name -> (Hugging Face name, shape, storage type). Layer 0 uses types gguf can quantize (checked
# against the originals); layer 1 K-quants filled with random blocks (checked against transformers).
TENSORS = {
    "token_embd.weight": ("model.embed_tokens.weight", (VOCAB, HIDDEN), Q.Q8_0),
    "blk.0.attn_norm.weight": ("model.layers.0.input_layernorm.weight", (HIDDEN,), Q.F32),
    "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", (HIDDEN, HIDDEN), Q.Q4_0),
    "blk.0.attn_q.bias": ("model.layers.0.self_attn.q_proj.bias", (HIDDEN,), Q.F32),
    "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", (KV, HIDDEN), Q.Q4_1),
    "blk.0.attn_k.bias": ("model.layers.0.self_attn.k_proj.bias", (KV,), Q.F32),
    "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", (KV, HIDDEN), Q.Q5_0),
    "blk.0.attn_v.bias": ("model.layers.0.self_attn.v_proj.bias", (KV,), Q.F32),
    "blk.0.attn_output.weight": ("model.layers.0.self_attn.o_proj.weight", (HIDDEN, HIDDEN), Q.Q5_1),
    "blk.0.ffn_norm.weight": ("model.layers.0.post_attention_layernorm.weight", (HIDDEN,), Q.F32),
    "blk.0.ffn_gate.weight": ("model.layers.0.mlp.gate_proj.weight", (FFN, HIDDEN), Q.F16),
    "blk.0.ffn_up.weight": ("model.layers.0.mlp.up_proj.weight", (FFN, HIDDEN), Q.BF16),
    "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", (HIDDEN, FFN), Q.Q8_0),
    "blk.1.attn_norm.weight": ("model.layers.1.input_layernorm.weight", (HIDDEN,), Q.F32),
    "blk.1.attn_q.weight": ("model.layers.1.self_attn.q_proj.weight", (HIDDEN, HIDDEN), Q.Q4_K),
    "blk.1.attn_q.bias": ("model.layers.1.self_attn.q_proj.bias", (HIDDEN,), Q.F32),
    "blk.1.attn_k.weight": ("model.layers.1.self_attn.k_proj.weight", (KV, HIDDEN), Q.Q5_K),
    "blk.1.attn_k.bias": ("model.layers.1.self_attn.k_proj.bias", (KV,), Q.F32),
    "blk.1.attn_v.weight": ("model.layers.1.self_attn.v_proj.weight", (KV, HIDDEN), Q.Q6_K),
    "blk.1.attn_v.bias": ("model.layers.1.self_attn.v_proj.bias", (KV,), Q.F32),
    "blk.1.attn_output.weight": ("model.layers.1.self_attn.o_proj.weight", (HIDDEN, HIDDEN), Q.Q3_K),
    "blk.1.ffn_norm.weight": ("model.layers.1.post_attention_layernorm.weight", (HIDDEN,), Q.F32),
    "blk.1.ffn_gate.weight": ("model.layers.1.mlp.gate_proj.weight", (FFN, HIDDEN), Q.Q2_K),
    "blk.1.ffn_up.weight": ("model.layers.1.mlp.up_proj.weight", (FFN, HIDDEN), Q.F32),
    "blk.1.ffn_down.weight": ("model.layers.1.mlp.down_proj.weight", (HIDDEN, FFN), Q.Q4_K),
    "output_norm.weight": ("model.norm.weight", (HIDDEN,), Q.F32),
    "output.weight": ("lm_head.weight", (VOCAB, HIDDEN), Q.Q6_K),
}
# Where each K-quant block keeps its float16 scale(s), by byte offset (ggml-common.h block layouts).
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _k_quant_blocks(rng, shape, qtype):
  """Random bytes in `qtype`'s block layout, with small positive float16 scales."""
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, type_size), dtype=np.uint8)
  for at in K_QUANT_SCALES[qtype]:
    blocks[:, at:at + 2] = rng.uniform(1e-3, 1e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
  return blocks.reshape(shape[0], -1)


def _encode(rng, shape, qtype):
  """(float originals or None, what GGUFWriter stores) for one tensor."""
  if qtype in K_QUANT_SCALES:
    return None, _k_quant_blocks(rng, shape, qtype)
  values = rng.normal(0.0, 0.05, shape).astype(np.float32)
  if qtype == Q.F32:
    return values, values
  if qtype == Q.F16:
    return values, values.astype(np.float16)
  return values, gguf.quants.quantize(values, qtype)


@pytest.fixture(scope="module")
def encoded():
  rng = np.random.default_rng(0)
  return {name: _encode(rng, shape, qtype) for name, (_, shape, qtype) in TENSORS.items()}


def write_gguf(path, tensors, arch="qwen2", metadata=None, tokenizer=None):
  """Writes a GGUF: `tensors` maps names to (data, type); `metadata(writer)` adds or overrides keys."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(LAYERS)
  writer.add_context_length(4096)
  writer.add_embedding_length(HIDDEN)
  writer.add_feed_forward_length(FFN)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_rope_freq_base(1e6)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
  if tokenizer is not None:
    tokenizer(writer)
  if metadata is not None:
    metadata(writer)
  for name, (data, qtype) in tensors.items():
    writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, encoded):
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  return write_gguf(path, {name: (data, TENSORS[name][2]) for name, (_, data) in encoded.items()})


def _error_bound(values, qtype):
  """Largest error a round-to-nearest ggml quantizer of `qtype` may make on each value."""
  if qtype == Q.F32:
    return np.zeros_like(values)
  if qtype == Q.F16:
    return np.abs(values) * 2.0**-11 + 1e-7
  if qtype == Q.BF16:
    return np.abs(values) * 2.0**-8 + 1e-7
  blocks = values.reshape(-1, 32)
  amax = np.abs(blocks).max(1, keepdims=True)
  span = blocks.max(1, keepdims=True) - blocks.min(1, keepdims=True)
  # Symmetric types with an odd level count clip one extreme by a whole step; the rest round to half a step.
  bound = {Q.Q8_0: 0.6 * amax / 127, Q.Q4_0: 1.01 * amax / 8, Q.Q5_0: 1.01 * amax / 16,
           Q.Q4_1: 0.6 * span / 15 + 1e-3 * amax, Q.Q5_1: 0.6 * span / 31 + 1e-3 * amax}[qtype]
  return np.broadcast_to(bound, blocks.shape).reshape(values.shape)


def _hf_dequantize(raw, qtype, shape):
  flat = hf_dequant.dequantize(torch.from_numpy(np.array(raw, copy=True).reshape(-1)), int(qtype))
  return flat.numpy().reshape(shape)


def _check_message(err, path):
  message = str(err.value)
  assert str(path) in message and "\n" not in message, message


def test_hf_config(model_file):
  config = GGUFCheckpoint(model_file).hf_config()
  assert config == {
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": HIDDEN,
      "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
      "num_key_value_heads": KV_HEADS, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1e6,
      "max_position_embeddings": 4096, "rope_scaling": None, "use_sliding_window": False,
      "tie_word_embeddings": False, "torch_dtype": "float32",
  }
  # transformers' own GGUF config reader agrees on every field it maps (it sizes the vocabulary from
  # the token list only, and this file has none).
  theirs = transformers.AutoConfig.from_pretrained(model_file.parent, gguf_file=model_file.name)
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
    assert getattr(theirs, key) == config[key], key
  assert np.float32(theirs.rms_norm_eps) == np.float32(config["rms_norm_eps"])
  transformers.Qwen2Config(**config)  # A config transformers accepts.


def test_hf_config_rope_scaling_tied_and_token_ids(tmp_path, encoded):
  def metadata(writer):
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(4.0)
    writer.add_rope_scaling_orig_ctx_len(32768)
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(5)

  tensors = {name: (data, TENSORS[name][2]) for name, (_, data) in encoded.items() if name != "output.weight"}
  checkpoint = GGUFCheckpoint(write_gguf(tmp_path / "yarn.gguf", tensors, metadata=metadata))
  config = checkpoint.hf_config()
  assert config["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
  assert config["tie_word_embeddings"] is True and "lm_head.weight" not in checkpoint.tensor_names()
  assert (config["bos_token_id"], config["eos_token_id"]) == (3, 5)


def test_names_shapes_and_metadata(model_file):
  checkpoint = GGUFCheckpoint(model_file)
  expected = [hf for hf, _, _ in TENSORS.values()]
  assert checkpoint.tensor_names() == expected  # Embeddings, layers in Hugging Face order, norm, head.
  for hf_name, shape, qtype in TENSORS.values():
    assert checkpoint.tensor_shape(hf_name) == shape
    assert checkpoint.tensor_type(hf_name) == qtype.name
  assert "Q4_K_M" in checkpoint.describe()
  assert "blk.1.attn_v.weight" in checkpoint.describe("model.layers.1.self_attn.v_proj.weight")
  # The metadata parser agrees with gguf's own GGUFReader on every key.
  reader = gguf.GGUFReader(model_file)
  for key, field in reader.fields.items():
    if not key.startswith("GGUF."):
      assert checkpoint.metadata[key] == pytest.approx(field.contents()), key


def test_dequantized_values(model_file, encoded):
  checkpoint = GGUFCheckpoint(model_file)
  for gguf_name, (hf_name, shape, qtype) in TENSORS.items():
    got = checkpoint.get_tensor(hf_name)
    assert got.dtype == np.float32 and got.shape == shape and got.flags.writeable, hf_name
    values, raw = encoded[gguf_name]
    if values is None:  # K-quant blocks: transformers' torch dequantizer is the reference.
      np.testing.assert_allclose(got, _hf_dequantize(raw, qtype, shape), rtol=1e-6, atol=1e-7, err_msg=hf_name)
    else:
      error = np.abs(got - values)
      assert np.all(error <= _error_bound(values, qtype)), (hf_name, float(error.max()))
  # Quantized tensors really are lossy, and lossless ones exact.
  q_proj = checkpoint.get_tensor("model.layers.0.self_attn.q_proj.weight")
  assert np.abs(q_proj - encoded["blk.0.attn_q.weight"][0]).max() > 0
  np.testing.assert_array_equal(checkpoint.get_tensor("model.norm.weight"), encoded["output_norm.weight"][0])


def test_q8_0_loads_straight_to_int8(model_file, monkeypatch):
  """quantize="int8": Q8_0 tensors (the embedding, layer 0's down_proj) are read as int8 rows, never dequantized
  to float32, into the values and scales quantizing the dequantized tensor would give; other types dequantize and
  requantize."""
  from qwenjax.checkpoints.hf import load_from_source  # noqa: PLC0415
  from qwenjax.config import QwenConfig  # noqa: PLC0415
  from qwenjax.model.layers import quantize_host  # noqa: PLC0415

  checkpoint = GGUFCheckpoint(model_file)
  expected = {name: quantize_host(checkpoint.get_tensor(name), (1,))
              for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                           "model.layers.0.self_attn.q_proj.weight")}
  dequantized = []
  get_tensor = GGUFCheckpoint.get_tensor
  monkeypatch.setattr(GGUFCheckpoint, "get_tensor",
                      lambda self, name: dequantized.append(name) or get_tensor(self, name))
  cfg = QwenConfig.from_hf_config(checkpoint.hf_config())
  model = load_from_source(cfg, checkpoint, scan_layers=False, quantize="int8", quantize_embeddings=True)
  assert "model.embed_tokens.weight" not in dequantized and "model.layers.0.mlp.down_proj.weight" not in dequantized
  assert "model.layers.0.self_attn.q_proj.weight" in dequantized  # Q4_0: dequantized, then requantized
  for weight, name in ((model.embed, "model.embed_tokens.weight"),
                       (model.layers[0].mlp.down, "model.layers.0.mlp.down_proj.weight"),
                       (model.layers[0].attn.q_kernel, "model.layers.0.self_attn.q_proj.weight")):
    values, scale = expected[name]  # [out, in] rows of the checkpoint tensor, a scale per output row
    got = np.asarray(weight.values[...])
    if not name.endswith("embed_tokens.weight"):  # [in..., out...], or output-major [out..., in...]
      got = got.reshape(values.shape[0], -1) if weight.output_major else got.reshape(values.shape[1], -1).T
    np.testing.assert_array_equal(got, values, err_msg=name)
    np.testing.assert_array_equal(np.asarray(weight.scale[...]).reshape(-1), scale, err_msg=name)
  assert checkpoint.get_int8_rows("model.layers.0.self_attn.q_proj.weight") is None


def test_threaded_dequantization_matches_one_call(tmp_path, monkeypatch):
  from qwenjax.checkpoints import gguf_file

  rng = np.random.default_rng(1)
  values = rng.normal(0.0, 0.05, (VOCAB, HIDDEN)).astype(np.float32)
  path = write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (gguf.quants.quantize(values, Q.Q5_0), Q.Q5_0)})
  whole = GGUFCheckpoint(path).get_tensor("model.embed_tokens.weight")
  monkeypatch.setattr(gguf_file, "_CHUNK_VALUES", 3 * HIDDEN)  # 3 rows a task: many tasks, ragged last.
  np.testing.assert_array_equal(GGUFCheckpoint(path).get_tensor("model.embed_tokens.weight"), whole)


def _corrupt(model_file, tmp_path, name, edit):
  data = bytearray(model_file.read_bytes())
  path = tmp_path / name
  path.write_bytes(bytes(edit(data)))
  return path


@pytest.mark.parametrize("cut", [10, 30, 200, -5000, -1])
def test_truncated_file(model_file, tmp_path, cut):
  path = _corrupt(model_file, tmp_path, "cut.gguf", lambda d: d[:cut])
  with pytest.raises(CheckpointError, match="truncated|only 10 bytes") as err:
    GGUFCheckpoint(path)
  _check_message(err, path)


def test_bad_magic_and_missing_file(model_file, tmp_path):
  path = _corrupt(model_file, tmp_path, "magic.gguf", lambda d: b"GGML" + d[4:])
  with pytest.raises(CheckpointError, match="not a GGUF file: it starts with b'GGML'") as err:
    GGUFCheckpoint(path)
  _check_message(err, path)
  with pytest.raises(CheckpointError, match="Cannot open") as err:
    GGUFCheckpoint(tmp_path / "absent.gguf")
  _check_message(err, tmp_path / "absent.gguf")


@pytest.mark.parametrize("delta", [-1, +1])
def test_wrong_tensor_count(model_file, tmp_path, delta):
  def edit(d):
    count = int.from_bytes(d[8:16], "little")
    d[8:16] = (count + delta).to_bytes(8, "little")
    return d

  path = _corrupt(model_file, tmp_path, "count.gguf", edit)
  with pytest.raises(CheckpointError, match="tensor") as err:
    GGUFCheckpoint(path)
  _check_message(err, path)
  assert f"{len(TENSORS) + delta}" in str(err.value)


def test_unknown_architecture(tmp_path, encoded):
  path = write_gguf(tmp_path / "llama.gguf", {"token_embd.weight": (encoded["token_embd.weight"][1], Q.Q8_0)},
                    arch="llama")
  with pytest.raises(CheckpointError, match="'llama' model; this loader reads only 'qwen2'") as err:
    GGUFCheckpoint(path)
  _check_message(err, path)


def test_unknown_tensor_name(tmp_path):
  path = write_gguf(tmp_path / "fused.gguf", {"blk.0.attn_qkv.weight": (np.zeros((8, 32), np.float32), Q.F32)})
  with pytest.raises(CheckpointError, match="'blk.0.attn_qkv.weight', which is not part of a qwen2 model") as err:
    GGUFCheckpoint(path)
  _check_message(err, path)


def test_unsupported_tensor_type(tmp_path):
  block, type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
  raw = np.zeros((4, HIDDEN // block * type_size), np.uint8)
  path = write_gguf(tmp_path / "iq.gguf", {"output_norm.weight": (np.ones(HIDDEN, np.float32), Q.F32),
                                           "output.weight": (raw, Q.IQ4_NL)})
  checkpoint = GGUFCheckpoint(path)  # Opening and shapes work; dequantizing does not.
  assert checkpoint.tensor_shape("lm_head.weight") == (4, HIDDEN)
  with pytest.raises(CheckpointError, match="tensor 'output.weight' as IQ4_NL") as err:
    checkpoint.get_tensor("lm_head.weight")
  _check_message(err, path)
  with pytest.raises(CheckpointError, match="no tensor 'model.embed_tokens.weight'"):
    checkpoint.get_tensor("model.embed_tokens.weight")


# --- Tokenizer from GGUF metadata ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_gguf(tmp_path_factory, tiny_tokenizer_dir, qwen_template):
  path = tmp_path_factory.mktemp("tok_gguf") / "tok.gguf"
  norm = {"output_norm.weight": (np.ones(HIDDEN, np.float32), Q.F32)}
  return write_gguf(path, norm, tokenizer=gguf_tokenizer_metadata(tiny_tokenizer_dir, qwen_template))


GGUF_TEXTS = [
    "", "hello world", "def f(x):\n\treturn x  *  2\n\n\n", "   spaced   out  ", "你好，世界！ Café naïve 😀",
    "<|im_start|>user\nhi<|im_end|>\n", "<tool_call>\n{\"name\": \"f\"}\n</tool_call><|endoftext|>",
    "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>", "<|vision_start|><|image_pad|><|vision_end|>",
]


def test_gguf_tokenizer_matches_directory_and_transformers(tokenizer_gguf, tiny_tokenizer_dir):
  ours = GGUFCheckpoint(tokenizer_gguf).tokenizer()
  from_dir = Tokenizer.from_directory(tiny_tokenizer_dir)
  theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_gguf.parent, gguf_file=tokenizer_gguf.name)
  for text in GGUF_TEXTS:
    ids = ours.encode(text)
    assert ids == from_dir.encode(text) == theirs.encode(text), text
    assert ours.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
  im_end, endoftext = from_dir.token_to_id("<|im_end|>"), from_dir.token_to_id("<|endoftext|>")
  assert ours.eos_token_ids == [im_end, endoftext] and ours.pad_token_id == endoftext
  assert ours.vocab_size == from_dir.vocab_size == len(theirs)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
  assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
      messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("field, value, pattern", [
    ("model", "llama", r"tokenizer\.ggml\.model 'llama'; qwenjax reads only byte-level BPE"),
    ("pre", "gpt-4o", r"tokenizer\.ggml\.pre 'gpt-4o'; qwenjax knows the pre-tokenizers"),
])
def test_gguf_tokenizer_unknown_kind(tmp_path, tiny_tokenizer_dir, qwen_template, field, value, pattern):
  path = write_gguf(tmp_path / "t.gguf", {"output_norm.weight": (np.ones(HIDDEN, np.float32), Q.F32)},
                    tokenizer=gguf_tokenizer_metadata(tiny_tokenizer_dir, qwen_template, **{field: value}))
  with pytest.raises(ConfigError, match=pattern) as err:
    GGUFCheckpoint(path).tokenizer()
  _check_message(err, path)


# --- The embedded Qwen2.5-Coder-0.5B-Instruct GGUF ----------------------------------------------------

REAL_TEXTS = [
    "",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot, *rest = xs\n"
    "    return quicksort([x for x in rest if x < pivot]) + [pivot] + quicksort([x for x in rest if x >= pivot])\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\t// dot\n}\r\n",
    "        \n\n\n    \t\t  trailing   ",
    "x=1;y=22;z=333;w=4444;v=55555 3.14159e-10 0xDEADBEEF",
    "你好，世界！这是一个测试。日本語のテキストも。한국어 텍스트.",
    "Emoji: 😀👍🏽🇯🇵👩‍💻🤖 and symbols ∑∫√≈≠ ™ © ® …",
    "Accents: café naïve résumé Zürich São Paulo Ångström façade",
    "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>",
    "<tool_response>\n{\"temp\": 3}\n</tool_response><|endoftext|>",
    "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    return c<|fim_middle|>",
    "<|repo_name|>qwenjax<|file_sep|>qwenjax/model.py\n<|vision_start|><|image_pad|><|vision_end|>",
    "It's what they'll say; we've done THAT'S it'LL",
]


@pytest.fixture(scope="module")
def real_checkpoint(real_gguf_path):
  return GGUFCheckpoint(real_gguf_path)


@pytest.fixture(scope="module")
def real_tokenizers(real_checkpoint, real_gguf_path):
  theirs = transformers.AutoTokenizer.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name)
  return real_checkpoint.tokenizer(), theirs


@pytest.mark.real_model
def test_real_tokenizer_matches_transformers(real_tokenizers):
  ours, theirs = real_tokenizers
  for text in REAL_TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text), text
    assert ours.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
  specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
              "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
              "<tool_call>": 151657, "<|fim_prefix|>": 151659}
  for token, token_id in specials.items():
    assert ours.encode(token) == [token_id] == theirs.encode(token)
  assert ours.eos_token_ids == [151645, 151643] and ours.pad_token_id == 151643
  assert ours.vocab_size == len(theirs) == 151936
  # Qwen's tokenizer.json normalizes to NFC; transformers' GGUF conversion drops that normalizer.
  assert ours.encode("cafe\u0301") == ours.encode("café") != theirs.encode("cafe\u0301")


@pytest.mark.real_model
def test_real_chat_template_matches_transformers(real_tokenizers):
  ours, theirs = real_tokenizers
  tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
  chats = [
      [{"role": "user", "content": "Write fizzbuzz in Rust."}],
      [{"role": "system", "content": "Answer in German."}, {"role": "user", "content": "Wie spät ist es?"},
       {"role": "assistant", "content": "Keine Ahnung."}, {"role": "user", "content": "Schade 😢"}],
      [{"role": "user", "content": "Weather in 東京?"},
       {"role": "assistant", "tool_calls": [{"type": "function",
                                            "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]},
       {"role": "tool", "content": "{\"temp\": 21}"}],
  ]
  for messages in chats:
    for tools in (None, [tool]):
      expected = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
      assert ours.apply_chat_template(messages, tools=tools) == expected
      assert ours.apply_chat_template(messages, tools=tools, tokenize=True) == ours.encode(expected, False)


@pytest.mark.real_model
def test_real_config_matches_published_figures(real_checkpoint):
  config = real_checkpoint.hf_config()
  assert {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads")} == {
      "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
      "num_attention_heads": 14, "num_key_value_heads": 2}
  assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (1e6, 1e-6, 32768)
  assert (config["bos_token_id"], config["eos_token_id"], config["rope_scaling"]) == (151643, 151645, None)
  # The 0.5B model ties its embeddings, but this file stores output.weight (Q8_0) apart from the
  # Q5_0 token_embd.weight, and the two differ after quantization: the file is untied.
  assert config["tie_word_embeddings"] is False
  assert len(real_checkpoint.tensor_names()) == 291


def _q5_0_reference(raw):
  """Q5_0 blocks decoded from ggml's layout by hand: f16 d, 32 high bits, 16 bytes of low nibbles."""
  blocks = np.ascontiguousarray(raw).reshape(-1, 22)
  d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
  high = blocks[:, 2:6].copy().view("<u4")
  low = blocks[:, 6:]
  bit = (high >> np.arange(32, dtype=np.uint32)) & 1
  q = np.concatenate([low & 0x0F, low >> 4], axis=1).astype(np.int32) | (bit.astype(np.int32) << 4)
  return ((q - 16) * d).reshape(-1)


def test_q5_0_matches_hand_decoder(model_file, encoded):
  got = GGUFCheckpoint(model_file).get_tensor("model.layers.0.self_attn.v_proj.weight")
  np.testing.assert_array_equal(got.reshape(-1), _q5_0_reference(encoded["blk.0.attn_v.weight"][1]))


@pytest.mark.real_model
def test_real_metadata_and_dequantization(real_checkpoint):
  reader = gguf.GGUFReader(real_checkpoint.path)  # gguf's own parser (slow: ~10 s) as the reference.
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
              "tokenizer.chat_template", "qwen2.attention.layer_norm_rms_epsilon", "general.name"):
    assert real_checkpoint.metadata[key] == reader.fields[key].contents(), key
  raw = {t.name: t.data for t in reader.tensors}
  references = {  # Hugging Face name -> (GGUF name, reference dequantizer)
      "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", lambda r, s: _q5_0_reference(r).reshape(s)),
      "model.layers.0.self_attn.v_proj.weight": ("blk.0.attn_v.weight", lambda r, s: _hf_dequantize(r, Q.Q8_0, s)),
      "model.layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", lambda r, s: _hf_dequantize(r, Q.Q6_K, s)),
      "model.layers.2.mlp.down_proj.weight": ("blk.2.ffn_down.weight", lambda r, s: _hf_dequantize(r, Q.Q4_K, s)),
      "model.norm.weight": ("output_norm.weight", lambda r, s: np.asarray(r).reshape(s)),
  }
  start = time.perf_counter()
  for name in real_checkpoint.tensor_names():
    values = real_checkpoint.get_tensor(name)
    assert values.shape == real_checkpoint.tensor_shape(name) and np.isfinite(values).all(), name
    if name in references:
      gguf_name, reference = references[name]
      np.testing.assert_allclose(values, reference(raw[gguf_name], values.shape), rtol=1e-6, atol=1e-7,
                                 err_msg=name)
  elapsed = time.perf_counter() - start
  assert elapsed < 120, f"dequantizing the 0.5B model took {elapsed:.1f} s"
