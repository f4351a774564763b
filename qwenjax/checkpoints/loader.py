"""One entry point from a `--model` value to a loaded model and its tokenizer.

`--model` may be "default" (or empty: the embedded Qwen2.5-Coder-0.5B-Instruct GGUF), a `.gguf` file, a
Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json), or a qwenjax Orbax checkpoint
directory (`python -m launch.convert`), restored straight into the mesh's shardings.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
from absl import logging

from qwenjax.checkpoints import hf
from qwenjax.checkpoints import orbax_store
from qwenjax.parallel import sharding
from qwenjax._errors import CheckpointError
from qwenjax.config import QwenConfig
from qwenjax.multimodal.processing import ImageProcessorConfig
from qwenjax.model.decoder import Qwen2
from qwenjax.text.tokenizer import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class LoadedModel:
  model: Qwen2  # or qwenjax.model.qwen2_vl.Qwen2VL
  tokenizer: Tokenizer
  source: str  # the file or directory the weights came from
  image_processor: ImageProcessorConfig | None = None  # a VL checkpoint's preprocessor_config.json

  @property
  def config(self) -> QwenConfig:
    return self.model.cfg


def default_scan_layers() -> bool:
  """Scanned layers compile fast on TPU/GPU; on XLA:CPU unrolled layers decode faster (measured 2.6x)."""
  return jax.default_backend() != "cpu"


def read_config(model: str | None = None):
  """The config of a `--model` value without loading weights (a QwenConfig, or a QwenVLConfig)."""
  from qwenjax.checkpoints import embedded  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(embedded.resolve_model_arg(model))
  if path.is_file() and path.suffix == ".gguf":
    from qwenjax.checkpoints.gguf_file import GGUFCheckpoint  # pylint: disable=g-import-not-at-top

    return QwenConfig.from_hf_config(GGUFCheckpoint(path).hf_config(), source=str(path))
  if path.is_dir():
    return hf.read_config(path)
  raise CheckpointError(f"{path}: no such file or directory.")


def load(model: str | None = None, *, dtype: str = "float32", param_dtype: str | None = None,
         scan_layers: bool | None = None, mesh: jax.sharding.Mesh | None = None,
         rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> LoadedModel:
  """Loads weights and tokenizer. dtype: compute dtype; param_dtype: storage dtype (defaults to dtype).
  mesh: load each weight straight into its shards over this mesh, by `rules` (None: one device)."""
  from qwenjax.checkpoints import embedded  # pylint: disable=g-import-not-at-top

  if dtype not in DTYPES or (param_dtype or dtype) not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r} / {param_dtype!r}.")
  kwargs = dict(dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype or dtype],
                scan_layers=default_scan_layers() if scan_layers is None else scan_layers)
  path = pathlib.Path(embedded.resolve_model_arg(model))
  start = time.perf_counter()
  if path.is_file() and path.suffix == ".gguf":
    from qwenjax.checkpoints.gguf_file import GGUFCheckpoint  # pylint: disable=g-import-not-at-top

    gguf = GGUFCheckpoint(path)
    cfg = QwenConfig.from_hf_config(gguf.hf_config(), source=str(path))
    # The tokenizer first: building it from 150k-entry metadata lists is a transient of ~0.5 GB that should
    # not stack on top of the weights.
    tokenizer = gguf.tokenizer()
    loaded = LoadedModel(hf.load_from_source(cfg, gguf, mesh=mesh, rules=rules, **kwargs), tokenizer,
                         str(path))
  elif orbax_store.is_orbax_checkpoint(path):  # before the next branch: it holds a config.json too
    restored, tokenizer, processor = orbax_store.restore(
        path, dtype=dtype, param_dtype=param_dtype, scan_layers=kwargs["scan_layers"], mesh=mesh, rules=rules)
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
  logging.info("Loaded %s (%d layers, %s) in %.1f s.", path, loaded.config.num_layers, dtype,
               time.perf_counter() - start)
  return loaded
