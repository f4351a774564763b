"""The pieces the decoder and the vision tower are built from: weight declarations, the weight read, RMSNorm, RoPE.

Every weight is declared once, by `declare`: its shape, logical axes (`qwenjax.parallel.axes`), initialiser, and
where it comes from in a Hugging Face checkpoint (`HFTensor`). Abstract shapes (`nnx.eval_shape`), shardings
(`qwenjax.parallel.sharding`) and checkpoint loading (`qwenjax.checkpoints.hf`) all read those declarations.
Every use of a weight reads it through `read`, the one place a quantized weight (int8 values and their scales)
will turn back into the compute dtype.

Legend: B batch, T tokens of this step, N heads, H head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.parallel.axes import EMBED, LAYERS

_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """Where a weight lives in a Hugging Face checkpoint.

  name: tensor name; "{layer}" stands for the layer index of per-layer weights.
  shape: the tensor's shape in the checkpoint.
  transpose: the checkpoint holds a torch Linear weight [out, in]; ours is [in..., out...]. A Conv weight
    [out, C, kernel...] whose stride equals its kernel (a patch embedding) is the Linear [out, C * prod(kernel)].
  """

  name: str
  shape: tuple[int, ...]
  transpose: bool = False

  def to_param(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Checkpoint layout -> param layout (transpose, then split fused head dims)."""
    if self.transpose:
      array = array.reshape(array.shape[0], -1).T if array.ndim > 2 else array.T
    return np.ascontiguousarray(array.reshape(shape))

  def to_checkpoint(self, array: np.ndarray) -> np.ndarray:
    """Param layout -> checkpoint layout: the inverse of `to_param` (fuse head dims, then transpose)."""
    if self.transpose:
      array = array.reshape(-1, self.shape[0]).T
    return np.ascontiguousarray(array.reshape(self.shape))


def declare(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], hf: HFTensor, *,
            stack: tuple[int, ...], dtype, init: str = "normal") -> nnx.Param:
  """Declares one weight. `stack` is (L,) for scanned layers: it prepends the "layers" axis."""
  full_shape = (*stack, *shape)
  full_axes = (LAYERS,) * len(stack) + axes
  assert len(shape) == len(axes), (shape, axes)
  if init == "ones":
    value = jnp.ones(full_shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(full_shape, dtype)
  else:
    value = (_INIT_STD * jax.random.normal(rngs.params(), full_shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=full_axes, hf=hf)


def read(param: nnx.Param, dtype=None) -> jax.Array:
  """A weight's value, cast to `dtype` (the compute dtype; None: as stored). Every matmul, bias, norm and
  embedding reads its weight here."""
  value = param[...]
  return value if dtype is None else value.astype(dtype)


class RMSNorm(nnx.Module):
  """RMSNorm in float32, cast back to the input dtype, then times the weight (Qwen2's order)."""

  def __init__(self, dim: int, eps: float, hf_name: str, *, stack=(), dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = declare(rngs, (dim,), (EMBED,), HFTensor(hf_name, (dim,)), stack=stack, dtype=dtype, init="ones")

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
