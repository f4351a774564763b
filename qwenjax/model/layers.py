"""The pieces the decoder and the vision tower are built from: weight declarations, the weight read, RMSNorm, RoPE.

Every weight is declared once, by `declare`: its shape, logical axes (`qwenjax.parallel.axes`), initialiser, and
where it comes from in a Hugging Face checkpoint (`HFTensor`). Abstract shapes (`nnx.eval_shape`), shardings
(`qwenjax.parallel.sharding`) and checkpoint loading (`qwenjax.checkpoints.hf`) all read those declarations.
Every use of a weight goes through one helper: `linear` (a matmul), `lookup` (embedding rows) or `read` (biases,
norms). A declaration with `quantize` set gives a `QuantizedWeight` instead of a Param: int8 values and a float32
scale per output channel, two Params whose logical axes follow the declaration's, so sharding rules, Orbax and the
planner see two ordinary weights; the helpers hand it to `qwenjax.kernels.int8_matmul` and never materialise the
float matrix.

Legend: B batch, T tokens of this step, N heads, H head dim, K contracted (input) size, O output size.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.kernels import cpu_paths
from qwenjax.kernels.int8_matmul import int8_matmul, quantize_per_channel
from qwenjax.parallel.axes import EMBED, LAYERS

_INIT_STD = 0.02

# `--quantize` values -> `qwenjax.kernels.int8_matmul` modes: weight-only int8 (w8a16), or int8 activations too.
QUANTIZE_MODES = {"int8": "w8a16", "w8a8": "w8a8"}


def check_quantize(quantize: str | None) -> str | None:
  """None/"none" -> None; "int8" or "w8a8" as is; anything else is a ConfigError."""
  if quantize in (None, "", "none"):
    return None
  if quantize not in QUANTIZE_MODES:
    raise ConfigError(f"quantize must be one of none, {', '.join(QUANTIZE_MODES)}; got {quantize!r}.")
  return quantize


def unpermute(shape: tuple[int, ...], permute: tuple[int, ...]) -> tuple[int, ...]:
  """The shape before `transpose(permute)` made `shape`: declared[permute[i]] = shape[i]."""
  declared = [0] * len(permute)
  for stored_dim, declared_dim in enumerate(permute):
    declared[declared_dim] = shape[stored_dim]
  return tuple(declared)


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """Where a weight lives in a Hugging Face checkpoint.

  name: tensor name; "{layer}" stands for the layer index of per-layer weights.
  shape: the tensor's shape in the checkpoint.
  transpose: the checkpoint holds a torch Linear weight [out, in]; ours is [in..., out...]. A Conv weight
    [out, C, kernel...] whose stride equals its kernel (a patch embedding) is the Linear [out, C * prod(kernel)].
  permute: the param is stored with its (declared, per-layer) dims in this order: an int8 weight in the
    output-major layout [out..., in...] (`QuantizedWeight.permute`); None: as declared.
  """

  name: str
  shape: tuple[int, ...]
  transpose: bool = False
  permute: tuple[int, ...] | None = None

  def declared_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A stored (param) shape -> the declared one: `shape` with `permute` undone."""
    return tuple(shape) if self.permute is None else unpermute(shape, self.permute)

  def to_param(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Checkpoint layout -> param layout `shape` (transpose, split fused head dims, then permute). A torch Linear
    [out, in] read output-major is the checkpoint's own layout: a reshape, no copy."""
    if self.transpose and self.permute is not None and array.ndim == 2 and self._output_major(shape):
      return np.ascontiguousarray(array.reshape(shape))
    if self.transpose:
      array = array.reshape(array.shape[0], -1).T if array.ndim > 2 else array.T
    array = array.reshape(self.declared_shape(shape))
    if self.permute is not None:
      array = array.transpose(self.permute)
    return np.ascontiguousarray(array)

  def _output_major(self, shape: tuple[int, ...]) -> bool:
    """Whether `permute` moves the declared input dims (the leading ones whose product is the checkpoint's
    second dim) behind the output dims, keeping the order within each: the torch Linear's own [out, in]."""
    n_in = len(self.permute) - next(i for i, d in enumerate(self.permute) if d == 0)
    declared = self.declared_shape(shape)
    return (self.permute == (*range(n_in, len(declared)), *range(n_in))
            and int(np.prod(declared[:n_in])) == self.shape[1])

  def to_checkpoint(self, array: np.ndarray) -> np.ndarray:
    """Param layout -> checkpoint layout: the inverse of `to_param` (permute back, fuse head dims, transpose)."""
    if self.permute is not None:
      array = array.transpose(np.argsort(self.permute))
    if self.transpose:
      array = array.reshape(-1, self.shape[0]).T
    return np.ascontiguousarray(array.reshape(self.shape))


class QuantizedWeight(nnx.Module):
  """An int8 weight: w ~ values * scale, one float32 scale per output channel (symmetric, amax / 127).

  values: Param int8 [*stack, *stored shape] with its logical axes, its checkpoint tensor (`hf`) and the
    contracted dims counted in the stacked, stored shape (`contract` metadata: what a loader quantizes over).
    Stored as declared ([K..., O...], "kn"), or output-major ([O..., K...], "nk": `permute` set) where the
    processor's matmul paths (`qwenjax.kernels.cpu_paths`) run that layout faster; the axes follow the dims.
  scale: Param float32 [*stack, *output dims]: the shape without the contracted dims, their axes dropped; `hf` is
    None (it comes from the same checkpoint tensor, quantized as it loads).
  contract: the contracted (input) dims of the declared shape: the leading ones of a projection [K..., O...], the
    last of a vocabulary table [V, D] (lm_head and the embedding, which one scale per row serves both as table
    and head).
  mode: the `qwenjax.kernels.int8_matmul` mode, "w8a16" or "w8a8".
  permute: None, or the declared dims in stored order (output-major: (*output dims, *contract)).
  """

  def __init__(self, values: nnx.Param, scale: nnx.Param, contract: tuple[int, ...], mode: str,
               permute: tuple[int, ...] | None = None):
    self.values = values
    self.scale = scale
    self.contract = contract
    self.mode = mode
    self.permute = permute

  @property
  def shape(self) -> tuple[int, ...]:
    """The declared shape (stacked dims first), whatever the stored layout."""
    shape = tuple(self.values.shape)
    if self.permute is None:
      return shape
    lead = len(shape) - len(self.permute)
    return shape[:lead] + unpermute(shape[lead:], self.permute)

  @property
  def output_major(self) -> bool:
    return self.permute is not None

  def dequantized(self, dtype=jnp.float32) -> jax.Array:
    """The float weight in its declared layout (tests and the odd small weight; the matmuls never build it).
    Stacked [L, ...] or one layer's slice (inside `lax.scan`) alike: the leading dims before the contracted ones
    are found from the shapes."""
    values, scale = self.values[...], self.scale[...]
    contract = self.contract if self.permute is None else tuple(
        i for i, d in enumerate(self.permute) if d in self.contract)
    for lead in range(values.ndim - len(contract) + 1):
      dims = tuple(lead + a for a in contract)
      if tuple(d for i, d in enumerate(values.shape) if i not in dims) == scale.shape:
        break
    else:
      raise ValueError(f"a quantized weight of shape {values.shape} has scales of shape {scale.shape}.")
    w = values.astype(jnp.float32) * jnp.expand_dims(scale, dims)
    if self.permute is not None:
      lead = w.ndim - len(self.permute)
      w = w.transpose(*range(lead), *(lead + int(i) for i in np.argsort(self.permute)))
    return w.astype(dtype)


_QUANTIZE_CHUNK = 1 << 22  # float32 values per chunk of `quantize_host` (16 MiB)


def quantize_host(array: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """A float weight on the host -> (int8 values, float32 scale over the remaining dims): scale = amax / 127 over
  `axes`, values = round(w / scale) (half to even); a channel of zeros gets scale 0 and values 0. The loaders'
  quantizer, the same rule as `qwenjax.kernels.int8_matmul.quantize_per_channel` on device. Works through the
  first dim that is not contracted in chunks of ~16 MiB, so that it holds no float32 temporary the size of the
  weight beside the weight itself (a 0.5B model's embedding is 544 MB in float32)."""
  w = np.asarray(array, np.float32)
  axes = tuple(a % w.ndim for a in axes)
  kept = [d for d in range(w.ndim) if d not in axes]
  values = np.empty(w.shape, np.int8)
  scale = np.empty([w.shape[d] for d in kept], np.float32)
  if not kept or w.size == 0:
    return _quantize_block(w, axes, values, scale)
  lead = kept[0]  # chunks along it: every chunk holds whole channels
  step = max(1, _QUANTIZE_CHUNK // max(1, w.size // max(1, w.shape[lead])))
  for begin in range(0, w.shape[lead], step):
    part = (slice(None),) * lead + (slice(begin, begin + step),)
    _quantize_block(w[part], axes, values[part], scale[(slice(begin, begin + step),)])
  return values, scale


def _quantize_block(w: np.ndarray, axes: tuple[int, ...], values: np.ndarray, scale: np.ndarray):
  """`quantize_host` of one block of whole channels, written into `values` and `scale` (views of the outputs)."""
  scale[...] = np.max(np.abs(w), axis=axes) / np.float32(127)  # [remaining dims]
  safe = np.expand_dims(np.where(scale > 0, scale, np.float32(1)), axes)
  values[...] = np.clip(np.round(w / safe), -127, 127).astype(np.int8)
  return values, scale


def scale_axes(axes: tuple[str | None, ...], contract: tuple[int, ...]) -> tuple[str | None, ...]:
  """The logical axes of a QuantizedWeight's scale: the weight's, without its contracted dims."""
  return tuple(a for i, a in enumerate(axes) if i not in contract)


def declare(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], hf: HFTensor, *,
            stack: tuple[int, ...], dtype, init: str = "normal", quantize: str | None = None,
            contract: tuple[int, ...] = (0,)) -> nnx.Param | QuantizedWeight:
  """Declares one weight. `stack` is (L,) for scanned layers: it prepends the "layers" axis. quantize: None, or a
  `QUANTIZE_MODES` key for a matrix ("normal" init): it is then a QuantizedWeight whose `contract` dims (of
  `shape`) are the ones its matmul contracts."""
  full_shape = (*stack, *shape)
  full_axes = (LAYERS,) * len(stack) + axes
  assert len(shape) == len(axes), (shape, axes)
  if init == "ones":
    value = jnp.ones(full_shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(full_shape, dtype)
  else:
    value = (_INIT_STD * jax.random.normal(rngs.params(), full_shape, jnp.float32)).astype(dtype)
  if quantize is None or init != "normal":
    return nnx.Param(value, axes=full_axes, hf=hf)
  mode = QUANTIZE_MODES[quantize]
  full_contract = tuple(len(stack) + a for a in contract)
  values, scale = quantize_per_channel(value.astype(jnp.float32), full_contract)
  scale = nnx.Param(scale, axes=scale_axes(full_axes, full_contract), hf=None)
  permute = None
  n_in = len(contract)
  if contract == tuple(range(n_in)) and n_in < len(shape):  # a projection [K..., O...]: which layout is faster
    k = int(np.prod(shape[:n_in]))
    if cpu_paths.int8_layout(mode, k, int(np.prod(shape)) // k) == "nk":
      permute = (*range(n_in, len(shape)), *range(n_in))
  if permute is None:
    return QuantizedWeight(nnx.Param(values, axes=full_axes, hf=hf, contract=full_contract), scale, contract, mode)
  order = (*range(len(stack)), *(len(stack) + d for d in permute))
  stored_contract = tuple(range(len(order) - n_in, len(order)))
  return QuantizedWeight(nnx.Param(values.transpose(order), axes=tuple(full_axes[d] for d in order),
                                   hf=dataclasses.replace(hf, permute=permute), contract=stored_contract),
                         scale, contract, mode, permute)


def read(param: nnx.Param | QuantizedWeight, dtype=None) -> jax.Array:
  """A weight's value, cast to `dtype` (the compute dtype; None: as stored). Biases and norms read their weight
  here; matmuls go through `linear` and embedding rows through `lookup`, which keep a QuantizedWeight in int8."""
  if isinstance(param, QuantizedWeight):
    return param.dequantized(jnp.float32 if dtype is None else dtype)
  value = param[...]
  return value if dtype is None else value.astype(dtype)


def linear(x: jax.Array, weight: nnx.Param | QuantizedWeight, dtype, impl: str = "xla", n_in: int = 1) -> jax.Array:
  """x [..., K] times a projection [K..., O...] whose first `n_in` dims (K in all: x's last dim flattens them) are
  contracted -> [..., O...] in `dtype`. A QuantizedWeight multiplies through `int8_matmul` (`impl`: "xla" or
  "pallas"), dequantizing tile by tile inside the matmul."""
  k = x.shape[-1]
  out_dims = tuple(weight.shape[n_in:])
  if isinstance(weight, QuantizedWeight):
    assert weight.contract == tuple(range(n_in)), (weight.contract, n_in)
    values = weight.values[...]
    # "kn": [K..., O...] read as [K, N]; output-major "nk": [O..., K...] read as [N, K].
    w2 = values.reshape(-1, k) if weight.output_major else values.reshape(k, -1)
    out = int8_matmul(x.reshape(-1, k).astype(dtype), w2, weight.scale[...].reshape(-1), mode=weight.mode,
                      impl=impl, transpose_rhs=weight.output_major, out_dtype=dtype)
    return out.reshape(*x.shape[:-1], *out_dims)
  w = read(weight, dtype).reshape(k, -1)
  rows = math.prod(x.shape[:-1])
  if rows == 1 and cpu_paths.formulation(cpu_paths.float_mode(dtype), 1, k, w.shape[1]) == "dot_2_rows":
    out = cpu_paths.FLOAT_FORMULATIONS["dot_2_rows"](x.reshape(1, k), w, False)  # the one-row cliff, padded
    return out.reshape(*x.shape[:-1], *out_dims)
  # One [K, O] matmul: contracting several weight dims in an einsum let XLA:CPU transpose the weight every step.
  return (x @ w).reshape(*x.shape[:-1], *out_dims)


def lookup(table: nnx.Param | QuantizedWeight, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` [...] of a [V, D] table -> [..., D] in `dtype`; a QuantizedWeight dequantizes just those rows."""
  if isinstance(table, QuantizedWeight):
    return (table.values[...][ids].astype(jnp.float32) * table.scale[...][ids][..., None]).astype(dtype)
  return read(table)[ids].astype(dtype)


def vocab_logits(h: jax.Array, table: nnx.Param | QuantizedWeight, impl: str = "xla") -> jax.Array:
  """Hidden states [..., D] against a [V, D] vocabulary table (lm_head or the tied embedding) -> float32 [..., V]."""
  if isinstance(table, QuantizedWeight):
    d = h.shape[-1]
    out = int8_matmul(h.reshape(-1, d), table.values[...], table.scale[...], mode=table.mode, impl=impl,
                      transpose_rhs=True, out_dtype=jnp.float32)
    return out.reshape(*h.shape[:-1], -1)
  w = read(table, h.dtype)
  if math.prod(h.shape[:-1]) == 1 and cpu_paths.formulation(
      cpu_paths.float_mode(h.dtype), 1, w.shape[1], w.shape[0]) == "dot_2_rows":  # the one-row cliff, padded
    padded = jnp.pad(h.reshape(1, -1), ((0, 1), (0, 0)))
    return jnp.einsum("md,vd->mv", padded, w, preferred_element_type=jnp.float32)[:1].reshape(*h.shape[:-1], -1)
  return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
  """RMSNorm in float32, cast back to the input dtype, then times the weight (Qwen2's order)."""

  def __init__(self, dim: int, eps: float, hf_name: str, *, stack=(), dtype, rngs: nnx.Rngs, axis=EMBED):
    """axis: the weight's logical axis (EMBED over the hidden size; HEAD_DIM for the per-head q/k norms)."""
    self.eps = eps
    self.scale = declare(rngs, (dim,), (axis,), HFTensor(hf_name, (dim,)), stack=stack, dtype=dtype, init="ones")

  @jax.named_scope("norm")
  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return read(self.scale) * xf.astype(x.dtype)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding in the half-split layout. x: [B, T, N, H]; cos, sin: [B, T, H/2] float32."""
  h2 = x.shape[-1] // 2
  x1, x2 = x[..., :h2], x[..., h2:]
  c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope_tables(inv_freq: np.ndarray, scale: float, positions: jax.Array,
                mrope_section: tuple[int, ...] | None = None) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, H/2] in float32 for integer positions [B, T], or, with `mrope_section`, for 3D M-RoPE
  positions [3, B, T] (temporal, height, width): frequency i turns with the axis whose section holds it."""
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2] or [3, B, T, H/2]
  if mrope_section is not None:
    axis_of_freq = np.repeat(np.arange(len(mrope_section)), mrope_section)  # [H/2]
    angles = jnp.take_along_axis(angles, jnp.asarray(axis_of_freq)[None, None, None, :], axis=0)[0]
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale
