"""Qwen models as Orbax checkpoints: converted once, then restored straight into a device mesh.

`save` writes a loaded model (`qwenjax.checkpoints.loader.convert` loads any `--model` source, a Hugging Face
directory, a GGUF file or the embedded model, and saves it; `python -m launch.convert` runs that) into a directory
that holds everything a run needs:

    qwenjax_checkpoint.json    marks the directory: format and version, weight dtype, quantization (none, int8 or
                               w8a8: int8 values with their scales under `<weight>.values` / `.scale`), source,
                               param layout, the int8 projections stored output-major ([O..., K...]; the
                               others [K..., O...]: restore transposes those the processor wants the other way)
    config.json                the model's Hugging Face config (Qwen2.5-VL: Qwen's flat form with vision_config)
    tokenizer.json, tokenizer_config.json, generation_config.json    tokenizer, chat template, end-of-sequence ids
    preprocessor_config.json   Qwen2.5-VL only: the image processor's settings
    params/                    the Orbax PyTree checkpoint: one zarr3 array directory per weight, named by the
                               weight's path in the param tree (`embed`, `layers.attn.q_kernel`, `visual.merger.fc1`)

Weights are stored in one layout, the stacked one (`scan_layers=True`: a per-layer weight is one [L, ...] array).
`restore` builds the abstract model, asks Orbax for each weight straight in its final sharding (read from the
weight's logical axes through the sharding rules), so each host reads only the chunks it holds; a restore with
`scan_layers=False` then slices each stacked weight into per-layer arrays on device, one weight at a time.

    loader.convert("/ckpt/Qwen2.5-7B-Instruct", "/ckpt/qwen7b-orbax", dtype="bfloat16")
    model, tokenizer, processor = restore("/ckpt/qwen7b-orbax", mesh=make_mesh(parse_mesh("fsdp:2,tensor:4")))
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pathlib
import shutil
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from qwenjax import _files
from qwenjax._errors import CheckpointError, QwenJaxError, first_line
from qwenjax.checkpoints.hf import parse_config
from qwenjax.config import check_dtype, default_scan_layers, read_json
from qwenjax.model import registry
from qwenjax.model.decoder import Qwen2, weight_declarations
from qwenjax.model.layers import check_quantize
from qwenjax.multimodal.processing import ImageProcessorConfig
from qwenjax.parallel.axes import DEFAULT_RULES, LAYERS, ShardingRules
from qwenjax.parallel.sharding import named_sharding
from qwenjax.text.tokenizer import Tokenizer

METADATA_FILE = "qwenjax_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "qwenjax-orbax"
FORMAT_VERSION = 1
LAYOUT = "stacked"  # per-layer weights as one [L, ...] array each (the scan_layers=True param tree)
# Largest stored chunk: a host restoring a shard reads the chunks that overlap it, not whole weights.
CHUNK_BYTES = 64 << 20


def is_orbax_checkpoint(path: str | os.PathLike[str]) -> bool:
  """Whether `path` is a directory that `restore` reads (or a broken one it should explain): it holds the
  qwenjax metadata file or an Orbax `params/` checkpoint."""
  path = pathlib.Path(path)
  return path.is_dir() and ((path / METADATA_FILE).is_file() or (path / PARAMS_DIR / "_METADATA").is_file())


# --- Writing -------------------------------------------------------------------------------------------------


def save(directory: str | os.PathLike[str], model: Qwen2, tokenizer: Tokenizer, hf_config: Mapping[str, Any], *,
         source: str, generation_config: Mapping[str, Any] | None = None,
         preprocessor_config: Mapping[str, Any] | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
  """Writes `model` (loaded with scan_layers=True) and `tokenizer` as the new directory `directory` (it must not
  exist, or be empty). Everything is written into a temporary directory of our own beside it (`_partial`), renamed
  to `directory` at the end: a reader never sees a partial checkpoint, and a failed write (a full disk) is a
  CheckpointError naming `directory` with the temporary removed.

  hf_config: the source's config.json (a VL one in transformers 5's nested form is written in Qwen's flat form);
    it must parse back to the model's config. source: where the model came from, recorded in the metadata.
    generation_config, preprocessor_config: the source's, kept beside the tokenizer (the latter: Qwen2.5-VL only).
  The metadata file is written last, so an interrupted write is never taken for whole.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  hf_config = _flat_config(hf_config)
  if parse_config(hf_config, source) != _model_config(model):
    raise CheckpointError(f"{source}: the config.json written for it would not parse back to the loaded model's "
                          "config.")
  assert model.scan_layers, "the checkpoint layout is the stacked one: load the model with scan_layers=True"
  params = {path: var[...] for path, var in weight_declarations(model)}
  float_dtype = next(str(a.dtype) for a in params.values() if a.dtype != np.int8)  # int8 values are not "the dtype"
  tree = _nest(params)
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), tree)
  with _partial(directory) as tmp:
    with _checkpointer() as ckptr:
      ckptr.save((tmp / PARAMS_DIR).absolute(), args=ocp.args.PyTreeSave(tree, save_args=save_args))
    _write_json(tmp / "config.json", hf_config)
    tokenizer.save(tmp, generation_config=generation_config or {})
    if preprocessor_config is not None:
      _write_json(tmp / "preprocessor_config.json", preprocessor_config)
    _write_json(tmp / METADATA_FILE, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": float_dtype,
        "quantize": model.quantize or "none", "quantize_embeddings": model.quantize_embeddings,
        "source": source, "layout": LAYOUT, "model": type(model).__name__,
        "int8_output_major": sorted(_name(path) for path, var in weight_declarations(model)
                                    if getattr(getattr(var, "hf", None), "permute", None) is not None)})


_PARTIAL_MARKER = "partial orbax checkpoint"
_PARTIAL_FILE = "qwenjax_partial.json"


@contextlib.contextmanager
def _partial(directory: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
  """A new temporary directory beside `directory` (`.<name>.qwenjax-tmp-<pid>`, holding a marker file while it is
  written), renamed to `directory` when the block ends. If the block fails, the temporary is removed and an
  error other than a CheckpointError becomes one naming `directory` (a full disk: tensorstore's, Orbax's, ours).
  Temporaries that killed writers left (their pid gone, the marker inside) are removed first."""
  real = pathlib.Path(os.path.realpath(directory))
  _files.remove_stale_temporaries(real, marker_file=_PARTIAL_FILE, marker=_PARTIAL_MARKER)
  tmp = pathlib.Path(_files.temporary_path(real))
  try:
    tmp.mkdir()
    _files.write_json(tmp / _PARTIAL_FILE, {"for": str(real)}, marker=_PARTIAL_MARKER)
  except (OSError, QwenJaxError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(f"{directory}: cannot create a temporary directory beside it ({first_line(e)}).") from None
  try:
    yield tmp
    (tmp / _PARTIAL_FILE).unlink()
    os.rename(tmp, real)  # onto nothing, or onto an empty directory; anything else fails (ENOTEMPTY, EEXIST)
    _files.fsync_directory(real)
  except BaseException as e:
    _files.remove_tree(tmp)
    if isinstance(e, CheckpointError) or not isinstance(e, Exception):
      raise
    raise CheckpointError(f"{directory}: writing the checkpoint failed ({first_line(e)[:300]}); the partial copy "
                          "was removed.") from None


def quiet_failed_writes() -> None:
  """For a launch script that reports a failed `save` as one line: once an Orbax write fails, its abandoned
  coroutines and tensorstore's callbacks report the failure again as Python collects them (an event loop closed
  under them; at exit, an import that fails; asyncio's "exception was never retrieved"). This drops those reports
  (sys.unraisablehook, the asyncio logger) and keeps all others."""
  logging.getLogger("asyncio").addFilter(lambda record: "exception was never retrieved" not in record.getMessage())
  default = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if "Event loop is closed" in str(unraisable.exc_value) or "orbax" in getattr(code, "co_filename", ""):
      return
    default(unraisable)

  sys.unraisablehook = hook


# --- Reading -------------------------------------------------------------------------------------------------


def restore(directory: str | os.PathLike[str], *, dtype: str | None = None, param_dtype: str | None = None,
            scan_layers: bool | None = None, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES,
            quantize: str | None = None) -> tuple[Qwen2, Tokenizer, ImageProcessorConfig | None]:
  """Restores a checkpoint `save` wrote: (model, tokenizer, image processor or None).

  dtype: compute dtype ('float32' or 'bfloat16'; default: the dtype the weights were written in); param_dtype:
    weight dtype (default: dtype), cast as the weights are read.
  scan_layers: stacked or per-layer weights (default: `qwenjax.config.default_scan_layers()`).
  mesh: each weight is read straight into `NamedSharding(mesh, spec_for(its logical axes))` under `rules`, every
    host reading only its shards (an int8 checkpoint's values and scales alike); None: one device.
  quantize: None takes the checkpoint's own quantization; any other value must match it (convert again with
    `--quantize` to change it).
  Raises CheckpointError naming the directory (and the tensor) when the checkpoint is incomplete or does not
  fit its config.json.
  """
  directory = pathlib.Path(directory)
  meta = _read_metadata(directory)
  name, what = (dtype, "dtype") if dtype else (meta["dtype"], f"{directory / METADATA_FILE}: dtype")
  compute = check_dtype(name, what)
  stored_quantize = meta.get("quantize", "none")
  if check_quantize(quantize) not in (None, check_quantize(stored_quantize)):
    raise CheckpointError(f"{directory}: holds {stored_quantize!r} weights, not {quantize!r}; convert the source "
                          f"again with --quantize={quantize}.")
  kwargs = dict(dtype=compute, param_dtype=check_dtype(param_dtype, "param_dtype") if param_dtype else compute,
                quantize=check_quantize(stored_quantize),
                quantize_embeddings=bool(meta.get("quantize_embeddings", False)))
  scan_layers = default_scan_layers() if scan_layers is None else scan_layers
  config_file = directory / "config.json"
  cfg = parse_config(read_json(config_file, error=CheckpointError), str(config_file))
  cls = registry.model_class(cfg)
  tokenizer = Tokenizer.from_directory(directory)
  processor_file = directory / "preprocessor_config.json"
  processor = ImageProcessorConfig.from_file(processor_file) if processor_file.exists() else None

  stored = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), scan_layers=True, **kwargs))
  decls = {path: var for path, var in weight_declarations(stored)}
  # int8 projections stored in the other layout than this processor's paths want ([K..., O...] against
  # output-major [O..., K...]; every checkpoint written before the output-major layout holds the former) are
  # read as stored and transposed on load.
  output_major = set(meta.get("int8_output_major", []))
  as_stored = {path: _stored_order(var, _name(path) in output_major) for path, var in decls.items()}
  _check_arrays(directory, {path: _permuted(var.shape, as_stored[path]) for path, var in decls.items()},
                cls.__name__)

  def sharding(var, order=None):
    if mesh is None:
      return SingleDeviceSharding(jax.local_devices()[0])
    return named_sharding(mesh, _permuted(var.axes, order), _permuted(var.shape, order), rules)

  arrays = _read_arrays(directory, {path: jax.ShapeDtypeStruct(_permuted(var.shape, as_stored[path]), var.dtype,
                                                               sharding=sharding(var, as_stored[path]))
                                    for path, var in decls.items()})
  for path, order in as_stored.items():
    if order is not None:
      arrays[path] = _transpose(arrays[path], tuple(int(i) for i in np.argsort(order)), sharding(decls[path]))
  if scan_layers:
    model = stored
    for path, var in decls.items():
      var.set_value(arrays.pop(path))
    return model, tokenizer, processor

  model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), scan_layers=False, **kwargs))
  targets: dict[tuple, list[tuple[int | None, nnx.Param]]] = {}
  for path, var in weight_declarations(model):
    stacked, layer = _stacked_path(path)
    targets.setdefault(stacked, []).append((layer, var))
  for path in decls:  # one stacked weight at a time: peak memory is the model plus one weight
    array = arrays.pop(path)
    layers = sorted(targets[path], key=lambda lv: -1 if lv[0] is None else lv[0])
    if layers[0][0] is None:
      layers[0][1].set_value(array)
      continue
    parts = _unstack(array, tuple(sharding(var) for _, var in layers))
    for (_, var), part in zip(layers, parts):
      var.set_value(part)
    del array, parts
  return model, tokenizer, processor


def _stored_order(var: nnx.Param, output_major: bool) -> tuple[int, ...] | None:
  """None if an int8 projection's values (or any other weight) are stored as this model declares them; else the
  order of the model's dims in the stored array (stored = wanted.transpose(order))."""
  contract = getattr(var, "contract", None)
  if contract is None:
    return None
  nd, n_in = len(var.shape), len(contract)
  stack = 1 if var.axes[0] == LAYERS else 0
  wanted_output_major = getattr(var.hf, "permute", None) is not None
  if wanted_output_major == output_major:
    return None
  if wanted_output_major:  # wanted [L, O..., K...], stored [L, K..., O...]
    return (*range(stack), *range(nd - n_in, nd), *range(stack, nd - n_in))
  if contract != tuple(range(stack, stack + n_in)):  # a vocabulary table: [V, D] in either case
    return None
  return (*range(stack), *range(stack + n_in, nd), *range(stack, stack + n_in))  # stored output-major


def _permuted(values: tuple, order: tuple[int, ...] | None) -> tuple:
  return tuple(values) if order is None else tuple(values[i] for i in order)


def _transpose(array: jax.Array, order: tuple[int, ...], sharding) -> jax.Array:
  """array.transpose(order) on device, into `sharding`."""
  return jax.jit(lambda a: a.transpose(order), out_shardings=sharding)(array)


@functools.partial(jax.jit, static_argnums=1)
def _split_layers(array: jax.Array, n: int) -> tuple[jax.Array, ...]:
  return tuple(array[i] for i in range(n))


def _unstack(array: jax.Array, shardings: tuple) -> tuple[jax.Array, ...]:
  """[L, ...] -> L arrays [...], each in its sharding, on device (no trip through the host). The slices keep the
  stacked array's sharding of their dimensions; `device_put` is then a no-op unless the rules split layers."""
  return tuple(jax.device_put(part, s) for part, s in zip(_split_layers(array, len(shardings)), shardings))


def _read_metadata(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / METADATA_FILE
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no such directory.")
  if not path.is_file():
    raise CheckpointError(f"{directory}: {METADATA_FILE} is missing, so this is not a complete qwenjax Orbax "
                          "checkpoint (python -m launch.convert writes one).")
  meta = read_json(path, error=CheckpointError)
  if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; this "
                          f"qwenjax reads {FORMAT!r} version {FORMAT_VERSION}.")
  if meta.get("layout") != LAYOUT:
    raise CheckpointError(f"{path}: param layout {meta.get('layout')!r}; this qwenjax reads {LAYOUT!r}.")
  if not isinstance(meta.get("dtype"), str):
    raise CheckpointError(f"{path}: dtype {meta.get('dtype')!r} is not one dtype name.")
  return meta


def _check_arrays(directory: pathlib.Path, expected: Mapping[tuple, tuple[int, ...]], model_name: str) -> None:
  """Every weight the config implies is stored, with its shape, and nothing else is."""
  params = directory / PARAMS_DIR
  if not (params / "_METADATA").is_file():
    raise CheckpointError(f"{directory}: {PARAMS_DIR}/ holds no Orbax checkpoint (no {PARAMS_DIR}/_METADATA).")
  for path in expected:  # Orbax stores each array in a directory named by its dotted path
    if not (params / _name(path) / "zarr.json").is_file():
      raise CheckpointError(f"{directory}: tensor {_name(path)!r} is missing (no array in "
                            f"{PARAMS_DIR}/{_name(path)}/).")
  try:
    with _checkpointer() as ckptr:
      tree = ckptr.metadata(params.absolute()).item_metadata.tree
  except Exception as e:  # Orbax and tensorstore raise many types for unreadable metadata.
    raise CheckpointError(f"{params}: unreadable Orbax metadata ({first_line(e)}).") from None
  stored = {tuple(k.key for k in keys): tuple(m.shape)
            for keys, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
  unexpected = sorted(_name(p) for p in stored.keys() - expected.keys())
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise CheckpointError(f"{directory}: unexpected tensor {unexpected[0]!r}{more} for the {model_name} that "
                          "config.json describes.")
  for path, shape in expected.items():
    if stored[path] != shape:
      raise CheckpointError(f"{directory}: tensor {_name(path)!r} has shape {stored[path]}, but config.json "
                            f"implies {shape}.")


def _read_arrays(directory: pathlib.Path, targets: Mapping[tuple, jax.ShapeDtypeStruct]) -> dict[tuple, jax.Array]:
  """Reads every array straight into its target's dtype and sharding."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  item = _nest(targets)
  restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                                             dtype=t.dtype, strict=True), item)
  try:
    with _checkpointer() as ckptr:
      tree = ckptr.restore((directory / PARAMS_DIR).absolute(),
                           args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
  except Exception as e:  # a truncated or corrupt chunk surfaces here, from tensorstore
    raise CheckpointError(f"{directory}: cannot read the weights in {PARAMS_DIR}/ ({first_line(e)}).") from None
  return {tuple(k.key for k in keys): a for keys, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- Helpers -------------------------------------------------------------------------------------------------


def _checkpointer():
  """Synchronous PyTree checkpointer; one directory per array (no OCDBT), zarr3 sub-chunks for partial reads."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True))


def _stacked_path(path: tuple) -> tuple[tuple, int | None]:
  """('visual', 'layers', 3, 'mlp', 'up') -> (('visual', 'layers', 'mlp', 'up'), 3); other paths unchanged."""
  for i, key in enumerate(path[:-1]):
    if key == "layers" and isinstance(path[i + 1], int):
      return path[:i + 1] + path[i + 2:], path[i + 1]
  return path, None


def _name(path: tuple) -> str:
  return ".".join(map(str, path))


def _nest(flat: Mapping[tuple, Any]) -> dict[str, Any]:
  """{('layers', 'attn', 'q_kernel'): x} -> {'layers': {'attn': {'q_kernel': x}}}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _model_config(model: Qwen2):
  return getattr(model, "vl_cfg", model.cfg)


def _flat_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """A Qwen2.5-VL config in transformers 5's nested form (`text_config`) -> Qwen's flat form; others as they are.
  The decoder's fields win over top-level ones, as `QwenVLConfig.from_hf_config` reads them."""
  if not isinstance(hf.get("text_config"), Mapping):
    return dict(hf)
  flat = {k: v for k, v in hf.items() if k != "text_config"}
  flat.update(hf["text_config"])
  flat["model_type"] = "qwen2_5_vl"
  return flat


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
  path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
