"""Qwen's GPTQ (Int4, Int8) and AWQ (int4) releases read as float checkpoints, dequantized exactly.

`quantization_config(hf_config, directory)` reads the settings (config.json's `quantization_config`, else
`quantize_config.json` or AutoAWQ's `quant_config.json`); `DequantizedSource(SafetensorsSource(d), qcfg)` then
offers `{prefix}.weight` [O, I] float32 in place of each quantized linear's `{prefix}.qweight/.qzeros/.scales`
(and `.g_idx`), dequantizing one linear per `get_tensor` call, so the float loader runs unchanged.

Letters: I input features, O output features, G groups, P = 32 / bits values per int32 word. A value at field k of
a word sits in bits [k * bits, (k + 1) * bits), low bits first. The fields below were read from the formats' own
code: AutoGPTQ `auto_gptq/nn_modules/qlinear/qlinear_cuda.py` (`QuantLinear.pack`, `forward`), GPTQModel
`gptqmodel/nn_modules/qlinear/__init__.py` (`pack_original`, `dequantize_weight`) and `gptqmodel/utils/model.py`
(`convert_gptq_v1_to_v2_format_module`), AutoAWQ `awq/modules/linear/gemm.py` (`WQLinear_GEMM.from_linear`) and
`awq/utils/packing_utils.py` (`unpack_awq`, `reverse_awq_order`, `dequantize_gemm`).

GPTQ, per linear:
  qweight  int32 [I / P, O]   packed along the input: word r of column o holds inputs r * P + k at field k
  qzeros   int32 [G, O / P]   packed along the output: word c of row g holds outputs c * P + k at field k
  scales   fp16  [G, O]
  g_idx    int32 [I]          the group of each input (i // group_size, unless desc_act or GPTQModel's
                              act-group-aware order permute it; the rows of qweight stay in input order)
  w[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]
  checkpoint_format "gptq" (v1, what AutoGPTQ, optimum and Qwen's releases write) stores z - 1 in each field;
  "gptq_v2" stores z. v1 is read as GPTQModel converts it, adding 1 to every field by one word-wide addition: for
  a symmetric checkpoint (every Qwen release: z = 2^(bits-1)) this is AutoGPTQ's per-field z + 1 exactly.
AWQ GEMM (4-bit only), per linear:
  qweight  int32 [I, O / 8]   packed along the output, interleaved: word c holds output 8c + AWQ_ORDER[k] at
                              field k, i.e. output 8c + j at field AWQ_REVERSE_ORDER[j]
  qzeros   int32 [G, O / 8]   the same order; zeros stored as they are
  scales   fp16  [G, O]       group of input i: i // group_size
  w[o, i] = (q[i, o] - z[i // group_size, o]) * s[i // group_size, o]

Exactness: q - z is an integer of at most 8 bits in magnitude and an fp16 (or bf16) scale has 11 (8) significant
bits, so their product is exact in float32; the reference kernels form the same product in fp16, which rounds.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from qwenjax._errors import CheckpointError
from qwenjax.config import read_json


GPTQ_BITS = (2, 4, 8)
AWQ_BITS = (4,)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field k of an AWQ word holds output 8c + AWQ_ORDER[k]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output 8c + j sits at field AWQ_REVERSE_ORDER[j]

_SCALE_DTYPES = ("float16", "bfloat16", "float32")
_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_AWQ_PARTS = ("qweight", "qzeros", "scales")
_SUPPORTED = "qwenjax reads GPTQ (2, 4 or 8 bits, checkpoint_format gptq or gptq_v2) and AWQ (4-bit GEMM)"


# --- Unpacking -------------------------------------------------------------------------------------------------------

def _words(array: np.ndarray, bits: int, name: str, where: str) -> np.ndarray:
  """A packed int32 tensor as native uint32 words (the same bits), refusing any other packing dtype."""
  dtype = np.dtype(array.dtype)
  if dtype.kind not in "iu" or dtype.itemsize != 4:
    raise CheckpointError(f"{where}: tensor {name!r} has dtype {dtype}, expected int32 words of {bits}-bit values.")
  return np.ascontiguousarray(array, dtype=np.dtype(dtype.kind + "4")).view(np.uint32)


def _unpack(words: np.ndarray, bits: int, *, axis: int, order: tuple[int, ...] | None = None) -> np.ndarray:
  """Splits 2-D uint32 words into their 32 / bits fields along `axis`: [n, m] -> [n * P, m] (axis 0) or
  [n, m * P] (axis 1), uint8. Value k of a word is field order[k] (field k when order is None)."""
  p, mask = 32 // bits, np.uint32((1 << bits) - 1)
  n, m = words.shape
  out = np.empty((n, p, m) if axis == 0 else (n, m, p), np.uint8)
  for k in range(p):
    shift = np.uint32(bits * (k if order is None else order[k]))
    target = out[:, k, :] if axis == 0 else out[:, :, k]
    np.bitwise_and(words >> shift, mask, out=target, casting="unsafe")
  return out.reshape((n * p, m) if axis == 0 else (n, m * p))


def _scales(scales: np.ndarray, name: str, where: str) -> np.ndarray:
  if np.dtype(scales.dtype).name not in _SCALE_DTYPES:
    raise CheckpointError(f"{where}: tensor {name!r} has dtype {scales.dtype}, expected float16, bfloat16 or "
                          "float32 scales.")
  return np.asarray(scales, np.float32)


def _grid(q: np.ndarray, z: np.ndarray, s: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
  """(q - z[g]) * s[g] as float32 [O, I], from q uint8 [O, I] and z, s float32 [O, G]; the group of input i is
  groups[i] (None: G full groups of I / G consecutive inputs)."""
  o, i = q.shape
  if groups is None:
    g = z.shape[1]
    w = np.empty((o, g, i // g), np.float32)
    np.subtract(q.reshape(o, g, i // g), z[:, :, None], out=w)
    np.multiply(w, s[:, :, None], out=w)
    return w.reshape(o, i)
  w = q.astype(np.float32)
  w -= np.take(z, groups, axis=1)
  w *= np.take(s, groups, axis=1)
  return w


# --- Shapes (one check for header shapes and for arrays) -------------------------------------------------------------

def _num_groups(in_features: int, group_size: int) -> int:
  return 1 if group_size == -1 else math.ceil(in_features / group_size)


def _expect(where: Callable[[str], str], name: str, part: str, got: tuple, want: tuple, why: str) -> None:
  if tuple(got) != tuple(want):
    raise CheckpointError(f"{where(part)}: tensor '{name}.{part}' has shape {tuple(got)}, expected {tuple(want)} "
                          f"{why}.")


def _two_dims(where: Callable[[str], str], name: str, shapes: Mapping[str, tuple]) -> None:
  for part, shape in shapes.items():
    if part != "g_idx" and len(shape) != 2:
      raise CheckpointError(f"{where(part)}: tensor '{name}.{part}' has shape {tuple(shape)}, expected 2 dims.")


def gptq_weight_shape(shapes: Mapping[str, tuple], *, bits: int, group_size: int, name: str = "linear",
                      where: str | Callable[[str], str] = "checkpoint") -> tuple[int, int]:
  """The [O, I] of a GPTQ linear from its tensors' shapes (`shapes[part]`, part in qweight, qzeros, scales and,
  when present, g_idx); raises CheckpointError naming the tensor if they do not fit together."""
  where = where if callable(where) else (lambda part, w=where: w)
  if bits not in GPTQ_BITS:
    raise CheckpointError(f"{where('qweight')}: {name}: {bits}-bit GPTQ is not supported; {_SUPPORTED}.")
  _two_dims(where, name, shapes)
  p = 32 // bits
  in_features, out = shapes["qweight"][0] * p, shapes["qweight"][1]
  g = _num_groups(in_features, group_size)
  why = f"for {bits}-bit GPTQ with group_size {group_size} and qweight {tuple(shapes['qweight'])} ([I/{p}, O])"
  if shapes.get("g_idx") is not None:  # first: the input count it holds tells a wrong bit width apart
    _expect(where, name, "g_idx", shapes["g_idx"], (in_features,), why)
  _expect(where, name, "scales", shapes["scales"], (g, out), why)
  _expect(where, name, "qzeros", shapes["qzeros"], (g, math.ceil(out / p)), why)
  return out, in_features


def awq_weight_shape(shapes: Mapping[str, tuple], *, bits: int, group_size: int, name: str = "linear",
                     where: str | Callable[[str], str] = "checkpoint") -> tuple[int, int]:
  """The [O, I] of an AWQ GEMM linear from the shapes of its qweight, qzeros and scales."""
  where = where if callable(where) else (lambda part, w=where: w)
  if bits not in AWQ_BITS:
    raise CheckpointError(f"{where('qweight')}: {name}: {bits}-bit AWQ is not supported; {_SUPPORTED}.")
  _two_dims(where, name, shapes)
  p = 32 // bits
  in_features, out = shapes["qweight"][0], shapes["qweight"][1] * p
  if group_size != -1 and in_features % group_size:
    raise CheckpointError(f"{where('qweight')}: tensor '{name}.qweight' has {in_features} input rows, not a "
                          f"multiple of the AWQ group_size {group_size}.")
  g = _num_groups(in_features, group_size)
  why = f"for {bits}-bit AWQ with group_size {group_size} and qweight {tuple(shapes['qweight'])} ([I, O/{p}])"
  _expect(where, name, "scales", shapes["scales"], (g, out), why)
  _expect(where, name, "qzeros", shapes["qzeros"], (g, shapes["qweight"][1]), why)
  return out, in_features


# --- Dequantization --------------------------------------------------------------------------------------------------

def dequantize_gptq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None, *,
                    bits: int, group_size: int, checkpoint_format: str = "gptq", name: str = "linear",
                    where: str = "checkpoint") -> np.ndarray:
  """A GPTQ linear -> its float32 weight [O, I] (torch Linear layout), exactly (q - z) * s.

  qweight int32 [I/P, O]; qzeros int32 [G, ceil(O/P)]; scales float16 [G, O]; g_idx int [I] (None: input i is in
  group i // group_size, as when desc_act is off); group_size -1 means one group. checkpoint_format "gptq" (v1:
  qzeros hold z - 1) or "gptq_v2" (they hold z). name, where: the linear's tensor prefix and its file, for errors.
  """
  shapes = {"qweight": qweight.shape, "qzeros": qzeros.shape, "scales": scales.shape,
            "g_idx": None if g_idx is None else g_idx.shape}
  out, in_features = gptq_weight_shape(shapes, bits=bits, group_size=group_size, name=name, where=where)
  if checkpoint_format not in GPTQ_FORMATS:
    raise CheckpointError(f"{where}: {name}: GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
                          f"{_SUPPORTED}.")
  p = 32 // bits
  q_words = _words(qweight, bits, f"{name}.qweight", where)
  z_words = _words(qzeros, bits, f"{name}.qzeros", where)
  s = _scales(scales, f"{name}.scales", where)
  if checkpoint_format == "gptq":  # v1 fields hold z - 1: add 1 to each, one word-wide add (GPTQModel's v1 -> v2)
    z_words = z_words + np.uint32(sum(1 << (bits * k) for k in range(p)))
  q = _unpack(np.ascontiguousarray(q_words.T), bits, axis=1)  # [O, I]
  z = _unpack(z_words, bits, axis=1)[:, :out]  # [G, O]
  g = z.shape[0]
  groups = None
  if g_idx is not None:
    if np.dtype(g_idx.dtype).kind not in "iu":
      raise CheckpointError(f"{where}: tensor '{name}.g_idx' has dtype {g_idx.dtype}, expected integer group indices.")
    groups = np.asarray(g_idx, np.int64)
    bad = np.flatnonzero((groups < 0) | (groups >= g))
    if bad.size:
      raise CheckpointError(f"{where}: tensor '{name}.g_idx' puts input {bad[0]} in group {groups[bad[0]]}, outside "
                            f"the {g} groups of its scales.")
  size = in_features if group_size == -1 else group_size
  if in_features % g == 0 and in_features // g == size and (
      groups is None or np.array_equal(groups, np.arange(in_features) // size)):
    groups = None  # contiguous full groups: broadcast instead of gathering
  elif groups is None:
    groups = np.arange(in_features) // size
  return _grid(q, np.ascontiguousarray(z.T, np.float32), np.ascontiguousarray(s.T), groups)


def dequantize_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, *, bits: int, group_size: int,
                   version: str = "gemm", name: str = "linear", where: str = "checkpoint") -> np.ndarray:
  """An AWQ linear -> its float32 weight [O, I] (torch Linear layout), exactly (q - z) * s.

  qweight int32 [I, O/8] and qzeros int32 [G, O/8] packed in AutoAWQ's GEMM order (AWQ_ORDER); scales float16
  [G, O]; input i is in group i // group_size (-1: one group). Only version "gemm" is read.
  """
  out, in_features = awq_weight_shape({"qweight": qweight.shape, "qzeros": qzeros.shape, "scales": scales.shape},
                                      bits=bits, group_size=group_size, name=name, where=where)
  if version not in AWQ_VERSIONS:
    raise CheckpointError(f"{where}: {name}: AWQ version {version!r} is not supported; {_SUPPORTED}.")
  q_words = _words(qweight, bits, f"{name}.qweight", where)
  z_words = _words(qzeros, bits, f"{name}.qzeros", where)
  s = _scales(scales, f"{name}.scales", where)
  q = _unpack(np.ascontiguousarray(q_words.T), bits, axis=0, order=AWQ_REVERSE_ORDER)  # [O, I]
  z = _unpack(z_words, bits, axis=1, order=AWQ_REVERSE_ORDER)  # [G, O]
  return _grid(q, np.ascontiguousarray(z.T, np.float32), np.ascontiguousarray(s.T), None)


# --- Config ----------------------------------------------------------------------------------------------------------

def _int(raw: Mapping[str, Any], keys: tuple[str, ...], where: str, default: int | None = None) -> int:
  value = next((raw[k] for k in keys if raw.get(k) is not None), default)
  if isinstance(value, bool) or not isinstance(value, int):
    raise CheckpointError(f"{where}: quantization setting {keys[0]!r} is {value!r}, expected an integer.")
  return value


def _bool(raw: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
  value = raw.get(key)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise CheckpointError(f"{where}: quantization setting {key!r} is {value!r}, expected true or false.")
  return value


def _group_size(raw: Mapping[str, Any], keys: tuple[str, ...], where: str) -> int:
  size = _int(raw, keys, where, default=128)
  if size != -1 and size <= 0:
    raise CheckpointError(f"{where}: group_size {size} is invalid; expected a positive size or -1 (one group).")
  return size


def quantization_config(hf_config: Mapping[str, Any], directory: pathlib.Path | str | None = None
                        ) -> dict[str, Any] | None:
  """The quantization settings of a checkpoint, normalised; None for a float checkpoint.

  Read from config.json's `quantization_config`, else (with a directory) from `quantize_config.json` (AutoGPTQ,
  GPTQModel) or `quant_config.json` (older AutoAWQ). Returns {"quant_method": "gptq", "bits", "group_size",
  "desc_act", "sym", "checkpoint_format", "source"} or {"quant_method": "awq", "bits", "group_size", "version",
  "zero_point", "source"}. Any other method (bitsandbytes, fp8, ...), bit width or packing raises CheckpointError.
  """
  directory = None if directory is None else pathlib.Path(directory)
  where = str(directory / "config.json") if directory is not None else "config.json"
  raw, default_method = hf_config.get("quantization_config"), None
  if raw is None and directory is not None:
    for file, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
      raw = read_json(directory / file, error=CheckpointError, optional=True)
      if raw is not None:
        where, default_method = str(directory / file), method
        break
  if raw is None:
    return None
  if not isinstance(raw, Mapping):
    raise CheckpointError(f"{where}: quantization_config is {type(raw).__name__}, expected an object.")
  method = raw.get("quant_method", default_method)
  method = method.lower() if isinstance(method, str) else method
  if method == "gptq":
    bits = _int(raw, ("bits",), where)
    if bits not in GPTQ_BITS:
      raise CheckpointError(f"{where}: {bits}-bit GPTQ is not supported; {_SUPPORTED}.")
    fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
    fmt = fmt.lower() if isinstance(fmt, str) else fmt
    if fmt not in GPTQ_FORMATS:
      raise CheckpointError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported; {_SUPPORTED}.")
    if raw.get("dynamic"):
      raise CheckpointError(f"{where}: per-module GPTQ overrides ('dynamic') are not supported; {_SUPPORTED} with "
                            "one setting for every linear.")
    if raw.get("pack_dtype", "int32") != "int32":
      raise CheckpointError(f"{where}: GPTQ pack_dtype {raw['pack_dtype']!r} is not supported; expected int32.")
    return {"quant_method": "gptq", "bits": bits, "group_size": _group_size(raw, ("group_size",), where),
            "desc_act": _bool(raw, "desc_act", where, False), "sym": _bool(raw, "sym", where, True),
            "checkpoint_format": fmt, "source": where}
  if method == "awq":
    bits = _int(raw, ("bits", "w_bit"), where)
    if bits not in AWQ_BITS:
      raise CheckpointError(f"{where}: {bits}-bit AWQ is not supported; {_SUPPORTED}.")
    version = raw.get("version") or raw.get("format") or "gemm"  # transformers reads a legacy "version" first
    version = version.lower() if isinstance(version, str) else version
    if version not in AWQ_VERSIONS:
      raise CheckpointError(f"{where}: AWQ version {version!r} is not supported; {_SUPPORTED} (repack it as GEMM).")
    if not _bool(raw, "zero_point", where, True):
      raise CheckpointError(f"{where}: AWQ without zero points (zero_point false) is not supported; {_SUPPORTED}.")
    return {"quant_method": "awq", "bits": bits, "group_size": _group_size(raw, ("group_size", "q_group_size"), where),
            "version": version, "zero_point": True, "source": where}
  raise CheckpointError(f"{where}: quant_method {method!r} is not supported; {_SUPPORTED}.")


# --- The source ------------------------------------------------------------------------------------------------------

class DequantizedSource:
  """A `TensorSource` over a GPTQ or AWQ checkpoint that looks like its float original.

  Each quantized linear's `{prefix}.qweight/.qzeros/.scales` (and GPTQ's `.g_idx`) is presented as one
  `{prefix}.weight` [O, I] float32, dequantized afresh on each `get_tensor` call (one linear in memory at a time);
  every other tensor (biases, norms, embeddings) passes through. All shapes are checked from the headers when the
  source is built; a missing or mis-shaped companion tensor is a CheckpointError naming its file and name.
  """

  def __init__(self, base, qcfg: Mapping[str, Any]):  # base: a `qwenjax.checkpoints.hf.TensorSource`
    self.base, self.qcfg = base, dict(qcfg)
    self._gptq = qcfg["quant_method"] == "gptq"
    parts = _GPTQ_PARTS if self._gptq else _AWQ_PARTS
    base_names = base.tensor_names()
    present = set(base_names)
    self._prefix_of: dict[str, str] = {}  # the name of each presented weight -> its tensor prefix
    self._with_g_idx = {n[:-len(".g_idx")] for n in base_names if self._gptq and n.endswith(".g_idx")}
    self._shapes: dict[str, tuple[int, int]] = {}
    self._names: list[str] = []
    for n in base_names:
      prefix, dot, part = n.rpartition(".")
      if not dot or part not in parts:
        self._names.append(n)
        continue
      weight = f"{prefix}.weight"
      if weight in self._prefix_of:
        continue
      self._prefix_of[weight] = prefix
      self._names.append(weight)
      self._shapes[weight] = self._check(prefix, present)

  def _check(self, prefix: str, present: set[str]) -> tuple[int, int]:
    needed = ["qweight", "qzeros", "scales"] + (["g_idx"] if self._gptq and self.qcfg["desc_act"] else [])
    for part in needed:
      if f"{prefix}.{part}" not in present:
        have = next(f"{prefix}.{p}" for p in _GPTQ_PARTS if f"{prefix}.{p}" in present)
        method = "AWQ" if not self._gptq else "GPTQ with desc_act" if self.qcfg["desc_act"] else "GPTQ"
        raise CheckpointError(f"{self.base.describe(have)}: tensor '{prefix}.{part}' is missing; a {method} linear "
                              f"needs {', '.join(f'{prefix}.{p}' for p in needed)}.")
    if prefix.endswith("embed_tokens"):  # GPTQModel packs embeddings [token, feature], unlike a linear
      raise CheckpointError(f"{self.base.describe(f'{prefix}.qweight')}: tensor '{prefix}.qweight' is a quantized "
                            "embedding; only quantized linears are read.")
    if f"{prefix}.weight" in present:
      raise CheckpointError(f"{self.base.describe(f'{prefix}.weight')}: tensor '{prefix}.weight' is stored beside "
                            f"the quantized '{prefix}.qweight'; a linear must be one or the other.")
    shapes = {p: tuple(self.base.tensor_shape(f"{prefix}.{p}")) for p in needed}
    if prefix in self._with_g_idx:
      shapes["g_idx"] = tuple(self.base.tensor_shape(f"{prefix}.g_idx"))
    shape_of = gptq_weight_shape if self._gptq else awq_weight_shape
    return shape_of(shapes, bits=self.qcfg["bits"], group_size=self.qcfg["group_size"], name=prefix,
                    where=lambda part: self.base.describe(f"{prefix}.{part}"))

  def tensor_names(self) -> list[str]:
    return list(self._names)

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name] if name in self._shapes else tuple(self.base.tensor_shape(name))

  def describe(self, name: str | None = None) -> str:
    if name in self._prefix_of:
      return self.base.describe(f"{self._prefix_of[name]}.qweight")
    return self.base.describe(name)

  def get_tensor(self, name: str) -> np.ndarray:
    if name not in self._prefix_of:
      return self.base.get_tensor(name)
    prefix, cfg = self._prefix_of[name], self.qcfg
    get = lambda part: self.base.get_tensor(f"{prefix}.{part}")
    where = self.describe(name)
    if self._gptq:
      g_idx = get("g_idx") if prefix in self._with_g_idx else None
      return dequantize_gptq(get("qweight"), get("qzeros"), get("scales"), g_idx, bits=cfg["bits"],
                             group_size=cfg["group_size"], checkpoint_format=cfg["checkpoint_format"], name=prefix,
                             where=where)
    return dequantize_awq(get("qweight"), get("qzeros"), get("scales"), bits=cfg["bits"],
                          group_size=cfg["group_size"], version=cfg["version"], name=prefix, where=where)
