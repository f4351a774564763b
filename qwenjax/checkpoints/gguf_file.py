"""A llama.cpp GGUF file of a Qwen2 / Qwen2.5 model, read as a Hugging Face checkpoint.

`GGUFCheckpoint(path)` memory-maps the file, checks its header and tensor table, and then offers
what a Hugging Face directory would: `hf_config()` (the `config.json` dict of Qwen2ForCausalLM),
`tensor_names()` / `tensor_shape()` / `get_tensor()` under Hugging Face names and shapes, and
`tokenizer()`.

File layout (GGUF v2/v3, little-endian): the magic b"GGUF", a u32 version, u64 tensor and metadata
counts, the metadata key/values, one info record per tensor (name, dims fastest-moving first, ggml
type, offset into the data section), padding to `general.alignment` (32 by default), then the
tensor data, each tensor padded to the alignment.

The header is parsed here with `struct` rather than by `gguf.GGUFReader`, which builds numpy views
for every one of the ~300k tokenizer strings and takes ~11 s on the embedded model (this parser
takes under a second). The `gguf` library still supplies the type tables and dequantization
(`gguf.quants.dequantize`). Tensors are dequantized one at a time, in row chunks spread over
threads, straight from the memory map; nothing holds the whole model in memory.

Naming (GGUF -> Hugging Face), with N the layer:
  token_embd.weight           model.embed_tokens.weight         [V, D]
  blk.N.attn_norm.weight      model.layers.N.input_layernorm.weight
  blk.N.attn_{q,k,v}.{weight,bias}  model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}
  blk.N.attn_output.weight    model.layers.N.self_attn.o_proj.weight
  blk.N.ffn_norm.weight       model.layers.N.post_attention_layernorm.weight
  blk.N.ffn_{gate,up,down}.weight   model.layers.N.mlp.{gate,up,down}_proj.weight
  output_norm.weight          model.norm.weight
  output.weight               lm_head.weight (absent when the embeddings are tied)
A GGUF lists dims fastest-moving first, so a linear weight stored as [in, out] is the PyTorch
[out, in] once reversed. llama.cpp permutes q/k rows only for llama-family models, not qwen2, so
the tensors are used as stored.
"""

from __future__ import annotations

import concurrent.futures
import math
import mmap
import os
import pathlib
import re
import struct
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from gguf import constants as gguf_constants
from gguf import quants as gguf_quants

from qwenjax._errors import CheckpointError, ConfigError
from qwenjax.model import registry
from qwenjax.model.layers import quantize_host
from qwenjax.text.tokenizer import Tokenizer

_GGMLType = gguf_constants.GGMLQuantizationType
_ValueType = gguf_constants.GGUFValueType

# Tensor types `get_tensor` dequantizes (all through gguf.quants).
SUPPORTED_TENSOR_TYPES = frozenset({
    _GGMLType.F32, _GGMLType.F16, _GGMLType.BF16,
    _GGMLType.Q4_0, _GGMLType.Q4_1, _GGMLType.Q5_0, _GGMLType.Q5_1, _GGMLType.Q8_0,
    _GGMLType.Q2_K, _GGMLType.Q3_K, _GGMLType.Q4_K, _GGMLType.Q5_K, _GGMLType.Q6_K,
})

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # Version 1 counted in 32 bits; nothing current writes it.
_MAX_DIMS = 4  # GGML_MAX_DIMS.
_MAX_NAME_BYTES = 64  # GGML_MAX_NAME, counting the terminating NUL.
_DEFAULT_ALIGNMENT = 32

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS = {
    _ValueType.UINT8: struct.Struct("<B"), _ValueType.INT8: struct.Struct("<b"),
    _ValueType.UINT16: struct.Struct("<H"), _ValueType.INT16: struct.Struct("<h"),
    _ValueType.UINT32: _U32, _ValueType.INT32: struct.Struct("<i"),
    _ValueType.UINT64: _U64, _ValueType.INT64: struct.Struct("<q"),
    _ValueType.FLOAT32: struct.Struct("<f"), _ValueType.FLOAT64: struct.Struct("<d"),
    _ValueType.BOOL: struct.Struct("<?"),
}
_ARRAY_DTYPES = {
    _ValueType.UINT8: "<u1", _ValueType.INT8: "<i1", _ValueType.UINT16: "<u2", _ValueType.INT16: "<i2",
    _ValueType.UINT32: "<u4", _ValueType.INT32: "<i4", _ValueType.UINT64: "<u8", _ValueType.INT64: "<i8",
    _ValueType.FLOAT32: "<f4", _ValueType.FLOAT64: "<f8", _ValueType.BOOL: "?",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {  # Within blk.N -> within model.layers.N, in Hugging Face's order.
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Qwen3 dense (llama.cpp's `qwen3`): Qwen2's names without the q/k/v biases, with the per-head q/k norms.
_QWEN3_LAYER_NAMES = {
    **{g: hf for g, hf in _LAYER_NAMES.items() if not g.endswith(".bias") and g != "attn_output.weight"},
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# Qwen3-MoE (llama.cpp's `qwen3moe`): Qwen3's names, the router, and each sparse layer's experts stacked in one
# [E, ...] tensor per projection, which the file presents as E tensors named as Hugging Face stores them (one
# expert's rows each: "{expert}" in the name); a dense layer (mlp_only_layers) keeps Qwen3's ffn_* names.
_QWEN3_MOE_LAYER_NAMES = {
    **_QWEN3_LAYER_NAMES,
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.{expert}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{expert}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{expert}.down_proj.weight",
}
# Each GGUF family's names, by its `qwenjax.model.registry` entry: (global names, names within blk.N).
NAME_TABLES: dict[str, tuple[Mapping[str, str], Mapping[str, str]]] = {
    "qwen2": (_GLOBAL_NAMES, _LAYER_NAMES), "qwen3": (_GLOBAL_NAMES, _QWEN3_LAYER_NAMES),
    "qwen3_moe": (_GLOBAL_NAMES, _QWEN3_MOE_LAYER_NAMES)}
# What a family's config.json says it is.
_HF_IDENTITY = {"qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
                "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe")}
# Sort keys (group, layer, position) putting embeddings first, then layers, then the final norm and head.
_GLOBAL_ORDER = {"token_embd.weight": (0, 0, 0), "output_norm.weight": (2, 0, 0), "output.weight": (3, 0, 0)}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# Dequantization work unit: rows are grouped to about this many values per thread task.
_CHUNK_VALUES = 1 << 20


class _Tensor(NamedTuple):
  gguf_name: str
  hf_name: str
  sort_key: tuple[int, ...]
  ggml_type: _GGMLType
  dims: tuple[int, ...]  # GGUF order, fastest-moving first.
  start: int  # Absolute byte offset in the file.
  nbytes: int

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(reversed(self.dims))


class GGUFCheckpoint:
  """A memory-mapped qwen2, qwen3 or qwen3moe GGUF file: Hugging Face config, tensors and tokenizer.

  Attributes:
    path: the file.
    architecture: `general.architecture`, "qwen2", "qwen3" or "qwen3moe" (anything else fails to open).
    metadata: every metadata key and its value (strings, numbers, bools, lists).
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = pathlib.Path(path)
    try:
      with open(self.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
          raise CheckpointError(f"{self.path} is not a GGUF file: it has only {size} bytes.")
        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
      raise CheckpointError(f"Cannot open GGUF file {self.path}: {e.strerror}.") from None
    try:
      metadata, tensors = _read_header(self._mmap, self.path)
      arch = metadata.get("general.architecture")
      try:
        self.entry = registry.for_gguf(arch, str(self.path))  # the model registry's entry for the file
      except ConfigError:
        supported = ", ".join(repr(a) for e in registry.ENTRIES for a in e.gguf_architectures)
        raise CheckpointError(
            f"{self.path} holds a {arch!r} model; this loader reads only {supported} (Qwen2/Qwen2.5, Qwen3 and "
            f"Qwen3-MoE text) GGUF files, not qwen2vl, qwen2moe or other architectures."
        ) from None
      self._tensors = _name_tensors(tensors, metadata.get(f"{arch}.block_count"), self.path,
                                    NAME_TABLES[self.entry.name], arch)
    except BaseException:
      self._mmap.close()
      raise
    self.metadata: Mapping[str, Any] = types.MappingProxyType(metadata)
    self.architecture: str = arch

  def close(self) -> None:
    """Unmaps the file; arrays already returned by `get_tensor` stay valid (they are copies)."""
    try:
      self._mmap.close()
    except BufferError:  # A view is still alive (e.g. in a traceback); the map goes when it does.
      pass

  def __enter__(self) -> GGUFCheckpoint:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def describe(self, name: str | None = None) -> str:
    """The file, for messages: "m.gguf (GGUF qwen2, 291 tensors, Q4_K_M)", or with `name` its GGUF tensor."""
    if name is not None and name in self._tensors:
      t = self._tensors[name]
      return f"{self.path} (GGUF tensor {t.gguf_name}, {t.ggml_type.name})"
    file_type = self.metadata.get("general.file_type")
    try:
      kind = gguf_constants.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
      kind = f"file type {file_type}"
    return f"{self.path} (GGUF {self.architecture}, {len(self._tensors)} tensors, {kind})"

  def tensor_names(self) -> list[str]:
    """Hugging Face names of every tensor in the file: embeddings, layers in order, norm, head."""
    return [t.hf_name for t in sorted(self._tensors.values(), key=lambda t: t.sort_key)]

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    """The PyTorch shape of tensor `name` (Hugging Face naming), without reading its data."""
    return self._tensor(name).shape

  def tensor_type(self, name: str) -> str:
    """The ggml storage type of tensor `name`, e.g. "Q4_K" or "F32"."""
    return self._tensor(name).ggml_type.name

  def get_tensor(self, name: str) -> np.ndarray:
    """Dequantizes tensor `name` (Hugging Face naming) to a new float32 array in PyTorch shape."""
    t = self._tensor(name)
    if t.ggml_type not in SUPPORTED_TENSOR_TYPES:
      supported = ", ".join(sorted(k.name for k in SUPPORTED_TENSOR_TYPES))
      raise CheckpointError(
          f"{self.path} stores tensor {t.gguf_name!r} as {t.ggml_type.name}, which qwenjax cannot "
          f"dequantize (supported: {supported})."
      )
    row = t.dims[0] if t.dims else 1
    rows = math.prod(t.dims[1:])
    raw = np.frombuffer(self._mmap, np.uint8, t.nbytes, t.start).reshape(rows, t.nbytes // max(rows, 1))
    out = np.empty((rows, row), np.float32)
    step = max(1, _CHUNK_VALUES // max(row, 1))

    def dequantize(begin: int) -> None:
      out[begin:begin + step] = gguf_quants.dequantize(raw[begin:begin + step], t.ggml_type)

    if rows <= step:
      dequantize(0)
    else:  # numpy releases the GIL in the heavy ops, so threads overlap well.
      workers = min(os.cpu_count() or 1, 8)
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(dequantize, range(0, rows, step)):
          pass
    raw = None  # the view of the map goes now, not with the closure
    self._release(t)
    return out.reshape(t.shape)

  def _release(self, t: _Tensor) -> None:
    """Drops the file pages of tensor `t` from this process's resident memory once it has been read: a mapped
    file's pages count in RSS while mapped, and a loader that touched the whole file would hold it all (they stay
    in the page cache; a second read maps them again)."""
    page = mmap.PAGESIZE
    begin, end = t.start // page * page, -(-(t.start + t.nbytes) // page) * page
    end = min(end, len(self._mmap))
    if end > begin and hasattr(mmap, "MADV_DONTNEED"):
      self._mmap.madvise(mmap.MADV_DONTNEED, begin, end - begin)

  def get_int8_rows(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A Q8_0 tensor straight to int8 with one scale per row, or None for any other type (`get_tensor` then).

    Returns (values int8 [rows, row], scale float32 [rows]) in PyTorch shape's row order: the file's int8 values
    rescaled from their 32-value blocks' float16 scales d to one scale per row (s = max |d q| / 127, values =
    round(d q / s)), a chunk of rows at a time, so no float32 copy of the tensor is made. The numbers equal
    `qwenjax.model.layers.quantize_host(get_tensor(name), axes=(1,))` exactly: d q is exact in float32."""
    t = self._tensor(name)
    if t.ggml_type != _GGMLType.Q8_0 or len(t.dims) != 2:
      return None
    row, rows = t.dims
    raw = np.frombuffer(self._mmap, np.uint8, t.nbytes, t.start).reshape(rows, row // 32, 34)
    values, scale = np.empty((rows, row), np.int8), np.empty(rows, np.float32)
    step = max(1, _CHUNK_VALUES // row)
    for begin in range(0, rows, step):
      blocks = raw[begin:begin + step]  # [r, B, 34]: float16 d, then 32 int8 values
      d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)  # [r, B, 1]
      w = blocks[:, :, 2:].copy().view(np.int8).astype(np.float32) * d  # [r, B, 32], exact
      values[begin:begin + step], scale[begin:begin + step] = quantize_host(w.reshape(-1, row), (1,))
    raw = None
    self._release(t)
    return values, scale

  def hf_config(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict (Qwen2ForCausalLM's, Qwen3ForCausalLM's or Qwen3MoeForCausalLM's) this
    file's metadata describes."""
    a = self.architecture
    hidden = self._int(f"{a}.embedding_length")
    heads = self._int(f"{a}.attention.head_count")
    kv_heads = self._int(f"{a}.attention.head_count_kv", default=heads)
    head_dim = self.metadata.get(f"{a}.attention.key_length")  # Qwen3's own head size; else hidden / heads
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads or (head_dim is None and hidden % heads):
      raise CheckpointError(
          f"{self.path} declares {heads} attention heads and {kv_heads} key/value heads for hidden "
          f"size {hidden}; {a} needs heads dividing the hidden size (or {a}.attention.key_length) and key/value "
          f"heads dividing heads."
      )
    head_dim = hidden // heads if head_dim is None else self._int(f"{a}.attention.key_length")
    value_length = self.metadata.get(f"{a}.attention.value_length", head_dim)
    if value_length != head_dim:
      raise CheckpointError(f"{self.path} has keys of {head_dim} and values of {value_length} dims per head "
                            f"({a}.attention.key_length / value_length); {a} has one head size.")
    rotary = self.metadata.get(f"{a}.rope.dimension_count")
    if rotary is not None and rotary != head_dim:
      raise CheckpointError(
          f"{self.path} rotates {rotary} of each head's {head_dim} dims "
          f"({a}.rope.dimension_count); {a} rotates the whole head."
      )
    if "model.embed_tokens.weight" in self._tensors:
      vocab = self.tensor_shape("model.embed_tokens.weight")[0]
    elif "tokenizer.ggml.tokens" in self.metadata:
      vocab = len(self.metadata["tokenizer.ggml.tokens"])
    else:
      raise CheckpointError(
          f"{self.path} has neither token_embd.weight nor tokenizer.ggml.tokens to size the vocabulary.")
    tokens = self.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) > vocab:
      raise CheckpointError(
          f"{self.path} lists {len(tokens)} tokens but token_embd.weight has only {vocab} rows."
      )
    architecture, model_type = _HF_IDENTITY[a]
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": self._int(f"{a}.feed_forward_length"),
        "num_hidden_layers": self._int(f"{a}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        **({"head_dim": head_dim} if a in ("qwen3", "qwen3moe") else {}),
        "hidden_act": "silu",
        "rms_norm_eps": _float32_repr(self._number(f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_repr(self._number(f"{a}.rope.freq_base", default=10000.0)),
        "max_position_embeddings": self._int(f"{a}.context_length"),
        "rope_scaling": self._rope_scaling(),
        "use_sliding_window": False,
        "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        "torch_dtype": "float32",
    }
    if a == "qwen3moe":  # llama.cpp renormalises the chosen experts' weights unless the file says otherwise
      moe_size = self._int(f"{a}.expert_feed_forward_length")
      # No mlp_only_layers in GGUF metadata: a layer without a router (ffn_gate_inp) is a dense one.
      routed = {t.hf_name.split(".")[2] for t in self._tensors.values() if t.hf_name.endswith(".mlp.gate.weight")}
      config.update(mlp_only_layers=[i for i in range(config["num_hidden_layers"]) if str(i) not in routed],
                    num_experts=self._int(f"{a}.expert_count"),
                    num_experts_per_tok=self._int(f"{a}.expert_used_count"), moe_intermediate_size=moe_size,
                    intermediate_size=self._int(f"{a}.feed_forward_length", default=moe_size),
                    norm_topk_prob=bool(self.metadata.get(f"{a}.expert_weights_norm", True)))
    for key, gguf_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                          ("eos_token_id", "tokenizer.ggml.eos_token_id")):
      if gguf_key in self.metadata:
        config[key] = self._int(gguf_key)
    return config

  def tokenizer(self) -> Tokenizer:
    """The byte-level BPE tokenizer and chat template stored in this file's metadata (`qwenjax.text.gguf_vocab`)."""
    return Tokenizer.from_gguf(self.metadata, str(self.path))

  def _tensor(self, name: str) -> _Tensor:
    try:
      return self._tensors[name]
    except KeyError:
      raise CheckpointError(f"{self.path} has no tensor {name!r} (Hugging Face naming).") from None

  def _int(self, key: str, default: int | None = None) -> int:
    value = self.metadata.get(key, default)
    if value is None:
      raise CheckpointError(f"{self.path} lacks metadata key {key!r}, which a qwen2 GGUF must have.")
    if isinstance(value, bool) or not isinstance(value, int):
      raise CheckpointError(f"{self.path} has metadata {key!r} = {value!r}; expected an integer.")
    return value

  def _number(self, key: str, default: float | None = None) -> float:
    value = self.metadata.get(key, default)
    if value is None:
      raise CheckpointError(f"{self.path} lacks metadata key {key!r}, which a qwen2 GGUF must have.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise CheckpointError(f"{self.path} has metadata {key!r} = {value!r}; expected a number.")
    return float(value)

  def _rope_scaling(self) -> dict[str, Any] | None:
    a = self.architecture
    kind = self.metadata.get(f"{a}.rope.scaling.type", "none")
    if kind == "none":
      return None
    if kind not in ("linear", "yarn"):
      raise CheckpointError(
          f"{self.path} asks for RoPE scaling {kind!r} ({a}.rope.scaling.type); qwenjax supports 'linear' and 'yarn'."
      )
    scaling: dict[str, Any] = {
        "type": kind,
        "factor": _float32_repr(self._number(f"{a}.rope.scaling.factor")),
    }
    if kind == "yarn":
      scaling["original_max_position_embeddings"] = self._int(f"{a}.rope.scaling.original_context_length")
    return scaling


def _float32_repr(value: float) -> float:
  """The shortest decimal that rounds to the same float32: GGUF's 9.99999997e-07 is config.json's 1e-06."""
  return float(str(np.float32(value)))


def _name_tensors(
    tensors: list[tuple[str, _GGMLType, tuple[int, ...], int, int]],
    block_count: Any,
    path: pathlib.Path,
    names: tuple[Mapping[str, str], Mapping[str, str]],
    arch: str = "qwen2",
) -> dict[str, _Tensor]:
  """Maps GGUF tensor names to Hugging Face ones by `names` (a NAME_TABLES entry); an unknown name is an error."""
  global_names, layer_names = names
  layer_order = {name: i for i, name in enumerate(layer_names)}
  named: dict[str, _Tensor] = {}
  for gguf_name, ggml_type, dims, start, nbytes in tensors:
    if gguf_name in global_names:
      hf_name = global_names[gguf_name]
      sort_key = _GLOBAL_ORDER[gguf_name]
    else:
      match = _LAYER_RE.fullmatch(gguf_name)
      if match is None or match.group(2) not in layer_names:
        raise CheckpointError(f"{path} has tensor {gguf_name!r}, which is not part of a {arch} model.")
      layer = int(match.group(1))
      if isinstance(block_count, int) and layer >= block_count:
        raise CheckpointError(
            f"{path} has tensor {gguf_name!r} but {arch}.block_count says there are only {block_count} layers."
        )
      hf_name = f"model.layers.{layer}.{layer_names[match.group(2)]}"
      sort_key = (1, layer, layer_order[match.group(2)])
      if "{expert}" in hf_name:  # [E, rows, row]: expert e's rows are the e-th contiguous E-th of the bytes
        experts = dims[-1] if len(dims) == 3 else 0
        if not experts or nbytes % experts:
          raise CheckpointError(f"{path} has tensor {gguf_name!r} of shape {tuple(reversed(dims))}; expected "
                                "[experts, rows, row].")
        size = nbytes // experts
        for e in range(experts):
          name = hf_name.format(expert=e)
          named[name] = _Tensor(f"{gguf_name}[{e}]", name, (*sort_key, e), ggml_type,
                                dims[:2], start + e * size, size)
        continue
    named[hf_name] = _Tensor(gguf_name, hf_name, sort_key, ggml_type, dims, start, nbytes)
  return named


class _Cursor:
  """Reads GGUF header fields from a buffer, failing with a message that names the file."""

  def __init__(self, buf: mmap.mmap, path: pathlib.Path):
    self.buf = buf
    self.size = len(buf)
    self.path = path
    self.pos = 0

  def truncated(self, what: str, at: int) -> CheckpointError:
    return CheckpointError(
        f"{self.path} is truncated or corrupt: {what} at byte {at} runs past its end ({self.size} bytes).")

  def take(self, n: int, what: str) -> int:
    start = self.pos
    if start + n > self.size:
      raise self.truncated(what, start)
    self.pos = start + n
    return start

  def scalar(self, fmt: struct.Struct, what: str) -> Any:
    return fmt.unpack_from(self.buf, self.take(fmt.size, what))[0]

  def string(self, what: str) -> str:
    n = self.scalar(_U64, what)
    start = self.take(n, what)
    try:
      return self.buf[start:start + n].decode("utf-8")
    except UnicodeDecodeError:
      raise CheckpointError(f"{self.path} has {what} at byte {start} that is not valid UTF-8.") from None

  def value(self, value_type: int, what: str) -> Any:
    if value_type == _ValueType.STRING:
      return self.string(what)
    if value_type == _ValueType.ARRAY:
      item_type = self.scalar(_U32, what)
      count = self.scalar(_U64, what)
      return self.array(item_type, count, what)
    if value_type not in _SCALARS:
      raise CheckpointError(f"{self.path} has {what} of unknown GGUF value type {value_type}.")
    return self.scalar(_SCALARS[value_type], what)

  def array(self, item_type: int, count: int, what: str) -> list[Any]:
    if item_type in _ARRAY_DTYPES:
      dtype = np.dtype(_ARRAY_DTYPES[item_type])
      start = self.take(count * dtype.itemsize, what)
      return np.frombuffer(self.buf, dtype, count, start).tolist()
    if item_type == _ValueType.STRING:  # The tokenizer's ~150k tokens and merges: keep this loop tight.
      buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
      items = []
      try:
        for _ in range(count):
          if pos + 8 > size:
            raise self.truncated(what, pos)
          end = pos + 8 + unpack(buf, pos)[0]
          if end > size:
            raise self.truncated(what, pos)
          items.append(buf[pos + 8:end].decode("utf-8"))
          pos = end
      except UnicodeDecodeError:
        raise CheckpointError(f"{self.path} has {what} with a string at byte {pos} that is not valid UTF-8.") from None
      self.pos = pos
      return items
    if count and item_type != _ValueType.ARRAY and item_type not in _SCALARS:
      raise CheckpointError(f"{self.path} has {what}, an array of unknown GGUF value type {item_type}.")
    return [self.value(item_type, what) for _ in range(count)]


def _read_header(buf: mmap.mmap, path: pathlib.Path) -> tuple[dict[str, Any], list[tuple]]:
  """Parses and checks the header, metadata and tensor table of a GGUF file.

  Returns:
    (metadata, tensors) with tensors as (name, ggml type, dims, absolute start, byte size).
  """
  cursor = _Cursor(buf, path)
  magic = buf[:4]
  if magic != _MAGIC:
    raise CheckpointError(f"{path} is not a GGUF file: it starts with {magic!r}, not {_MAGIC!r}.")
  cursor.pos = 4
  version = cursor.scalar(_U32, "the version")
  if version & 0xFFFF == 0 and version:
    raise CheckpointError(f"{path} is a big-endian GGUF file, which qwenjax does not read.")
  if version not in _VERSIONS:
    raise CheckpointError(f"{path} is GGUF version {version}; qwenjax reads versions 2 and 3.")
  tensor_count = cursor.scalar(_U64, "the tensor count")
  kv_count = cursor.scalar(_U64, "the metadata count")

  metadata: dict[str, Any] = {}
  for i in range(kv_count):
    key = cursor.string(f"metadata key {i + 1} of {kv_count}")
    value_type = cursor.scalar(_U32, f"the type of metadata {key!r}")
    if key in metadata:
      raise CheckpointError(f"{path} repeats metadata key {key!r}.")
    metadata[key] = cursor.value(value_type, f"metadata {key!r}")

  alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
  if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
    raise CheckpointError(f"{path} has general.alignment = {alignment!r}; it must be a power of two.")

  infos = []
  for i in range(tensor_count):
    what = f"tensor info {i + 1} of the {tensor_count} its header declares"
    name = cursor.string(what)
    if not name or len(name.encode()) >= _MAX_NAME_BYTES:
      raise CheckpointError(
          f"{path} has {what} named {name!r}, which ggml does not allow, so its tensor table is corrupt."
      )
    n_dims = cursor.scalar(_U32, what)
    if n_dims > _MAX_DIMS:
      raise CheckpointError(
          f"{path} has {what} with {n_dims} dimensions (at most {_MAX_DIMS}), so its tensor table is corrupt."
      )
    dims = tuple(np.frombuffer(buf, "<u8", n_dims, cursor.take(8 * n_dims, what)).tolist())
    type_id = cursor.scalar(_U32, what)
    offset = cursor.scalar(_U64, what)
    infos.append((name, dims, type_id, offset))

  data_start = -(-cursor.pos // alignment) * alignment
  tensors = []
  seen = set()
  for name, dims, type_id, offset in infos:
    if name in seen:
      raise CheckpointError(f"{path} lists tensor {name!r} twice.")
    seen.add(name)
    try:
      ggml_type = _GGMLType(type_id)
    except ValueError:
      raise CheckpointError(f"{path} stores tensor {name!r} as unknown ggml type {type_id}.") from None
    block, type_size = gguf_constants.GGML_QUANT_SIZES[ggml_type]
    if dims and dims[0] % block:
      raise CheckpointError(
          f"{path} has tensor {name!r} with rows of {dims[0]} values, not a multiple of the "
          f"{ggml_type.name} block size {block}."
      )
    if offset % alignment:
      raise CheckpointError(
          f"{path} has tensor {name!r} at data offset {offset}, not a multiple of the alignment {alignment}.")
    nbytes = math.prod(dims) // block * type_size
    start = data_start + offset
    if start + nbytes > len(buf):
      raise CheckpointError(
          f"{path} is truncated or its header's tensor count ({tensor_count}) is wrong: tensor {name!r} "
          f"needs bytes {start}-{start + nbytes} but the file has {len(buf)}."
      )
    tensors.append((name, ggml_type, dims, start, nbytes))

  ordered = sorted(tensors, key=lambda t: t[3])
  for (a, *_, a_start, a_bytes), (b, *_, b_start, _) in zip(ordered, ordered[1:]):
    if a_start + a_bytes > b_start:
      raise CheckpointError(f"{path} has overlapping data for tensors {a!r} and {b!r}, so its tensor table is corrupt.")
  padded = sum(-(-t[4] // alignment) * alignment for t in tensors)
  stray = len(buf) - data_start - padded
  if stray >= alignment:
    raise CheckpointError(
        f"{path} has {stray} bytes of tensor data that none of the {tensor_count} tensors its header "
        f"declares accounts for, so its tensor count does not match its data."
    )
  return metadata, tensors
