"""Logical axis names, the one table that maps them onto mesh axes, and `constrain`, which lays arrays out by it.

Every weight, cache and activation dimension carries one of the logical axis names below (`None` for a dimension
that is never split). `ShardingRules` maps each name to mesh axes; `DEFAULT_RULES` is the table qwenjax uses;
`spec_for` turns one array's logical axes into a `PartitionSpec`, leaving whole any dimension the mesh axes do not
divide. Inside a jitted step, `constrain` pins an array to that layout under the active mesh and the rules that
`use_rules` (through `qwenjax.parallel.sharding.use_mesh`) made current; without a mesh it does nothing.

This module imports nothing else of qwenjax: the model, the kernels and the sharding helpers all build on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

# Logical axis names. Sharding rules map these, and only these, onto mesh axes.
BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS, PAGES, EXPERTS = (
    "batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "pages", "experts")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis -> the mesh axes that split it (in order), or () for none."""

  rules: tuple[tuple[str, tuple[str, ...]], ...]

  def __getitem__(self, logical: str | None) -> tuple[str, ...]:
    if logical is None:
      return ()
    for name, axes in self.rules:
      if name == logical:
        return axes
    raise KeyError(f"no sharding rule for logical axis {logical!r}")

  @classmethod
  def of(cls, table: Mapping[str, str | Sequence[str] | None]) -> ShardingRules:
    norm = lambda v: () if v is None else ((v,) if isinstance(v, str) else tuple(v))
    return cls(tuple((k, norm(v)) for k, v in table.items()))


# The one table. Weights split over fsdp (their embed dimension) and tensor (heads, MLP, vocabulary); a MoE layer's
# experts split over expert; activations and the KV cache split their batch over data (then fsdp, then expert) and
# their heads over tensor; the paged cache splits its pages like a batch.
DEFAULT_RULES = ShardingRules.of({
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "pages": ("data", "fsdp", "expert"),
    "experts": "expert",
})


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
             rules: ShardingRules = DEFAULT_RULES) -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes. A dimension splits over the longest prefix of its
  rule's mesh axes (those of size 1, or already used, left out) whose product divides it, so a dimension no mesh
  axis divides stays whole; a mesh axis splits at most one dimension (the first that claims it)."""
  used: set[str] = set()
  out = []
  for logical, size in zip(axes, shape):
    mesh_axes = [a for a in rules[logical] if mesh_shape.get(a, 1) > 1 and a not in used]
    while mesh_axes and size % math.prod(mesh_shape[a] for a in mesh_axes):
      mesh_axes.pop()
    if not mesh_axes:
      out.append(None)
      continue
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
  return PartitionSpec(*out)


_RULES: contextvars.ContextVar[ShardingRules] = contextvars.ContextVar("qwenjax_sharding_rules",
                                                                        default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules: ShardingRules) -> Iterator[None]:
  """`constrain` lays arrays out by `rules` inside this block (the mesh is jax's current one, `jax.set_mesh`)."""
  token = _RULES.set(rules)
  try:
    yield
  finally:
    _RULES.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Inside a jitted step: x laid out by its logical axes under the active mesh and rules (`use_rules`); x itself
  when no mesh is active."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, dict(mesh.shape), _RULES.get()))
