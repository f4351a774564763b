"""Qwen models as Orbax checkpoints: converted once, then restored straight into a device mesh.

`convert` (what `python -m launch.convert` runs) loads any `--model` source (a Hugging Face directory, a GGUF
file, the embedded model) and writes a directory that holds everything a run needs:

    qwenjax_checkpoint.json    marks the directory: format and version, weight dtype, source, param layout
    config.json                the model's Hugging Face config (Qwen2.5-VL: Qwen's flat form with vision_config)
    tokenizer.json, tokenizer_config.json, generation_config.json    tokenizer, chat template, end-of-sequence ids
    preprocessor_config.json   Qwen2.5-VL only: the image processor's settings
    params/                    the Orbax PyTree checkpoint: one zarr3 array directory per weight, named by the
                               weight's path in the param tree (`embed`, `layers.attn.q_kernel`, `visual.merger.fc1`)

Weights are stored in one layout, the stacked one (`scan_layers=True`: a per-layer weight is one [L, ...] array).
`restore` builds the abstract model, asks Orbax for each weight straight in its final sharding (read from the
weight's logical axes through the sharding rules), so each host reads only the chunks it holds; a restore with
`scan_layers=False` then slices each stacked weight into per-layer arrays on device, one weight at a time.

    convert("/ckpt/Qwen2.5-7B-Instruct", "/ckpt/qwen7b-orbax", dtype="bfloat16")
    model, tokenizer, processor = restore("/ckpt/qwen7b-orbax", mesh=make_mesh(parse_mesh("fsdp:2,tensor:4")))
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from qwenjax._errors import CheckpointError, ConfigError
from qwenjax.checkpoints.hf import parse_config
from qwenjax.config import read_json
from qwenjax.multimodal.processing import ImageProcessorConfig
from qwenjax.model.decoder import Qwen2, weight_declarations
from qwenjax.parallel.sharding import DEFAULT_RULES, ShardingRules, named_sharding
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


def convert(source: str | os.PathLike[str] | None, output: str | os.PathLike[str], *, dtype: str = "float32",
            chunk_bytes: int = CHUNK_BYTES) -> pathlib.Path:
  """Loads `source` (anything `qwenjax.load` takes: 'default', a .gguf file, a checkpoint directory) and writes
  it to the new directory `output` as an Orbax checkpoint with weights in `dtype`. Returns `output`."""
  from qwenjax.checkpoints import embedded  # pylint: disable=g-import-not-at-top
  from qwenjax.checkpoints import loader  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(embedded.resolve_model_arg(source))
  output = pathlib.Path(output)
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise CheckpointError(f"{output}: already exists and is not an empty directory; convert writes a new one.")
  try:  # before the long load: a bad path fails at once (an empty directory is a valid output to retry with)
    output.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise CheckpointError(f"{output}: cannot create the output directory ({e.strerror}).") from None
  loaded = loader.load(str(path), dtype=dtype, scan_layers=True)
  generation = {}
  processor = None
  if path.suffix == ".gguf" and path.is_file():
    from qwenjax.checkpoints.gguf_file import GGUFCheckpoint  # pylint: disable=g-import-not-at-top

    with GGUFCheckpoint(path) as gguf:
      hf = gguf.hf_config()
  else:
    hf = _flat_config(_read_json(path / "config.json"))
    if (path / "generation_config.json").is_file():
      generation = _read_json(path / "generation_config.json")
    if (path / "preprocessor_config.json").is_file():
      processor = _read_json(path / "preprocessor_config.json")
  if parse_config(hf, str(path)) != _model_config(loaded.model):
    raise CheckpointError(f"{path}: the config.json written for it would not parse back to the loaded model's "
                          "config.")
  _save(output, loaded.model, loaded.tokenizer, hf, source=str(path), generation_config=generation,
        preprocessor_config=processor, chunk_bytes=chunk_bytes)
  return output


def _save(directory: pathlib.Path, model: Qwen2, tokenizer: Tokenizer, hf_config: Mapping[str, Any], *,
          source: str, generation_config: Mapping[str, Any], preprocessor_config: Mapping[str, Any] | None,
          chunk_bytes: int) -> None:
  """Writes the checkpoint directory; the metadata file last, so an interrupted write is never taken for whole."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  assert model.scan_layers, "the checkpoint layout is the stacked one: load the model with scan_layers=True"
  params = {path: var[...] for path, var in weight_declarations(model)}
  tree = _nest(params)
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), tree)
  with _checkpointer() as ckptr:
    ckptr.save((directory / PARAMS_DIR).absolute(), args=ocp.args.PyTreeSave(tree, save_args=save_args))
  _write_json(directory / "config.json", hf_config)
  tokenizer.save(directory, generation_config=generation_config)
  if preprocessor_config is not None:
    _write_json(directory / "preprocessor_config.json", preprocessor_config)
  _write_json(directory / METADATA_FILE, {
      "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": str(next(iter(params.values())).dtype),
      "source": source, "layout": LAYOUT, "model": type(model).__name__})


# --- Reading -------------------------------------------------------------------------------------------------


def restore(directory: str | os.PathLike[str], *, dtype: str | None = None, param_dtype: str | None = None,
            scan_layers: bool | None = None, mesh: Mesh | None = None,
            rules: ShardingRules = DEFAULT_RULES) -> tuple[Qwen2, Tokenizer, ImageProcessorConfig | None]:
  """Restores a checkpoint `convert` wrote: (model, tokenizer, image processor or None).

  dtype: compute dtype ('float32' or 'bfloat16'; default: the dtype the weights were written in); param_dtype:
    weight dtype (default: dtype), cast as the weights are read.
  scan_layers: stacked or per-layer weights (default: `qwenjax.checkpoints.loader.default_scan_layers()`).
  mesh: each weight is read straight into `NamedSharding(mesh, spec_for(its logical axes))` under `rules`, every
    host reading only its shards; None: one device.
  Raises CheckpointError naming the directory (and the tensor) when the checkpoint is incomplete or does not
  fit its config.json.
  """
  from qwenjax.checkpoints import loader  # pylint: disable=g-import-not-at-top
  from qwenjax.model import qwen2_vl  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory)
  meta = _read_metadata(directory)
  dtype = dtype or meta["dtype"]
  if dtype not in loader.DTYPES or (param_dtype or dtype) not in loader.DTYPES:
    raise ValueError(f"dtype must be one of {sorted(loader.DTYPES)}, got {dtype!r} / {param_dtype!r}.")
  scan_layers = loader.default_scan_layers() if scan_layers is None else scan_layers
  cfg = parse_config(_read_json(directory / "config.json"), str(directory / "config.json"))
  cls = qwen2_vl.Qwen2VL if isinstance(cfg, qwen2_vl.QwenVLConfig) else Qwen2
  kwargs = dict(dtype=loader.DTYPES[dtype], param_dtype=loader.DTYPES[param_dtype or dtype])
  tokenizer = Tokenizer.from_directory(directory)
  processor_file = directory / "preprocessor_config.json"
  processor = ImageProcessorConfig.from_file(processor_file) if processor_file.exists() else None

  stored = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), scan_layers=True, **kwargs))
  decls = {path: var for path, var in weight_declarations(stored)}
  _check_arrays(directory, {path: tuple(var.shape) for path, var in decls.items()}, cls.__name__)

  def sharding(var):
    if mesh is None:
      return SingleDeviceSharding(jax.local_devices()[0])
    return named_sharding(mesh, var.axes, var.shape, rules)

  arrays = _read_arrays(directory, {path: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding(var))
                                    for path, var in decls.items()})
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
  meta = _read_json(path)
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
    raise CheckpointError(f"{params}: unreadable Orbax metadata ({_first_line(e)}).") from None
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
    raise CheckpointError(f"{directory}: cannot read the weights in {PARAMS_DIR}/ ({_first_line(e)}).") from None
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


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  """config.read_json, its errors as CheckpointErrors (a broken file is a broken checkpoint)."""
  try:
    return read_json(path)
  except ConfigError as e:
    raise CheckpointError(str(e)) from None


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
  path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__

