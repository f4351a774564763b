"""One entry point from a `--model` value to a loaded model and its tokenizer, and one that converts it.

`--model` may be "default" (or empty: the embedded Qwen2.5-Coder-0.5B-Instruct GGUF), a `.gguf` file, a
Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json), or a qwenjax Orbax checkpoint
directory (`convert`, which `python -m launch.convert` runs), restored straight into the mesh's shardings.

    loaded = load("/ckpt/Qwen2.5-7B-Instruct", dtype="bfloat16", mesh=mesh)
    convert("/ckpt/Qwen2.5-7B-Instruct", "/ckpt/qwen7b-orbax", dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import jax
from absl import logging

from qwenjax import _files
from qwenjax._errors import CheckpointError
from qwenjax.checkpoints import embedded, hf, orbax_store
from qwenjax.checkpoints.gguf_file import GGUFCheckpoint
from qwenjax.config import DEFAULT_DTYPE, QwenConfig, check_dtype, default_scan_layers, read_json
from qwenjax.model import registry
from qwenjax.model.decoder import Qwen2
from qwenjax.model.layers import check_quantize
from qwenjax.multimodal.processing import ImageProcessorConfig
from qwenjax.parallel import sharding
from qwenjax.text.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
  model: Qwen2  # or qwenjax.model.qwen2_vl.Qwen2VL
  tokenizer: Tokenizer
  source: str  # the file or directory the weights came from
  image_processor: ImageProcessorConfig | None = None  # a VL checkpoint's preprocessor_config.json

  @property
  def config(self) -> QwenConfig:
    return self.model.cfg


def read_config(model: str | None = None):
  """The config of a `--model` value without loading weights (a QwenConfig, or a QwenVLConfig)."""
  path = pathlib.Path(embedded.resolve_model_arg(model))
  if path.is_file() and path.suffix == ".gguf":
    return registry.parse_hf_config(GGUFCheckpoint(path).hf_config(), source=str(path))
  if path.is_dir():
    return hf.read_config(path)
  raise CheckpointError(f"{path}: no such file or directory.")


def load(model: str | None = None, *, dtype: str = DEFAULT_DTYPE, param_dtype: str | None = None,
         scan_layers: bool | None = None, mesh: jax.sharding.Mesh | None = None,
         rules: sharding.ShardingRules = sharding.DEFAULT_RULES, quantize: str | None = None,
         quantize_embeddings: bool = False) -> LoadedModel:
  """Loads weights and tokenizer. dtype: compute dtype; param_dtype: storage dtype (defaults to dtype).
  mesh: load each weight straight into its shards over this mesh, by `rules` (None: one device).
  quantize: None, "int8" (w8a16) or "w8a8": every projection is quantized to int8 per output channel as it loads,
  one float32 tensor at a time (`qwenjax.model.layers.QuantizedWeight`); quantize_embeddings: the embedding and
  lm_head too. An Orbax checkpoint keeps the quantization it was converted with."""
  quantize = check_quantize(quantize)
  kwargs = dict(dtype=check_dtype(dtype), param_dtype=check_dtype(param_dtype or dtype, "param_dtype"),
                scan_layers=default_scan_layers() if scan_layers is None else scan_layers, quantize=quantize,
                quantize_embeddings=quantize_embeddings)
  path = pathlib.Path(embedded.resolve_model_arg(model))
  start = time.perf_counter()
  if path.is_file() and path.suffix == ".gguf":
    gguf = GGUFCheckpoint(path)
    cfg = registry.parse_hf_config(gguf.hf_config(), source=str(path))
    # The tokenizer first: building it from 150k-entry metadata lists is a transient of ~0.5 GB that should
    # not stack on top of the weights.
    tokenizer = gguf.tokenizer()
    loaded = LoadedModel(hf.load_from_source(cfg, gguf, mesh=mesh, rules=rules, **kwargs), tokenizer,
                         str(path))
  elif orbax_store.is_orbax_checkpoint(path):  # before the next branch: it holds a config.json too
    restored, tokenizer, processor = orbax_store.restore(
        path, dtype=dtype, param_dtype=param_dtype, scan_layers=kwargs["scan_layers"], mesh=mesh, rules=rules,
        quantize=quantize)
    loaded = LoadedModel(restored, tokenizer, str(path), processor)
  elif path.is_dir() and (path / "config.json").exists():
    processor = path / "preprocessor_config.json"
    loaded = LoadedModel(hf.load_model(path, mesh=mesh, rules=rules, **kwargs),
                         Tokenizer.from_directory(path), str(path),
                         ImageProcessorConfig.from_file(processor) if processor.exists() else None)
  elif not path.exists():
    raise CheckpointError(f"{path}: no such file or directory (expected 'default', a .gguf file, a "
                          "Hugging Face checkpoint directory or a qwenjax Orbax checkpoint directory).")
  else:
    raise CheckpointError(f"{path}: neither a .gguf file nor a directory with config.json.")
  logging.info("Loaded %s (%d layers, %s%s) in %.1f s.", path, loaded.config.num_layers, dtype,
               f", {loaded.model.quantize} weights" if loaded.model.quantize else "", time.perf_counter() - start)
  return loaded


def convert(source: str | os.PathLike[str] | None, output: str | os.PathLike[str], *, dtype: str = DEFAULT_DTYPE,
            chunk_bytes: int = orbax_store.CHUNK_BYTES, quantize: str | None = None,
            quantize_embeddings: bool = False) -> pathlib.Path:
  """Loads `source` (anything `load` takes: 'default', a .gguf file, a checkpoint directory) and writes it to the
  new directory `output` as a qwenjax Orbax checkpoint (`qwenjax.checkpoints.orbax_store`) with weights in `dtype`,
  or, with `quantize`, int8 values and float32 scales (restored straight into a mesh like any other weights).
  Returns `output`."""
  quantize = check_quantize(quantize)
  path = pathlib.Path(embedded.resolve_model_arg(source))
  output = pathlib.Path(output)
  _check_new(output)
  parent = output.absolute().parent
  try:  # before the long load: a bad path fails at once
    parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a parent that is a file: mkdir says "File exists", the user needs "Not a directory"
    reason = "Not a directory" if parent.exists() and not parent.is_dir() else e.strerror
    raise CheckpointError(f"{output}: cannot create the output directory ({reason}).") from None
  # One writer per destination (a second convert to it is refused); orbax_store.save writes beside it and renames.
  with _files.OwnedLock(_files.lock_path_for(output), str(output)):
    _check_new(output)  # another convert may have finished while this one started
    _convert(path, output, dtype, chunk_bytes, quantize, quantize_embeddings)
  return output


def _check_new(output: pathlib.Path) -> None:
  if os.path.lexists(output) and (not output.is_dir() or any(output.iterdir())):
    raise CheckpointError(f"{output}: already exists and is not an empty directory; convert writes a new one.")


def _convert(path: pathlib.Path, output: pathlib.Path, dtype: str, chunk_bytes: int, quantize: str | None,
             quantize_embeddings: bool) -> None:
  loaded = load(str(path), dtype=dtype, scan_layers=True, quantize=quantize, quantize_embeddings=quantize_embeddings)
  generation = {}
  processor = None
  if path.suffix == ".gguf" and path.is_file():
    with GGUFCheckpoint(path) as gguf:
      hf_config = gguf.hf_config()
  else:
    hf_config = read_json(path / "config.json", error=CheckpointError)
    if (path / "generation_config.json").is_file():
      generation = read_json(path / "generation_config.json", error=CheckpointError)
    if (path / "preprocessor_config.json").is_file():
      processor = read_json(path / "preprocessor_config.json", error=CheckpointError)
  orbax_store.save(output, loaded.model, loaded.tokenizer, hf_config, source=str(path), generation_config=generation,
                   preprocessor_config=processor, chunk_bytes=chunk_bytes)
