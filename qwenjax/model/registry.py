"""The model registry: one table from a checkpoint's identity to what serves it.

A checkpoint names its family in three ways: a Hugging Face config.json's `model_type` and `architectures`, and a
GGUF file's `general.architecture`. Each `ModelEntry` lists the names it answers to, its config class and its
module (imported when asked for: `qwenjax.model` must not load the vision tower on every import), and points at
its weight names. The loaders (`qwenjax.checkpoints`), the planner, the engine and the launch scripts ask here
instead of choosing a class themselves:

    entry = registry.for_hf_config(hf, source)    # or for_gguf(arch, source), for_config(cfg), for_model(model)
    cfg = entry.config_class.from_hf_config(hf, source)
    model = entry.module_class(cfg, rngs=...)

An identity not in the table is one ConfigError naming the file, the value, and the supported values.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from qwenjax._errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One model family. `config` and `module` are "module:attribute" paths, imported on first use.

  weights: where its checkpoint names are declared. A Hugging Face name is declared beside each weight
  (`qwenjax.model.layers.declare`'s HFTensor, listed by `qwenjax.model.decoder.weight_declarations`); a GGUF name
  maps to a Hugging Face one through `qwenjax.checkpoints.gguf_file.NAME_TABLES[entry.name]`.
  chat_template: the family's default chat template, or None: a checkpoint's own template (tokenizer_config.json,
  chat_template.jinja, GGUF metadata) is the only one qwenjax renders, for every family it serves today."""

  name: str
  config: str
  module: str
  model_types: tuple[str, ...] = ()  # config.json `model_type` values (a VL checkpoint's text part included)
  architectures: tuple[str, ...] = ()  # config.json `architectures` entries
  gguf_architectures: tuple[str, ...] = ()  # GGUF `general.architecture` values
  multimodal: bool = False  # a vision tower beside the decoder: the engine prepares images and video for it
  weights: str = ""
  chat_template: str | None = None

  @property
  def config_class(self) -> type:
    return _attribute(self.config)

  @property
  def module_class(self) -> type:
    return _attribute(self.module)


def _attribute(path: str):
  module, name = path.split(":")
  return getattr(importlib.import_module(module), name)


_DECLARED = "declared with each weight (qwenjax.model.decoder.weight_declarations)"

# The table. A Qwen2.5-VL checkpoint's text decoder (transformers 5's nested `text_config`, model_type
# "qwen2_5_vl_text") is a Qwen2 decoder: the qwen2 entry answers to it.
ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="qwen2", config="qwenjax.config:QwenConfig", module="qwenjax.model.decoder:Qwen2",
        model_types=("qwen2", "qwen2_5_vl_text"), architectures=("Qwen2ForCausalLM",), gguf_architectures=("qwen2",),
        weights=_DECLARED + "; GGUF: qwenjax.checkpoints.gguf_file.NAME_TABLES['qwen2']"),
    # Qwen3 dense: the same decoder with q/k norms and (by default) no q/k/v biases, which QwenConfig reads from
    # model_type "qwen3"; for_config / for_model answer qwen2 for it (the same classes).
    ModelEntry(
        name="qwen3", config="qwenjax.config:QwenConfig", module="qwenjax.model.decoder:Qwen2",
        model_types=("qwen3",), architectures=("Qwen3ForCausalLM",), gguf_architectures=("qwen3",),
        weights=_DECLARED + "; GGUF: qwenjax.checkpoints.gguf_file.NAME_TABLES['qwen3']"),
    # Qwen3-MoE: Qwen3's attention; its sparse layers' MLP is `qwenjax.model.decoder.MoE` (a router over stacked
    # experts, each stored apart in a checkpoint: `mlp.experts.{e}.*`), which QwenConfig's num_experts turns on.
    ModelEntry(
        name="qwen3_moe", config="qwenjax.config:QwenConfig", module="qwenjax.model.decoder:Qwen2",
        model_types=("qwen3_moe",), architectures=("Qwen3MoeForCausalLM",), gguf_architectures=("qwen3moe",),
        weights=_DECLARED + " (experts stacked [E, ...] from one tensor per expert); GGUF: "
        "qwenjax.checkpoints.gguf_file.NAME_TABLES['qwen3_moe']"),
    ModelEntry(
        name="qwen2_5_vl", config="qwenjax.model.qwen2_vl:QwenVLConfig", module="qwenjax.model.qwen2_vl:Qwen2VL",
        model_types=("qwen2_5_vl",), architectures=("Qwen2_5_VLForConditionalGeneration",), multimodal=True,
        weights=_DECLARED + " (the tower's: qwenjax.model.vision, `visual.*`); no GGUF form"),
)

BY_NAME: dict[str, ModelEntry] = {entry.name: entry for entry in ENTRIES}
_BY_MODEL_TYPE = {t: entry for entry in ENTRIES for t in entry.model_types}
_BY_ARCHITECTURE = {a: entry for entry in ENTRIES for a in entry.architectures}
_BY_GGUF = {a: entry for entry in ENTRIES for a in entry.gguf_architectures}
_TEXT = BY_NAME["qwen2"]  # a config.json that names no family (qwenjax has always read one as Qwen2)
_VL = BY_NAME["qwen2_5_vl"]


def _unknown(source: str, key: str, value: Any, supported) -> ConfigError:
  return ConfigError(f"{source}: {key} {value!r} is not a model qwenjax serves (supported: "
                     f"{', '.join(repr(s) for s in sorted(supported))}).")


def for_hf_config(hf: Mapping[str, Any], source: str = "config.json") -> ModelEntry:
  """The entry of a config.json dict: by `model_type`; without one, by the first `architectures` entry; with
  neither, Qwen2. A config with a `vision_config` is Qwen2.5-VL's (its `model_type` may be left out)."""
  model_type = hf.get("model_type")
  if model_type is not None:
    if not isinstance(model_type, str) or model_type not in _BY_MODEL_TYPE:
      raise _unknown(source, "model_type", model_type, _BY_MODEL_TYPE)
    entry = _BY_MODEL_TYPE[model_type]
  elif hf.get("architectures"):
    architecture = hf["architectures"][0] if isinstance(hf["architectures"], list) else hf["architectures"]
    if not isinstance(architecture, str) or architecture not in _BY_ARCHITECTURE:
      raise _unknown(source, "architectures", architecture, _BY_ARCHITECTURE)
    entry = _BY_ARCHITECTURE[architecture]
  else:
    entry = _TEXT
  if entry is _TEXT and model_type != "qwen2_5_vl_text" and "vision_config" in hf:
    entry = _VL
  return entry


def parse_hf_config(hf: Mapping[str, Any], source: str = "config.json"):
  """A config.json dict -> its entry's config (a QwenConfig, or a QwenVLConfig for Qwen2.5-VL)."""
  return for_hf_config(hf, source).config_class.from_hf_config(hf, source=source)


def for_gguf(architecture: Any, source: str) -> ModelEntry:
  """The entry of a GGUF file's `general.architecture`."""
  if not isinstance(architecture, str) or architecture not in _BY_GGUF:
    raise _unknown(source, "general.architecture", architecture, _BY_GGUF)
  return _BY_GGUF[architecture]


def for_config(cfg) -> ModelEntry:
  """The entry whose config class `cfg` is an instance of (the most derived one, if classes derive)."""
  return _most_derived(cfg, "config", "the config of a model")


def for_model(model) -> ModelEntry:
  """The entry whose module class `model` is an instance of (the most derived one: Qwen2VL is a Qwen2)."""
  return _most_derived(model, "module", "a model")


def _most_derived(obj, kind: str, what: str) -> ModelEntry:
  """The entry whose `<kind>_class` `obj` is an instance of, most derived first; ConfigError naming it if none."""
  classes = {entry: getattr(entry, f"{kind}_class") for entry in ENTRIES}
  for entry in sorted(ENTRIES, key=lambda e: -len(classes[e].__mro__)):
    if isinstance(obj, classes[entry]):
      return entry
  raise ConfigError(f"{type(obj).__name__} is not {what} qwenjax serves (supported: "
                    f"{', '.join(getattr(e, kind).split(':')[1] for e in ENTRIES)}).")


def model_class(cfg) -> type:
  """The module a config builds: `decoder.Qwen2` for a QwenConfig, `qwen2_vl.Qwen2VL` for a QwenVLConfig."""
  return for_config(cfg).module_class
