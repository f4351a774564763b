"""Loading weights into the param tree, tensor by tensor, from any `TensorSource`.

A source names tensors the Hugging Face way (`model.layers.3.mlp.up_proj.weight`) and hands out one numpy
array at a time: `SafetensorsSource` reads Qwen's released checkpoints (one file or an indexed set of shards),
`qwenjax.checkpoints.gguf_file.GGUFCheckpoint` dequantizes GGUF tensors. `load_params` walks the weight declarations of
`qwenjax.model.decoder`, so what is expected, its shape and its layout come from one place.

Peak host memory stays near one copy of the weights: each stacked [L, ...] weight is filled layer by layer into
one buffer, placed on device, and the buffer dropped before the next weight. A quantized model
(`qwenjax.model.layers.QuantizedWeight`) is quantized the same way, one layer's float32 tensor at a time, so its
peak is the int8 model plus one float32 tensor.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx

from qwenjax._errors import CheckpointError, first_line
from qwenjax.checkpoints import quantized_formats
from qwenjax.config import QwenConfig, read_json
from qwenjax.model import registry
from qwenjax.model.decoder import Qwen2, weight_declarations
from qwenjax.model.layers import quantize_host
from qwenjax.parallel import sharding
from qwenjax.parallel.axes import LAYERS

# Tensors some checkpoints carry that hold nothing the model needs (non-persistent RoPE buffers of old exports).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class TensorSource(Protocol):
  """Hugging Face-named tensors, one at a time."""

  def tensor_names(self) -> list[str]: ...

  def tensor_shape(self, name: str) -> tuple[int, ...]: ...

  def get_tensor(self, name: str) -> np.ndarray: ...

  def describe(self, name: str | None = None) -> str:
    """The file that holds `name` (or the checkpoint), for error messages."""
    ...


class SafetensorsSource:
  """A Hugging Face checkpoint directory: `model.safetensors`, or shards listed in `model.safetensors.index.json`.

  Tensors are read lazily through safetensors' memory map; nothing is unpickled, ever.
  """

  def __init__(self, directory: str | pathlib.Path):
    import safetensors  # pylint: disable=g-import-not-at-top

    self.directory = pathlib.Path(directory)
    index = self.directory / "model.safetensors.index.json"
    single = self.directory / "model.safetensors"
    if index.exists():
      weight_map = read_json(index, error=CheckpointError).get("weight_map")
      if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map of tensor names to files).")
      files = sorted(set(weight_map.values()))
    elif single.exists():
      weight_map, files = None, ["model.safetensors"]
    else:
      found = sorted(p.name for p in self.directory.glob("*"))[:10] if self.directory.is_dir() else []
      bins = [f for f in found if f.endswith((".bin", ".pt", ".pth"))]
      hint = " PyTorch pickle files are never loaded; convert them to safetensors." if bins else ""
      raise CheckpointError(f"{self.directory}: no model.safetensors or model.safetensors.index.json "
                            f"(found: {', '.join(found) or 'nothing'}).{hint}")
    self._handles = {}
    self._where: dict[str, str] = {}
    for f in files:
      path = self.directory / f
      if not path.exists():
        raise CheckpointError(f"{path}: shard listed in the index is missing.")
      try:
        handle = safetensors.safe_open(str(path), framework="flax")
        names = list(handle.keys())
      except Exception as e:  # safetensors raises its own error types for bad headers and short files.
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)}).") from None
      self._handles[f] = handle
      for n in names:
        self._where[n] = f
    if weight_map is not None:
      for name, f in weight_map.items():
        if self._where.get(name) != f:
          raise CheckpointError(f"{self.directory / f}: the index lists tensor {name!r}, but that file lacks it.")

  def tensor_names(self) -> list[str]:
    return list(self._where)

  def describe(self, name: str | None = None) -> str:
    return str(self.directory / self._where[name]) if name in self._where else str(self.directory)

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def get_tensor(self, name: str) -> np.ndarray:
    try:
      return np.asarray(self._handles[self._where[name]].get_tensor(name))
    except Exception as e:  # a truncated file fails only when the tensor's bytes are read.
      raise CheckpointError(f"{self.describe(name)}: cannot read tensor {name!r} ({first_line(e)}); "
                            "the file may be truncated.") from None


def tensor_units(path: tuple, var: nnx.Param) -> list[tuple[tuple[int, ...], str]]:
  """The checkpoint tensors behind one weight, each with the index of the leading dims of the weight's array it
  fills: ((), name) for an ordinary weight; ((l,), name) per layer of a stacked one (scanned layers); and for a
  mixture-of-experts weight (its name holds "{expert}": a checkpoint stores each expert apart) one tensor per
  expert, ((l, e), name) stacked or ((e,), name) unrolled."""
  hf = var.hf
  if var.axes[0] == LAYERS:  # scanned layers: one weight holds every layer
    layers = [((i,), i) for i in range(var.shape[0])]
  elif "{layer}" in hf.name:  # unrolled layers: the index is in the path, ("layers", i, ...)
    layers = [((), path[path.index("layers") + 1])]
  else:
    layers = [((), None)]
  if "{expert}" not in hf.name:
    return [(index, hf.name.format(layer=layer)) for index, layer in layers]
  experts = var.shape[len(layers[0][0])]  # the experts axis follows the layers axis, if any
  return [((*index, e), hf.name.format(layer=layer, expert=e)) for index, layer in layers for e in range(experts)]


def checkpoint_names(path: tuple, var: nnx.Param) -> list[str]:
  """Checkpoint names behind one weight, in `tensor_units` order (L names for a stacked weight, one otherwise;
  times E for an expert weight)."""
  return [name for _, name in tensor_units(path, var)]


def expected_tensors(model: Qwen2) -> dict[str, tuple[int, ...]]:
  """Every checkpoint tensor the model needs, with its checkpoint shape (a quantized weight's scale has none: it
  comes from its values' tensor)."""
  return {name: var.hf.shape for path, var in weight_declarations(model) if var.hf is not None
          for name in checkpoint_names(path, var)}


def load_params(model: Qwen2, source: TensorSource, *,
                place: Callable[[tuple, np.ndarray], jax.Array] | None = None) -> None:
  """Fills `model`'s weights (abstract or concrete) from `source`, in place.

  Every tensor is shape-checked against its declaration before it is converted. A missing, unexpected or
  mis-shaped tensor raises CheckpointError naming the tensor and the file.
  place: puts one finished host array on device(s) given the weight's path; defaults to `jax.device_put`
    (qwenjax.parallel.sharding passes a mesh-aware one).
  """
  place = place or (lambda path, array: jax.device_put(array))
  decls = weight_declarations(model)
  expected = expected_tensors(model)
  available = set(source.tensor_names())
  tied = getattr(model.cfg, "tie_word_embeddings", False)
  unexpected = sorted(n for n in available - set(expected)
                      if not n.endswith(_IGNORED_SUFFIXES) and not (tied and n == "lm_head.weight"))
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise CheckpointError(f"{source.describe(unexpected[0])}: unexpected tensor {unexpected[0]!r}{more} for a "
                          f"{type(model).__name__} with this config.")
  missing = [n for n in expected if n not in available]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise CheckpointError(f"{source.describe()}: tensor {missing[0]!r}{more} is missing.")
  for name, shape in expected.items():
    got = source.tensor_shape(name)
    if tuple(got) != tuple(shape):
      raise CheckpointError(f"{source.describe(name)}: tensor {name!r} has shape {tuple(got)}, expected "
                            f"{tuple(shape)}.")

  by_path = dict(decls)
  for path, var in decls:
    if var.hf is None:  # a quantized weight's scale: filled with its values below
      continue
    units = tensor_units(path, var)
    lead = len(units[0][0])  # leading dims of the array that index checkpoint tensors (layers, experts)
    shape = var.shape[lead:]  # one tensor's part, in param layout
    contract = getattr(var, "contract", None)
    if contract is None:
      dtype = np.dtype(var.dtype)
      if lead:  # fill [L, ...], [L, E, ...] or [E, ...] tensor by tensor: no float copy of a whole layer
        buf = np.empty(var.shape, dtype)
        for index, name in units:
          buf[index] = _convert(source, name, var.hf, shape, dtype)
      else:
        buf = _convert(source, units[0][1], var.hf, shape, dtype)
      var.set_value(place(path, buf))
      del buf
      continue
    # A QuantizedWeight's values: quantize each tensor's float32 values as it is read, per output channel (a GGUF
    # Q8_0 tensor goes straight to int8, `_int8_rows`).
    scale_path = path[:-1] + ("scale",)
    scale_var = by_path[scale_path]
    values, scales = np.empty(var.shape, np.int8), np.empty(scale_var.shape, np.float32)
    per_unit = tuple(a - lead for a in contract)
    for index, name in units:
      direct = _int8_rows(source, name, var.hf, shape, per_unit)
      if direct is None:
        direct = quantize_host(_convert(source, name, var.hf, shape, np.float32), per_unit)
      values[index], scales[index] = direct
    var.set_value(place(path, values))
    scale_var.set_value(place(scale_path, scales))
    del values, scales


def _int8_rows(source: TensorSource, name: str, hf, shape, contract) -> tuple[np.ndarray, np.ndarray] | None:
  """(int8 values in param layout, scale) straight from a source that stores `name` as int8 rows (a GGUF Q8_0
  tensor: `get_int8_rows`), when its rows are the weight's output channels: a 2-D checkpoint tensor whose second
  dim is what the matmul contracts (the input dims of a transposed projection, stored [K..., O...] or output-major
  [O..., K...], D of a [V, D] table). Else None."""
  get = getattr(source, "get_int8_rows", None)
  leading = contract == tuple(range(len(contract)))
  trailing = contract == tuple(range(len(shape) - len(contract), len(shape)))
  transposed_in = hf.transpose and (leading if hf.permute is None else trailing)  # [K.., O..] or output-major
  table_in = not hf.transpose and hf.permute is None and trailing
  if get is None or len(hf.shape) != 2 or not (transposed_in or table_in):
    return None
  rows = get(name)
  if rows is None:
    return None
  values, scale = rows
  check_finite(scale, source.describe(name), name)
  out_shape = tuple(d for i, d in enumerate(shape) if i not in contract)
  return hf.to_param(values, shape), scale.reshape(out_shape)


def check_finite(array: np.ndarray, file: str, name: str) -> None:
  """CheckpointError naming `file` and tensor `name` if `array` holds a NaN or an infinity (every checkpoint's
  tensors pass here on their way in: a model's, a LoRA adapter's)."""
  flat = np.ravel(array)  # a view of a contiguous array
  step = 1 << 22  # in chunks: no boolean temporary the size of the tensor
  if not all(np.isfinite(flat[i:i + step]).all() for i in range(0, flat.size, step)):
    raise CheckpointError(f"{file}: tensor {name!r} holds NaN or infinite values.")


def _convert(source: TensorSource, name: str, hf, shape, dtype) -> np.ndarray:
  array = source.get_tensor(name)
  check_finite(array, source.describe(name), name)
  return hf.to_param(array, shape).astype(dtype, copy=False)


def read_config(directory: str | pathlib.Path):
  """The config.json of a checkpoint directory: a QwenConfig, or a QwenVLConfig for Qwen2.5-VL (a config.json
  with a vision_config)."""
  path = pathlib.Path(directory) / "config.json"
  return parse_config(read_json(path), str(path))


def parse_config(hf: Mapping[str, Any], source: str = "config.json"):
  """A config.json dict -> QwenConfig, or QwenVLConfig for Qwen2.5-VL: its `qwenjax.model.registry` entry's."""
  return registry.parse_hf_config(hf, source)


def load_model(directory: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None,
               rules: sharding.ShardingRules = sharding.DEFAULT_RULES, **model_kwargs) -> Qwen2:
  """A Hugging Face checkpoint directory -> a concrete model with its weights loaded: `Qwen2`, or
  `qwenjax.model.qwen2_vl.Qwen2VL` for a Qwen2.5-VL checkpoint. With a mesh, each weight goes straight into its
  shards (`qwenjax.parallel.sharding.placer`). A GPTQ or AWQ checkpoint (Qwen's -GPTQ-Int4/-Int8 and -AWQ
  releases: a `quantization_config`) is dequantized exactly, one linear at a time
  (`qwenjax.checkpoints.quantized_formats`), then requantized per output channel and served in int8: w8a16, or
  w8a8 with `quantize="w8a8"` (never as float: its 4-bit weights would take 8 times the memory)."""
  directory = pathlib.Path(directory)
  source: TensorSource = SafetensorsSource(directory)
  qcfg = quantized_formats.quantization_config(read_json(directory / "config.json", error=CheckpointError),
                                               directory)
  if qcfg is not None:
    source = quantized_formats.DequantizedSource(source, qcfg)
    if model_kwargs.get("quantize") is None:  # int4 / int8 weights are not served as float
      model_kwargs["quantize"] = "int8"
  return load_from_source(read_config(directory), source, mesh=mesh, rules=rules, **model_kwargs)


def load_from_source(cfg, source: TensorSource, *, mesh: jax.sharding.Mesh | None = None,
                     rules: sharding.ShardingRules = sharding.DEFAULT_RULES, **model_kwargs) -> Qwen2:
  """cfg: a QwenConfig (-> Qwen2) or a QwenVLConfig (-> Qwen2VL, by `qwenjax.model.registry`); mesh: shard the
  weights over it by `rules` as they load (None: one device)."""
  cls = registry.model_class(cfg)
  model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **model_kwargs))
  load_params(model, source, place=None if mesh is None else sharding.placer(model, mesh, rules))
  return model
