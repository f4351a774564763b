"""Device meshes, and the shardings derived from the one table that maps logical axes onto them.

Every weight and cache dimension carries a logical axis name (`qwenjax.parallel.axes`: batch, length, embed, heads,
kv_heads, head_dim, mlp, vocab, layers; `None` for a dimension that is never split). `ShardingRules` (there, with
the table `DEFAULT_RULES`) maps each name to mesh axes; `spec_for` turns one array's logical axes into a
`PartitionSpec`, leaving unsplit any dimension the mesh axes do not divide (Qwen2.5-0.5B's 14 query heads over a
tensor axis of 4, or its 2 KV heads over a tensor axis of 8: those are replicated, which is exact; the rest of the
layer still splits).

    mesh = mesh_from_flags("data:2,tensor:4")           # None for no --mesh: one device, nothing sharded
    spec_for(("embed", "heads", "head_dim"), (3584, 28, 128), mesh.shape)   # P(None, "tensor", None)
    loaded = qwenjax.load("/ckpt/Qwen2.5-7B-Instruct", mesh=mesh)          # each weight straight into its shards
    engine = qwenjax.Engine(loaded.model, loaded.tokenizer, mesh=mesh)     # KV cache and slot state sharded too

Mesh axes: `data` splits decode slots (the batch), `fsdp` splits weights' embed dimension (gathered for use) and,
after `data`, the batch; `expert` splits a mixture-of-experts layer's experts (expert parallelism: each device holds
E / expert of them; `qwenjax.model.moe`) and, after `data` and `fsdp`, the batch; `tensor` splits heads, KV heads,
the MLP (the experts' too) and the vocabulary (Megatron-style tensor parallelism). Weights are placed by
`param_shardings` / `shard_model` / `placer` (for `load_params`), the cache by
`qwenjax.model.kv_cache.cache_sharding`; inside jitted steps `qwenjax.parallel.axes.constrain` pins activations and
the cache to the same table, active only under `use_mesh` (without a mesh it does nothing, and the programs are those
of one device).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from qwenjax._errors import ConfigError
from qwenjax.parallel.axes import DEFAULT_RULES, ShardingRules, spec_for, use_rules

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def parse_mesh(text: str) -> dict[str, int]:
  """'data:2,tensor:4' -> {'data': 2, 'fsdp': 1, 'tensor': 4}. Axes not named have size 1."""
  shape = {axis: 1 for axis in MESH_AXES}
  if not text:
    return shape
  for part in text.split(","):
    name, sep, size = part.strip().partition(":")
    if not sep or name not in MESH_AXES:
      raise ConfigError(f"--mesh: {part.strip()!r} is not axis:size with axis one of {', '.join(MESH_AXES)}.")
    try:
      shape[name] = int(size)
    except ValueError:
      raise ConfigError(f"--mesh: size {size!r} of axis {name!r} is not an integer.") from None
    if shape[name] < 1:
      raise ConfigError(f"--mesh: axis {name!r} has size {shape[name]}; sizes are at least 1.")
  return shape


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, expert, tensor) of the given sizes over `devices` (default: this process's devices;
  in a multi-host run each host serves on its own). The product of the sizes must equal the device count."""
  devices = list(jax.local_devices() if devices is None else devices)
  sizes = tuple(int(shape.get(axis, 1)) for axis in MESH_AXES)
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; there are "
                      f"{len(devices)}.")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # XLA propagates shardings from the annotated arrays
  if jax.process_count() == 1 and len(devices) == len(jax.devices()):  # topology-aware device order
    return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def abstract_mesh(shape: Mapping[str, int]) -> AbstractMesh:
  """A mesh of the given axis sizes without devices: for shardings, shard shapes and memory of any topology."""
  sizes = tuple(int(shape.get(axis, 1)) for axis in MESH_AXES)
  return AbstractMesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_from_flags(mesh: str | None, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
  """The value of a `--mesh` flag ('data:2,tensor:4') -> a Mesh over `devices` (default: this process's); None or
  '' -> None (one device, nothing sharded). ConfigError for a malformed value or one whose sizes do not multiply
  to the device count."""
  if not mesh:
    return None
  shape = parse_mesh(mesh)
  try:
    return make_mesh(shape, devices)
  except ConfigError as e:
    raise ConfigError(f"--mesh={mesh}: {e}") from None


def shard_shape(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                rules: ShardingRules = DEFAULT_RULES) -> tuple[int, ...]:
  """The shape of each device's shard of an array with these logical axes (no devices needed)."""
  spec = tuple(spec_for(axes, shape, mesh_shape, rules))
  out = []
  for size, entry in zip(shape, spec + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    out.append(size // math.prod(mesh_shape[a] for a in names))
  return tuple(out)


def named_sharding(mesh: Mesh | AbstractMesh, axes: Sequence[str | None], shape: Sequence[int],
                   rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, spec_for(axes, shape, dict(mesh.shape), rules))


# ---- weights ------------------------------------------------------------------------------------------------

def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _axes_of(var: nnx.Variable) -> tuple[str | None, ...]:
  """A weight's logical axes (its `axes` metadata); a variable declared without them is replicated."""
  axes = getattr(var, "axes", None)
  return tuple(axes) if axes is not None else (None,) * len(var.shape)


def param_shardings(model: nnx.Module, mesh: Mesh | AbstractMesh, rules: ShardingRules = DEFAULT_RULES) -> nnx.State:
  """`nnx.state(model)` with each variable holding its NamedSharding, from its logical axes. The model may be
  abstract (`nnx.eval_shape`) and the mesh abstract (`abstract_mesh`): nothing is allocated."""
  return jax.tree.map(lambda v: v.replace(named_sharding(mesh, _axes_of(v), v.shape, rules)), nnx.state(model),
                      is_leaf=_is_variable)


def param_specs(model: nnx.Module, mesh_shape: Mapping[str, int],
                rules: ShardingRules = DEFAULT_RULES) -> dict[str, PartitionSpec]:
  """'layers/attn/q_kernel' -> its PartitionSpec, for every weight: the sharding table of a model on a mesh."""
  return {"/".join(map(str, path)): spec_for(_axes_of(var), var.shape, mesh_shape, rules)
          for path, var in nnx.to_flat_state(nnx.state(model))}


def param_bytes_per_device(model: nnx.Module, mesh: Mesh | AbstractMesh,
                           rules: ShardingRules = DEFAULT_RULES) -> int:
  """Bytes of weights each device holds (the largest shard of each weight, summed); the model may be abstract."""
  return sum(math.prod(shard_shape(_axes_of(var), var.shape, dict(mesh.shape), rules)) * np.dtype(var.dtype).itemsize
             for _, var in nnx.to_flat_state(nnx.state(model)))


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> nnx.Module:
  """Moves a built model's weights onto `mesh` by the rules, in place (weights already there stay put)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, param_shardings(model, mesh, rules)))
  return model


def placer(model: nnx.Module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES
           ) -> Callable[[tuple, np.ndarray], jax.Array]:
  """A `place(path, host_array)` for `qwenjax.checkpoints.hf.load_params`: builds each weight as a global array in
  its sharding with `jax.make_array_from_callback`, so each process copies to its devices only the shards they
  hold (the host array itself is whole: one weight at a time)."""
  shardings = {path: named_sharding(mesh, _axes_of(var), var.shape, rules)
               for path, var in nnx.to_flat_state(nnx.state(model))}

  def place(path: tuple, array: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(array.shape, shardings[tuple(path)], lambda index: array[index])

  return place


# ---- jitted steps -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: ShardingRules = DEFAULT_RULES) -> Iterator[None]:
  """Traces and runs jitted steps for `mesh` under `rules`: `axes.constrain` inside them then pins activations and
  the cache. With mesh None it does nothing. jit's cache keys on the mesh and the arrays' shardings, not on the
  rules: keep to one table per mesh in a process."""
  if mesh is None:
    yield
    return
  with use_rules(rules), jax.set_mesh(mesh):
    yield
