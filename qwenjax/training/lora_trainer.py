"""LoRA fine-tuning: the base model frozen (float, or int8 as loaded), one adapter trained with optax.

    trainer = LoraTrainer(model, TrainConfig(rank=16, steps=200), mesh=mesh)
    manager = trainer.resume("out-lora/checkpoints")           # the newest intact checkpoint, if any
    for metrics in trainer.fit(train_rows, eval_rows, manager=manager, save_every=50):
      ...
    save_adapter("out-lora/", trainer.adapter())                                    # PEFT's layout

One jitted step: `grad_accum` micro-batches of `batch_size` packed rows (`qwenjax.training.data.PackedRows`)
scanned, their gradients summed and divided by the number of target tokens of the whole step (the loss is the
mean over every assistant token of the step, however the rows fall into micro-batches), clipped by global norm,
then AdamW on a warmup + cosine schedule. On a mixture-of-experts model, `router_aux_loss_coef` > 0 adds that times
the router's load-balancing loss of each micro-batch (`qwenjax.model.moe.load_balancing_loss` over its segment
tokens, averaged over the micro-batches), as transformers does with `output_router_logits=True`. The adapter and
the optimizer state are donated. On a mesh the base weights are sharded by the same rules as inference
(`qwenjax.parallel.sharding`), rows split over data and fsdp, the adapter replicated.

Which rows a step reads and its dropout key follow from (seed, step) alone: epoch e visits the rows in
permutation e of the seed. A run resumed from an Orbax checkpoint of (adapter, optimizer state, step) therefore
ends with the adapter an uninterrupted run ends with, bit for bit.

Legend: A micro-batches per step, B rows per micro-batch, T row length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from qwenjax import _files
from qwenjax._errors import ConfigError, InputError, first_line
from qwenjax.model.decoder import StepMetadata
from qwenjax.model.lora import Adapter, LoraBank, LoraWeight, init_adapter
from qwenjax.model.moe import load_balancing_loss
from qwenjax.parallel import sharding
from qwenjax.parallel.axes import BATCH, DEFAULT_RULES, ShardingRules
from qwenjax.training.data import PackedRows, segment_tokens


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """rank, alpha, dropout, targets: the adapter (`qwenjax.model.lora`); steps: optimizer steps; batch_size: rows
  per micro-batch (over all devices); grad_accum: micro-batches per step; learning_rate: the peak, reached after
  warmup_steps (linear from 0), then cosine decay to end_lr_fraction of it at `steps`; clip_norm: global gradient
  norm clip (0: none); seed: the adapter's initialisation, the row order and dropout; router_aux_loss_coef: the
  weight of a mixture-of-experts model's load-balancing loss in the objective (0: none, transformers' default,
  whose `output_router_logits` is off; Qwen3-MoE's configs hold 0.001 for when it is on)."""

  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  targets: str = "all"
  steps: int = 100
  batch_size: int = 8
  grad_accum: int = 1
  learning_rate: float = 2e-4
  warmup_steps: int = 10
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  seed: int = 0
  router_aux_loss_coef: float = 0.0

  def check(self) -> TrainConfig:
    for name in ("rank", "steps", "batch_size", "grad_accum"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    if not 0 <= self.dropout < 1:
      raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
    if not self.learning_rate > 0 or self.warmup_steps < 0 or self.clip_norm < 0:
      raise ConfigError("learning_rate must be > 0, warmup_steps and clip_norm >= 0.")
    if not self.router_aux_loss_coef >= 0:
      raise ConfigError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}.")
    return self

  def check_model(self, cfg) -> TrainConfig:
    """ConfigError for settings the model (its `QwenConfig`) cannot take: a load-balancing loss without experts."""
    if self.router_aux_loss_coef and not any(cfg.sparse_layers()):
      raise ConfigError(f"router_aux_loss_coef={self.router_aux_loss_coef}: the model has no mixture-of-experts "
                        "layer, so no router to balance.")
    return self

  def schedule(self) -> optax.Schedule:
    warmup = min(self.warmup_steps, self.steps - 1)
    if warmup == 0:
      return optax.cosine_decay_schedule(self.learning_rate, self.steps, self.end_lr_fraction)
    return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, warmup, self.steps,
                                              self.learning_rate * self.end_lr_fraction)

  def optimizer(self) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(self.clip_norm)] if self.clip_norm > 0 else []
    return optax.chain(*parts, optax.adamw(self.schedule(), weight_decay=self.weight_decay))


def _loss_sums(lora, graphdef, base, tokens, positions, targets, weights, key, aux_scale=None):
  """(objective, (sum of weighted next-token NLL, sum of weights, load-balancing loss)) over rows [B, T] of packed
  segments. aux_scale: None, no auxiliary loss (0 in its place); else a float32 scalar, and the objective is the
  NLL sum plus aux_scale times the router's load-balancing loss over the rows' segment tokens."""
  model = nnx.merge(graphdef, lora, base)
  meta = StepMetadata.packed_training(positions, lora_index=jnp.zeros(tokens.shape[0], jnp.int32), lora_key=key)
  aux = jnp.float32(0)
  if aux_scale is None:
    h, _ = model(tokens, None, meta)  # [B, T, D]
  else:
    h, _, router_logits = model(tokens, None, meta, router_logits=True)  # router_logits [L', B, T, E]
    aux = load_balancing_loss(router_logits, model.cfg.num_experts_per_tok, segment_tokens(positions, targets))
  logits = model.logits(h)  # [B, T, V] float32
  logp = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(
      logits, axis=-1)  # [B, T]
  nll = -jnp.sum(logp * weights)
  objective = nll if aux_scale is None else nll + aux_scale * aux
  return objective, (nll, jnp.sum(weights), aux)


def _value_and_grad(lora, graphdef, base, tokens, positions, targets, weights, key, aux_scale=None):
  """(loss sum, weight sum, load-balancing loss, d objective / d lora) of one micro-batch (see `_loss_sums`)."""
  (_, (loss_sum, n, aux)), grads = jax.value_and_grad(_loss_sums, has_aux=True)(
      lora, graphdef, base, tokens, positions, targets, weights, key, aux_scale)
  return loss_sum, n, aux, grads


def _train_step(graphdef, tx, aux_coef, lora, opt_state, base, batch: PackedRows, key):
  """One optimizer step over micro-batches batch.* [A, B, T]. Returns the new adapter and optimizer state, the
  step's mean loss over its target tokens, its mean load-balancing loss over the micro-batches (0 when aux_coef,
  static, is 0), and the gradient's global norm (before clipping). The objective is the mean loss plus aux_coef
  times the mean load-balancing loss; a micro-batch's gradient is taken of its loss sum plus aux_coef * N / A
  times its load-balancing loss (N the step's target tokens, known before the scan), so that dividing the sum of
  the micro-batches' gradients by N gives the objective's."""
  micro = batch.tokens.shape[0]
  aux_scale = aux_coef * jnp.maximum(jnp.sum(batch.weights), 1.0) / micro if aux_coef else None

  def body(carry, xs):
    grads, total, count, aux_total = carry
    tokens, positions, targets, weights, i = xs
    loss_sum, n, aux, g = _value_and_grad(lora, graphdef, base, tokens, positions, targets, weights,
                                          jax.random.fold_in(key, i), aux_scale)
    return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n, aux_total + aux), None

  xs = (batch.tokens, batch.positions, batch.targets, batch.weights, jnp.arange(micro))
  init = (jax.tree.map(jnp.zeros_like, lora), jnp.float32(0), jnp.float32(0), jnp.float32(0))
  (grads, total, count, aux_total), _ = jax.lax.scan(body, init, xs)
  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, opt_state, lora)
  return optax.apply_updates(lora, updates), opt_state, total / count, aux_total / micro, norm


def _eval_sums(graphdef, lora, base, batch: PackedRows):
  """(loss sum, weight sum) of rows [B, T], no dropout."""
  _, (loss_sum, n, _) = _loss_sums(lora, graphdef, base, batch.tokens, batch.positions, batch.targets,
                                   batch.weights, None)
  return loss_sum, n


class LoraTrainer:
  """Trains one LoRA adapter on a frozen model (see the module docstring). adapter: start from it (default: a
  fresh one from `config`, B zero); mesh, rules: shard the base weights and split rows as inference does."""

  def __init__(self, model, config: TrainConfig, *, adapter: Adapter | None = None,
               mesh: jax.sharding.Mesh | None = None, rules: ShardingRules = DEFAULT_RULES):
    self.config = config.check().check_model(model.cfg)
    self.mesh, self.rules = mesh, rules
    self.like = adapter or init_adapter(model.cfg, config.rank, config.alpha, config.targets, seed=config.seed,
                                        dropout=config.dropout)
    self.like = dataclasses.replace(self.like, dropout=config.dropout)
    model.lora = LoraBank.of(model.cfg, {"train": self.like})
    if mesh is not None:
      sharding.shard_model(model, mesh, rules)
    self.graphdef, self.lora, self.base = nnx.split(model, LoraWeight, ...)
    model.lora = None
    self.tx = config.optimizer()
    self._schedule = config.schedule()
    self.opt_state = self.tx.init(self.lora)
    self.step = 0
    self._step_fn = jax.jit(functools.partial(_train_step, self.graphdef, self.tx, config.router_aux_loss_coef),
                            donate_argnums=(0, 1))
    self._eval_fn = jax.jit(functools.partial(_eval_sums, self.graphdef))

  # ---- data --------------------------------------------------------------------------------------------

  def rows_for_step(self, step: int, num_rows: int) -> np.ndarray:
    """[A, B] row indices of `step`: positions step*A*B ... of the stream of per-epoch permutations (by seed)."""
    c = self.config
    need = c.grad_accum * c.batch_size
    flat = np.arange(step * need, (step + 1) * need)
    epochs = flat // num_rows
    out = np.empty(need, np.int64)
    for e in np.unique(epochs):
      perm = np.random.default_rng([c.seed, int(e)]).permutation(num_rows)
      out[epochs == e] = perm[flat[epochs == e] % num_rows]
    return out.reshape(c.grad_accum, c.batch_size)

  def _place(self, rows: PackedRows) -> PackedRows:
    """Rows [..., B, T] onto the mesh, B split over data and fsdp (one device: as is)."""
    if self.mesh is None:
      return rows
    def put(a):
      axes = (None,) * (a.ndim - 2) + (BATCH, None)
      return jax.device_put(a, sharding.named_sharding(self.mesh, axes, a.shape, self.rules))
    return PackedRows(*(put(a) for a in dataclasses.astuple(rows)))

  # ---- steps ---------------------------------------------------------------------------------------------

  def train_step(self, rows: PackedRows) -> dict[str, float]:
    """Runs step `self.step` on its rows of `rows`; returns its loss, gradient norm, learning rate, segment tokens
    and, with router_aux_loss_coef, its mean load-balancing loss ("aux_loss")."""
    index = self.rows_for_step(self.step, len(rows))
    host = rows.take(index)  # [A, B, T]
    batch = self._place(host)
    key = jax.random.fold_in(jax.random.key(self.config.seed), self.step)
    with sharding.use_mesh(self.mesh, self.rules):
      self.lora, self.opt_state, loss, aux, norm = self._step_fn(self.lora, self.opt_state, self.base, batch, key)
    lr = float(self._schedule(self.step))
    self.step += 1
    real = int(np.count_nonzero(segment_tokens(host.positions, host.targets)))
    metrics = {"loss": float(loss), "grad_norm": float(norm), "learning_rate": lr, "tokens": real}
    if self.config.router_aux_loss_coef:
      metrics["aux_loss"] = float(aux)
    return metrics

  def evaluate(self, rows: PackedRows) -> float:
    """Mean loss over every target token of `rows` (held-out), in batches of batch_size rows."""
    b = self.config.batch_size
    total, count = 0.0, 0.0
    for lo in range(0, len(rows), b):
      index = np.arange(lo, lo + b) % len(rows)
      part = rows.take(index)
      weights = part.weights * (np.arange(lo, lo + b) < len(rows))[:, None]  # wrapped rows count nothing
      part = dataclasses.replace(part, weights=weights.astype(np.float32))
      with sharding.use_mesh(self.mesh, self.rules):
        s, n = self._eval_fn(self.lora, self.base, self._place(part))
      total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)

  def adapter(self) -> Adapter:
    """The trained adapter on the host (PEFT-savable: `qwenjax.checkpoints.peft.save_adapter`)."""
    model = nnx.merge(self.graphdef, self.lora, self.base)
    return model.lora.adapter(0, like=self.like)

  # ---- checkpoints ------------------------------------------------------------------------------------------

  def state(self) -> dict:
    return {"lora": nnx.to_pure_dict(self.lora), "opt_state": self.opt_state, "step": np.array(self.step, np.int64)}

  def save(self, manager: ocp.CheckpointManager) -> None:
    """Saves checkpoint `self.step`, then its digest (`<step>.sha256.json` beside it: each file's sha256), which
    `resume` checks before Orbax reads a byte; digests of the steps Orbax has since deleted are removed.
    InputError naming the step if the save fails (a full disk)."""
    directory = pathlib.Path(manager.directory)
    try:
      manager.save(self.step, args=ocp.args.StandardSave(self.state()))
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (tensorstore's errors are ValueErrors and others)
      raise InputError(f"checkpoint step {self.step} in {directory}: saving failed ({first_line(e)[:300]}).") from None
    _files.write_json(_digest_path(directory, self.step), {"files": _digests(directory / str(self.step))},
                      marker=_DIGEST_MARKER)
    kept = {str(step) for step in manager.all_steps()}
    for digest in directory.glob(f"*{_DIGEST_SUFFIX}"):
      if digest.name.removesuffix(_DIGEST_SUFFIX) not in kept:
        _files.remove_if_ours(digest, _DIGEST_MARKER)

  def resume(self, directory: str | os.PathLike[str], *, what: str = "checkpoints",
             max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager on `directory` (created if missing), with this trainer restored from its newest
    intact checkpoint (none: the fresh state). A step whose files differ from the digest `save` wrote (garbage
    data, a truncated manifest or metadata, an empty step directory), or that Orbax cannot restore, is renamed
    `<step>.unreadable`, out of Orbax's sight (so that the step is saved anew), with a warning naming it, and the
    step before it is tried. InputError, naming `what`, if `directory` is not a directory."""
    directory = pathlib.Path(directory).absolute()
    if os.path.lexists(directory) and not directory.is_dir():
      raise InputError(f"{what} {directory}: exists and is not a directory.")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    while True:
      manager = ocp.CheckpointManager(directory, options=options)
      steps = sorted(manager.all_steps(), reverse=True)
      if not steps:
        return manager
      step_dir = directory / str(steps[0])
      try:
        _check_digest(directory, steps[0])  # Orbax, handed damaged files, prints tracebacks from its threads
        restored = manager.restore(steps[0], args=ocp.args.StandardRestore(self.state()))
        if int(restored["step"]) != steps[0]:
          raise ValueError(f"it holds step {int(restored['step'])}")
      except Exception as e:  # pylint: disable=broad-except  (Orbax and tensorstore raise many types)
        manager.close()
        reason = "an empty directory" if not any(step_dir.iterdir()) else first_line(e)[:200]
        aside = _set_aside(step_dir)
        _files.remove_if_ours(_digest_path(directory, steps[0]), _DIGEST_MARKER)
        then = f"trying step {steps[1]}" if len(steps) > 1 else "no older one: training starts afresh"
        logging.warning("checkpoint step %d in %s is unreadable (%s); set it aside as %s; %s.", steps[0], directory,
                        reason, aside, then)
        continue
      nnx.replace_by_pure_dict(self.lora, restored["lora"])
      self.opt_state = restored["opt_state"]
      self.step = steps[0]
      return manager

  def fit(self, train: PackedRows, held_out: PackedRows | None = None, *, manager: ocp.CheckpointManager | None = None,
          save_every: int = 0, eval_every: int = 0) -> Iterator[dict[str, float]]:
    """Runs steps from `self.step` (after `resume`, the checkpoint's) to config.steps, yielding each step's
    metrics (with "eval_loss" every eval_every steps and at the end, on `held_out`) and saving a checkpoint to
    `manager` every save_every steps and at the end."""
    while self.step < self.config.steps:
      start = time.perf_counter()
      metrics = {"step": self.step, **self.train_step(train)}
      metrics["seconds"] = time.perf_counter() - start
      last = self.step == self.config.steps
      if held_out is not None and ((eval_every and self.step % eval_every == 0) or last):
        metrics["eval_loss"] = self.evaluate(held_out)
      if manager is not None and ((save_every and self.step % save_every == 0) or last):
        self.save(manager)
      yield metrics


_DIGEST_SUFFIX = ".sha256.json"
_DIGEST_MARKER = "finetune checkpoint digest"


def _digest_path(directory: pathlib.Path, step: int) -> pathlib.Path:
  return directory / f"{step}{_DIGEST_SUFFIX}"  # not a step name: Orbax passes it by


def _digests(step_dir: pathlib.Path) -> dict[str, str]:
  """sha256 of each file under a step directory, by relative path."""
  return {str(f.relative_to(step_dir)): hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(step_dir.rglob("*")) if f.is_file()}


def _check_digest(directory: pathlib.Path, step: int) -> None:
  """ValueError naming the first file of checkpoint `step` that differs from (or is missing in) its digest."""
  path = _digest_path(directory, step)
  if not _files.is_marked(path, _DIGEST_MARKER):
    raise ValueError(f"no digest {path.name}: its save did not finish")
  want, have = _files.read_json(path)["files"], _digests(directory / str(step))
  for name in sorted(want.keys() | have.keys()):
    if want.get(name) != have.get(name):
      problem = "missing" if name not in have else "not in its digest" if name not in want else "damaged"
      raise ValueError(f"{name} is {problem}")


def _set_aside(step_dir: pathlib.Path) -> pathlib.Path:
  """Renames an unreadable step directory to `<step>.unreadable` (`.unreadable-2` ... if taken)."""
  aside, n = step_dir.with_name(f"{step_dir.name}.unreadable"), 1
  while aside.exists():
    n += 1
    aside = step_dir.with_name(f"{step_dir.name}.unreadable-{n}")
  step_dir.rename(aside)
  return aside
