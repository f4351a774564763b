"""LoRA adapters in PEFT's layout, both ways: `adapter_config.json` + `adapter_model.safetensors`.

    adapter = load_adapter("my-lora/", cfg)           # a directory PEFT's save_pretrained wrote (or ours)
    save_adapter("out-lora/", adapter, base_model="Qwen/Qwen2.5-0.5B-Instruct")

PEFT stores, per adapted module of a causal LM, `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
[r, in] and `....lora_B.weight` [out, r] (torch Linear layout); ours are A [L, in, r] and B [L, r, out]
(`qwenjax.model.lora.Adapter`). What PEFT's LoRA can express and this loader cannot serve (DoRA, per-module ranks
or alphas, bias training, extra trained modules, fan_in_fan_out layers) is a CheckpointError naming the field.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np
import safetensors.numpy

from qwenjax._errors import CheckpointError, ConfigError
from qwenjax.checkpoints.hf import check_finite
from qwenjax.config import QwenConfig, read_field, read_json
from qwenjax.model.lora import TARGETS, Adapter, target_dims

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?layers\.(\d+)\.(\w+\.\w+)\."
                  r"lora_([AB])(?:\.\w+)?\.weight")
_MODULES = {hf: t for t, (_, _, hf) in TARGETS.items()}


def load_adapter(path: str | os.PathLike[str], cfg: QwenConfig) -> Adapter:
  """A PEFT LoRA adapter directory -> Adapter for a model of `cfg` (CheckpointError naming the file and field)."""
  directory = pathlib.Path(path)
  config_path, weights_path = directory / CONFIG, directory / WEIGHTS
  if not directory.is_dir():
    raise CheckpointError(f"LoRA adapter {directory}: not a directory (expected {CONFIG} and {WEIGHTS} in it).")
  config = read_json(config_path, error=CheckpointError)
  src = str(config_path)
  if config.get("peft_type", "LORA") != "LORA":
    raise CheckpointError(f"{src}: peft_type {config.get('peft_type')!r} is not LORA.")
  for field, ok in (("use_dora", not config.get("use_dora")), ("rank_pattern", not config.get("rank_pattern")),
                    ("alpha_pattern", not config.get("alpha_pattern")), ("bias", config.get("bias", "none") == "none"),
                    ("modules_to_save", not config.get("modules_to_save")),
                    ("fan_in_fan_out", not config.get("fan_in_fan_out"))):
    if not ok:
      raise CheckpointError(f"{src}: {field}={config[field]!r} is not supported (plain LoRA on the projections).")
  try:  # the fields' checks of a model's config.json: finite numbers (no NaN, no Infinity), exact types
    rank = read_field(config, "r", int, src, positive=True)
    alpha = read_field(config, "lora_alpha", float, src, float(rank))
    dropout = read_field(config, "lora_dropout", float, src, 0.0)
    use_rslora = read_field(config, "use_rslora", bool, src, False)
  except ConfigError as e:
    raise CheckpointError(str(e)) from None
  if not 0 <= dropout < 1:
    raise CheckpointError(f"{src}: lora_dropout must be a number in [0, 1), got {dropout!r}.")
  layers = config.get("layers_to_transform")
  layers = set(range(cfg.num_layers)) if layers is None else {layers} if isinstance(layers, int) else set(layers)
  if not weights_path.is_file():
    raise CheckpointError(f"LoRA adapter {directory}: {WEIGHTS} is missing.")
  try:
    tensors = safetensors.numpy.load_file(weights_path)
  except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
    raise CheckpointError(f"{weights_path}: not a readable safetensors file ({e}).") from None
  # The targets are the projections the file holds tensors for (target_modules may be a regex over module paths
  # that differ between Qwen2 and Qwen2.5-VL checkpoints); every adapted layer must have both A and B.
  parsed = {}
  for key in tensors:
    m = _KEY.fullmatch(key)
    if m is None or m.group(2) not in _MODULES:
      raise CheckpointError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight of a decoder projection "
                            "(only the decoder's q/k/v/o/gate/up/down projections can be adapted).")
    parsed[key] = (int(m.group(1)), _MODULES[m.group(2)], m.group(3))
  targets = tuple(t for t in TARGETS if any(t == target for _, target, _ in parsed.values()))
  if not targets:
    raise CheckpointError(f"{weights_path}: holds no LoRA weights.")
  # Every tensor's layer and shape is checked against the model and r, and its values are finite, before anything
  # is allocated: r is the file's word, and r=2^40 must be an error naming a tensor, not an allocation that size.
  seen = set()
  for key, value in tensors.items():
    layer, target, which = parsed[key]
    if layer >= cfg.num_layers or layer not in layers:
      raise CheckpointError(f"{weights_path}: tensor {key!r} is outside {src}'s layers_to_transform or this "
                            f"model's {cfg.num_layers} layers.")
    k, o = target_dims(cfg, target)
    want = (rank, k) if which == "A" else (o, rank)
    if value.shape != want:
      raise CheckpointError(f"{weights_path}: tensor {key!r} has shape {value.shape}; this model and r={rank} "
                            f"need {want}.")
    check_finite(value, str(weights_path), key)
    seen.add((layer, target, which))
  missing = [(l, t, w) for t in targets for l in sorted(layers) for w in "AB" if (l, t, w) not in seen]
  if missing:
    l, t, w = missing[0]
    raise CheckpointError(f"{weights_path}: lora_{w} of layer {l}'s {TARGETS[t][2]} is missing "
                          f"({len(missing)} tensor(s) in all).")
  weights = {t: (np.zeros((cfg.num_layers, target_dims(cfg, t)[0], rank), np.float32),
                 np.zeros((cfg.num_layers, rank, target_dims(cfg, t)[1]), np.float32)) for t in targets}
  for key, value in tensors.items():
    layer, target, which = parsed[key]
    a, b = weights[target]
    (a if which == "A" else b)[layer] = np.asarray(value, np.float32).T
  return Adapter(rank, alpha, weights, use_rslora, dropout)


def save_adapter(path: str | os.PathLike[str], adapter: Adapter, base_model: str | None = None) -> None:
  """Writes `adapter` as PEFT's save_pretrained does, so peft / transformers load it (`PeftModel.from_pretrained`)."""
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for t, (a, b) in adapter.weights.items():
    for layer in range(a.shape[0]):
      prefix = f"base_model.model.model.layers.{layer}.{TARGETS[t][2]}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[layer].T, np.float32)  # [r, in]
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[layer].T, np.float32)  # [out, r]
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
      "target_modules": [TARGETS[t][2].rpartition(".")[2] for t in adapter.targets],
      "bias": "none", "fan_in_fan_out": False, "use_rslora": adapter.use_rslora, "use_dora": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
      "rank_pattern": {}, "alpha_pattern": {},
  }
  safetensors.numpy.save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
  (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
