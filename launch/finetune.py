r"""Fine-tunes a LoRA adapter on chat data and writes it in PEFT's layout.

    # From chat JSONL (the format batch jobs read, assistant turns included: the loss falls on them):
    python -m launch.finetune --data=train.jsonl --output=my-lora --steps=200 --rank=16
    # From a batch job: its requests joined by id with the replies it generated:
    python -m launch.finetune --requests=prompts.jsonl --responses=answers.jsonl --output=my-lora
    # Then serve it:
    python -m launch.batch_generate --lora=mine=my-lora --input=more.jsonl --output=out.jsonl  # lines: "lora": "mine"

Conversations are packed into rows of --row_len tokens (one compiled step); --eval_fraction of the rows is held
out and its loss reported every --eval_every steps and at the end. Orbax checkpoints of the adapter and the
optimizer state go to --checkpoint_dir (default: <output>/checkpoints) every --save_every steps; rerunning the same
command after a kill (or Ctrl-C: exit 130, SIGTERM: 143) resumes from the newest intact checkpoint (an unreadable
one is set aside as `<step>.unreadable`, with a warning) and ends with the adapter an uninterrupted run writes, bit
for bit. Progress (loss, tokens/s, ETA) goes to stderr; the adapter directory's path to stdout.

One run at a time per --output (a lock beside it). <output>/run.json records what the run computes: the packed
rows' sha256, the model and every flag that changes the result; a rerun resumes only a run whose record matches,
and is refused, naming each flag that differs, otherwise. An --output holding an adapter, a log or checkpoints but no
run record is refused untouched. training_log.jsonl is appended to, one line per step as it ends; the steps re-run
after a resume from an older checkpoint are not logged twice (they compute the same values), so it holds each step
once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import time

from absl import app, flags, logging

from launch import _cli

_MODEL = flags.DEFINE_string("model", "default", "The base model: 'default' (the embedded Qwen2.5-Coder-0.5B-"
                             "Instruct), a .gguf file, a Hugging Face checkpoint directory, or an Orbax checkpoint.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and base-weight dtype (the adapter "
                           "and optimizer state are float32).")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: the frozen base in int8 weights "
                              "(QLoRA-style: a quarter of float32's memory).")
_DATA = flags.DEFINE_multi_string("data", [], "Chat JSONL to train on (repeatable): {\"messages\": [...]} lines or "
                                  "OpenAI Batch request lines, assistant turns included.")
_REQUESTS = flags.DEFINE_string("requests", None, "A batch job's input JSONL; with --responses, its conversations "
                                "plus the generated replies are the training data.")
_RESPONSES = flags.DEFINE_string("responses", None, "The batch job's output JSONL (simple or OpenAI format).")
_KEEP_TRUNCATED = flags.DEFINE_bool("keep_truncated", False, "Also learn replies that max_tokens cut off.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the adapter (adapter_config.json, "
                              "adapter_model.safetensors).", required=True)
_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint_dir", None, "Orbax checkpoints (default: <output>/checkpoints).")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.", lower_bound=1)
_ALPHA = flags.DEFINE_float("alpha", 32.0, "LoRA alpha (the update is scaled by alpha / rank).")
_DROPOUT = flags.DEFINE_float("dropout", 0.0, "Dropout on the adapters' inputs.", lower_bound=0.0, upper_bound=0.99)
_TARGETS = flags.DEFINE_string("targets", "all", "Adapted projections, comma-separated among q, k, v, o, gate, up, "
                               "down (or all).")
_STEPS = flags.DEFINE_integer("steps", 100, "Optimizer steps.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Packed rows per micro-batch (over all devices).", lower_bound=1)
_GRAD_ACCUM = flags.DEFINE_integer("grad_accum", 1, "Micro-batches per optimizer step.", lower_bound=1)
_ROW_LEN = flags.DEFINE_integer("row_len", 512, "Tokens per packed row (longer conversations are cut).",
                                lower_bound=8)
_LR = flags.DEFINE_float("learning_rate", 2e-4, "Peak learning rate (AdamW).", lower_bound=0.0)
_WARMUP = flags.DEFINE_integer("warmup_steps", 10, "Linear warmup steps, then cosine decay.", lower_bound=0)
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.", lower_bound=0.0)
_CLIP = flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clip (0: none).", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the adapter's initialisation, the row order and dropout.")
_AUX = flags.DEFINE_float("router_aux_loss_coef", 0.0, "A mixture-of-experts model's router load-balancing loss, "
                          "this much of it added to the objective (0: none, as transformers without "
                          "output_router_logits; Qwen3-MoE's configs hold 0.001).", lower_bound=0.0)
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.1, "Fraction of packed rows held out for evaluation.",
                                    lower_bound=0.0, upper_bound=0.9)
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 0, "Held-out loss every N steps (and always at the end).",
                                   lower_bound=0)
_SAVE_EVERY = flags.DEFINE_integer("save_every", 50, "Checkpoint every N steps (and at the end).", lower_bound=1)
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Progress line every N steps.", lower_bound=1)
_MESH = flags.DEFINE_string("mesh", None, "Device mesh, axis:size pairs over data, fsdp and tensor (e.g. data:2,"
                            "tensor:4): base weights sharded by the inference rules, rows split over data and fsdp.")


def _conversations():
  from qwenjax import InputError  # pylint: disable=g-import-not-at-top
  from qwenjax.training import data  # pylint: disable=g-import-not-at-top

  if (_REQUESTS.value is None) != (_RESPONSES.value is None):
    raise InputError("--requests and --responses go together (a batch job's input and its output).")
  if not _DATA.value and _REQUESTS.value is None:
    raise InputError("no training data: give --data (chat JSONL) or --requests with --responses.")
  for path in _DATA.value:
    yield from data.conversations(path)
  if _REQUESTS.value is not None:
    yield from data.conversations_from_job(_REQUESTS.value, _RESPONSES.value, finished_only=not _KEEP_TRUNCATED.value)


# What a run's record holds besides its data: the flags that decide what it computes, by flag name.
_RECORDED = (_MODEL, _DTYPE, _QUANTIZE, _TARGETS, _RANK, _ALPHA, _DROPOUT, _STEPS, _BATCH_SIZE, _GRAD_ACCUM, _ROW_LEN,
             _LR, _WARMUP, _WEIGHT_DECAY, _CLIP, _SEED, _EVAL_FRACTION, _AUX)
_RUN_FILE = "run.json"
_RUN_MARKER = "launch.finetune run"
_LOG_FILE = "training_log.jsonl"
_DATA_KEY = "data_sha256"
# What a run writes in --output: found there without a run record, they are another's, and the run refuses.
_RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", _LOG_FILE, "checkpoints")


def main(argv):
  del argv
  from qwenjax import InputError, QwenJaxError, _files  # pylint: disable=g-import-not-at-top  (--help stays fast)

  try:
    output = pathlib.Path(_OUTPUT.value)
    checkpoints = pathlib.Path(_CHECKPOINT_DIR.value or output / "checkpoints").absolute()
    if output.exists() and not output.is_dir():
      raise InputError(f"--output={output}: exists and is not a directory.")
    try:
      output.mkdir(parents=True, exist_ok=True)
      checkpoints.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise InputError(f"--output={output}: cannot create the directory ({e.strerror}).") from None
    with contextlib.ExitStack() as locks:  # one run per output (and per --checkpoint_dir elsewhere)
      locks.enter_context(_files.OwnedLock(_files.lock_path_for(output), f"--output={output}"))
      if os.path.realpath(checkpoints) not in (os.path.realpath(output), os.path.realpath(output / "checkpoints")):
        locks.enter_context(_files.OwnedLock(_files.lock_path_for(checkpoints), f"--checkpoint_dir={checkpoints}"))
      _run(output, checkpoints)
  except QwenJaxError as e:
    _cli.fail(e)


def _settings() -> dict:
  """The recorded flags' values, by flag name; --model as the real path it names (or 'default')."""
  settings = {f"--{flag.name}": flag.value for flag in _RECORDED}
  if os.path.exists(_MODEL.value):
    settings["--model"] = os.path.realpath(_MODEL.value)
  return settings


def _check_run(output: pathlib.Path, checkpoints: pathlib.Path, settings: dict) -> dict | None:
  """The run record in `output` (None: a new run), after checking that it is ours and that `settings` match it.
  InputError, everything untouched, for an output that holds another's adapter, log or checkpoints, or a run
  with other settings."""
  from qwenjax import InputError, _files  # pylint: disable=g-import-not-at-top

  record_file = output / _RUN_FILE
  if not os.path.lexists(record_file):
    found = [name for name in _RUN_FILES if os.path.lexists(output / name)]
    elsewhere = checkpoints != (output / "checkpoints").absolute()
    if not found and elsewhere and checkpoints.is_dir() and any(checkpoints.iterdir()):
      found = [f"--checkpoint_dir={checkpoints}"]
    if found:
      raise InputError(f"--output={output} holds {found[0]} but no run record ({_RUN_FILE}) of launch.finetune; "
                       "refusing to touch it (choose another --output, or move it away).")
    return None
  _files.check_ours(record_file, _RUN_MARKER, f"--output={output}")
  record = _files.read_json(record_file)
  _check_same(output, record, settings)
  return record


def _check_same(output: pathlib.Path, record: dict, settings: dict) -> None:
  """InputError naming each setting (flag) whose value differs from the run's record."""
  from qwenjax import InputError  # pylint: disable=g-import-not-at-top

  differ = []
  defaults = {f"--{flag.name}": flag.default for flag in _RECORDED}  # a flag newer than the record: its default
  for name, mine in settings.items():
    theirs = record.get(name, defaults.get(name))
    if theirs == mine:
      continue
    if name == _DATA_KEY:
      source = "--data" if _DATA.value else "--requests/--responses"
      differ.append(f"{source}: the training rows (sha256 {mine[:16]}) are not those of the run at {output} "
                    f"(sha256 {str(theirs)[:16]})")
    else:
      differ.append(f"{name}: {mine} here, {theirs} in the run at {output}")
  if differ:
    raise InputError(f"--output={output} holds a run with other settings: {'; '.join(differ)}. Rerun with its "
                     "settings to resume it, or choose another --output.")


def _fingerprint(rows) -> str:
  """sha256 of the packed training rows (all of them, held-out ones included): the data as the run sees it."""
  digest = hashlib.sha256()
  for array in dataclasses.astuple(rows):
    digest.update(repr((array.dtype.str, array.shape)).encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


class _Log:
  """training_log.jsonl, appended to (never truncated) one whole line per step as the step ends. A step already in
  the log, re-run after a resume from an older checkpoint, is not logged again: the rerun computes that step
  bit for bit as before, so the log holds each step once, as an uninterrupted run's does."""

  def __init__(self, path: pathlib.Path):
    from qwenjax import InputError, _files  # pylint: disable=g-import-not-at-top

    try:
      self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
      with open(path, "rb") as f:
        old = f.read()
    except OSError as e:
      raise InputError(f"{path}: cannot open the training log ({e.strerror}).") from None
    self.path, self.logged = path, set()
    for line in old.splitlines():
      try:
        step = _files.loads(line).get("step")
      except (ValueError, AttributeError):
        continue  # a line cut by a full disk: left as it is
      if isinstance(step, int):
        self.logged.add(step)
    if old and not old.endswith(b"\n"):
      self._write(b"\n")

  def _write(self, data: bytes) -> None:
    from qwenjax import InputError  # pylint: disable=g-import-not-at-top

    try:
      os.write(self._fd, data)  # one write per line: O_APPEND puts it whole at the end
    except OSError as e:
      raise InputError(f"{self.path}: writing the training log failed ({e.strerror}).") from None

  def append(self, entry: dict) -> None:
    if entry["step"] not in self.logged:
      self._write((json.dumps(entry) + "\n").encode())
      self.logged.add(entry["step"])

  def close(self) -> None:
    os.close(self._fd)


def _run(output: pathlib.Path, checkpoints: pathlib.Path):
  # Orbax logs each save's threads at INFO through absl: keep stderr to this script's progress (a failed save is
  # one error line, which its abandoned threads need not repeat).
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  from qwenjax.checkpoints import orbax_store  # pylint: disable=g-import-not-at-top

  orbax_store.quiet_failed_writes()

  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax import _files  # pylint: disable=g-import-not-at-top
  from qwenjax.checkpoints.peft import save_adapter  # pylint: disable=g-import-not-at-top
  from qwenjax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from qwenjax.training import data  # pylint: disable=g-import-not-at-top
  from qwenjax.training.lora_trainer import LoraTrainer, TrainConfig  # pylint: disable=g-import-not-at-top

  config = TrainConfig(rank=_RANK.value, alpha=_ALPHA.value, dropout=_DROPOUT.value, targets=_TARGETS.value,
                       steps=_STEPS.value, batch_size=_BATCH_SIZE.value, grad_accum=_GRAD_ACCUM.value,
                       learning_rate=_LR.value, warmup_steps=_WARMUP.value, weight_decay=_WEIGHT_DECAY.value,
                       clip_norm=_CLIP.value, seed=_SEED.value, router_aux_loss_coef=_AUX.value).check()
  settings = _settings()
  record = _check_run(output, checkpoints, settings)  # before the long load: another run is refused at once
  mesh = sharding.mesh_from_flags(_MESH.value)
  loaded = qwenjax.load(_MODEL.value, dtype=_DTYPE.value, mesh=mesh,
                        quantize=None if _QUANTIZE.value == "none" else _QUANTIZE.value)
  config.check_model(loaded.model.cfg)  # before the run's record is written
  examples, skipped = [], 0
  for conversation in _conversations():  # a bad line or conversation is reported and skipped; the run goes on
    try:
      if conversation.error is not None:
        raise qwenjax.InputError(conversation.error)
      examples.append(data.encode_chat(loaded.tokenizer, conversation.messages, conversation.tools))
    except qwenjax.InputError as e:
      logging.warning("skipped %s", e if conversation.error else f"{conversation.where}: {e}")
      skipped += 1
  if not examples:
    raise qwenjax.InputError("no usable conversation in the training data.")
  rows, cut = data.pack(examples, _ROW_LEN.value)
  settings[_DATA_KEY] = _fingerprint(rows)
  if record is None:  # written before the first checkpoint: checkpoints never lie in an output without one
    _files.write_json(output / _RUN_FILE, settings, marker=_RUN_MARKER, what=f"--output={output}")
  else:
    _check_same(output, record, {_DATA_KEY: settings[_DATA_KEY]})
  train, held_out = data.split_rows(rows, _EVAL_FRACTION.value, _SEED.value)
  logging.info("%d conversations (%d skipped, %d cut to --row_len=%d) packed into %d rows: %d to train, %d held "
               "out.", len(examples), skipped, cut, _ROW_LEN.value, len(rows), len(train),
               0 if held_out is None else len(held_out))
  trainer = LoraTrainer(loaded.model, config, mesh=mesh)
  manager = trainer.resume(checkpoints, what="--checkpoint_dir")
  if trainer.step:
    logging.info("Resumed from %s at step %d of %d.", checkpoints, trainer.step, config.steps)
  log = _Log(output / _LOG_FILE)
  try:
    start, first, tokens = time.perf_counter(), trainer.step, 0
    for metrics in trainer.fit(train, held_out, manager=manager, save_every=_SAVE_EVERY.value,
                               eval_every=_EVAL_EVERY.value):
      step = metrics["step"] + 1
      tokens += metrics["tokens"]
      log.append({k: metrics[k] for k in ("step", "loss", "aux_loss", "grad_norm", "learning_rate", "eval_loss")
                  if k in metrics})
      _cli.check_interrupted()  # a Ctrl-C that struck inside jax's gc callback stops the run here, this step logged
      if step % _LOG_EVERY.value == 0 or step == config.steps or "eval_loss" in metrics:
        elapsed = time.perf_counter() - start
        eta = elapsed / (step - first) * (config.steps - step)
        line = (f"step {step}/{config.steps}  loss {metrics['loss']:.4f}  lr {metrics['learning_rate']:.2e}  "
                f"{tokens / elapsed:.0f} tokens/s  ETA {eta:.0f} s")
        if "aux_loss" in metrics:
          line += f"  aux_loss {metrics['aux_loss']:.4f}"
        if "eval_loss" in metrics:
          line += f"  eval_loss {metrics['eval_loss']:.4f}"
        logging.info("%s", line)
  except BaseException:
    with contextlib.suppress(Exception):  # the error (or signal) on its way out is the one to report
      manager.close()
    raise
  finally:
    log.close()
  manager.close()
  save_adapter(output, trainer.adapter(), base_model=_MODEL.value)
  print(output)


if __name__ == "__main__":
  app.run(_cli.interruptible(main, "rerun the same command to resume"), flags_parser=_cli.parse_flags)
