"""Per-request sampling over a fixed batch of decode slots: validated parameters, per-slot arrays, one jitted step.

    arrays = sampling.pack([SamplingParams(temperature=0.7, top_p=0.9, seed=1), None])  # slot 1 idle
    tokens, logprobs = jax.jit(sampling.sample, static_argnames="needs")(
        logits, arrays, step, prompt_mask, output_counts, needs=arrays.needs)
    output_counts = sampling.update_counts(output_counts, tokens, active)

Each slot carries its own settings. `sample` applies, per slot and in this order (vLLM's order; transformers
runs its logits processors, then its warpers, in the same order):

  1. penalties, on the raw logits l. Repetition (transformers' and vLLM's CTRL rule), over every token that is in
     the prompt or was generated: l / r where l > 0, l * r otherwise. Then OpenAI's presence and frequency
     penalties, over generated tokens only: l - presence * (count > 0) - frequency * count.
  2. temperature: greedy (argmax of the penalised logits; the lowest id wins a tie) where temperature is 0, else
     z = l / temperature. Temperatures below 1e-5 count as 0 (vLLM's rule), which keeps z finite.
  3. top-k: keep z >= the k-th largest z. Every token tied with the k-th is kept, as in transformers'
     TopKLogitsWarper and vLLM, so more than k tokens can survive a tie.
  4. top-p: p = softmax(z) over what top-k kept; keep the smallest set of most likely tokens whose mass reaches
     top_p (>=), at least one token. Tokens tied with the last one kept are kept too (transformers and vLLM cut a
     tie by their sort's order, which is arbitrary), so the result never depends on token ids.
  5. min-p: keep p >= min_p * max(p). The ratio does not change when top-k/top-p renormalise, so this equals
     transformers' MinPLogitsWarper applied after them.
  6. draw from softmax(z) over the kept tokens, with one uniform number per slot and the inverse CDF.

The log-probability reported is log_softmax of the raw float32 logits at the chosen token, whatever the filters.

Randomness: slot b draws with fold_in(fold_in(key(seed), sample_index), step), so a request's tokens depend only
on its own seed, which of its n samples it is, and the index of the token; not on the batch or the slot.

Cost (V = 151,936 on XLA:CPU): a sort over [B, V] takes seconds at B = 32, so nothing here sorts the vocabulary.
`SamplingNeeds`, a static argument, drops unused stages: an all-greedy batch without penalties is one argmax and
one logsumexp. Top-k and top-p use `lax.top_k` of the _FAST_K largest z; a slot whose k, or whose top-p set,
does not fit in those falls back to an exact bisection over the float32 bit patterns (32 passes over [B, V]),
and only then (a `lax.cond`).

Legend:
  B decode slots (batch)   V vocabulary   K candidates from lax.top_k (_FAST_K)
  N vocabulary blocks      C tokens per block (_BLOCK) for the inverse-CDF draw
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax._errors import InputError

_FAST_K = 256  # top-k candidates examined before falling back to bisection
_BLOCK = 128  # tokens per block of the inverse-CDF draw (151,936 = 1,187 * 128)
_MIN_TEMPERATURE = 1e-5  # below this a slot decodes greedily, as in vLLM
_MAX_SEED = 2**32


# --- Per-request parameters ---------------------------------------------------------------------------------


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded. The defaults decode greedily with no filter and no penalty.

  max_tokens: tokens to generate at most (>= 1).
  temperature: 0 is greedy; otherwise logits are divided by it (>= 0).
  top_k: keep the k most likely tokens (ties with the k-th included); 0 disables it.
  top_p: keep the smallest set of most likely tokens whose probability reaches top_p; 1 disables it.
  min_p: keep tokens at least min_p times as likely as the most likely one; 0 disables it.
  repetition_penalty: CTRL / transformers rule over prompt and generated tokens; 1 disables it.
  presence_penalty, frequency_penalty: OpenAI's, over generated tokens only, in [-2, 2].
  stop: strings that end the completion (not included in it). A single string is accepted.
  stop_token_ids: token ids that end the completion, in addition to the end-of-sequence tokens.
  ignore_eos: keep generating past end-of-sequence tokens.
  n: completions to generate for the prompt.
  seed: seeds the request's random stream, in [0, 2**32); None lets the engine draw one.
  logprobs: report the log-probability of each chosen token under the model's raw distribution.
  """

  max_tokens: int = 256
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  n: int = 1
  seed: int | None = None
  logprobs: bool = False

  def __post_init__(self):
    def fix(name, value):
      object.__setattr__(self, name, value)

    for name in ("max_tokens", "n"):
      value = getattr(self, name)
      if not (_is_int(value) and value >= 1):
        raise InputError(f"{name} must be an integer >= 1, got {value!r}.")
      fix(name, int(value))
    if not (_is_int(self.top_k) and self.top_k >= 0):
      raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}.")
    fix("top_k", int(self.top_k))

    floats = {  # name -> (test, what the message says it must be)
        "temperature": (lambda x: x >= 0, "a finite number >= 0"),
        "top_p": (lambda x: 0 < x <= 1, "a number in (0, 1]"),
        "min_p": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
        "repetition_penalty": (lambda x: x > 0, "a finite number > 0"),
        "presence_penalty": (lambda x: -2 <= x <= 2, "a number in [-2, 2]"),
        "frequency_penalty": (lambda x: -2 <= x <= 2, "a number in [-2, 2]"),
    }
    for name, (ok, must) in floats.items():
      value = getattr(self, name)
      if not (_is_real(value) and ok(value)):
        raise InputError(f"{name} must be {must}, got {value!r}.")
      fix(name, float(value))

    stop = (self.stop,) if isinstance(self.stop, str) else self.stop
    if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
      raise InputError(f"stop must be a string or a list of strings, got {self.stop!r}.")
    if any(not s for s in stop):
      raise InputError(f"stop must not contain an empty string, got {self.stop!r}.")
    fix("stop", tuple(stop))

    ids = self.stop_token_ids
    if not (isinstance(ids, (list, tuple)) and all(_is_int(i) and i >= 0 for i in ids)):
      raise InputError(f"stop_token_ids must be a list of integers >= 0, got {ids!r}.")
    fix("stop_token_ids", tuple(int(i) for i in ids))

    for name in ("ignore_eos", "logprobs"):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be true or false, got {value!r}.")
      fix(name, bool(value))

    if self.seed is not None:
      if not (_is_int(self.seed) and 0 <= self.seed < _MAX_SEED):
        raise InputError(f"seed must be null or an integer in [0, 2**32), got {self.seed!r}.")
      fix("seed", int(self.seed))

  @property
  def greedy(self) -> bool:
    return self.temperature < _MIN_TEMPERATURE

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], base: SamplingParams | None = None) -> SamplingParams:
    """Parameters from a request's JSON object (OpenAI names), over `base` (default: the defaults).

    A null value keeps base's value (OpenAI clients send nulls for unset fields), except for seed, where null
    means "draw one".
    """
    if not isinstance(d, Mapping):
      raise InputError(f"sampling parameters must be a JSON object, got {type(d).__name__}.")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
      if key not in names:
        raise InputError(f"unknown sampling parameter {key!r}; expected one of {', '.join(names)}.")
    updates = {k: v for k, v in d.items() if v is not None or k == "seed"}
    return dataclasses.replace(base if base is not None else cls(), **updates)


# --- Per-slot arrays ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingNeeds:
  """Which stages a batch uses: a hashable, static jit argument. The default is greedy without penalties."""

  sampling: bool = False  # some slot has temperature > 0
  top_k: bool = False  # some sampling slot has top_k > 0
  top_p: bool = False  # some sampling slot has top_p < 1
  min_p: bool = False  # some sampling slot has min_p > 0
  penalties: bool = False  # some slot has a repetition, presence or frequency penalty


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
  """Every slot's sampling settings, [B] each; a pytree. Idle slots and greedy slots hold neutral filters."""

  temperature: Any  # [B] float32; 0 = greedy
  top_k: Any  # [B] int32; 0 = off
  top_p: Any  # [B] float32; 1 = off
  min_p: Any  # [B] float32; 0 = off
  repetition_penalty: Any  # [B] float32; 1 = off
  presence_penalty: Any  # [B] float32
  frequency_penalty: Any  # [B] float32
  seed: Any  # [B] uint32
  sample_index: Any  # [B] int32; which of the request's n samples the slot decodes

  @property
  def needs(self) -> SamplingNeeds:
    """The stages these (concrete, host-side) settings use."""
    t, k, p, m = (np.asarray(a) for a in (self.temperature, self.top_k, self.top_p, self.min_p))
    sampling = t > 0
    return SamplingNeeds(
        sampling=bool(sampling.any()),
        top_k=bool((sampling & (k > 0)).any()),
        top_p=bool((sampling & (p < 1)).any()),
        min_p=bool((sampling & (m > 0)).any()),
        penalties=bool((np.asarray(self.repetition_penalty) != 1).any()
                       or (np.asarray(self.presence_penalty) != 0).any()
                       or (np.asarray(self.frequency_penalty) != 0).any()),
    )


def pack(params: Sequence[SamplingParams | None], sample_indices: Sequence[int] | None = None,
         seeds: Sequence[int | None] | None = None) -> SamplingArrays:
  """Numpy SamplingArrays for a batch of slots; None is an idle slot.

  sample_indices: which of its request's n samples each slot decodes (default 0).
  seeds: per-slot seeds that override params.seed (the engine resolves seed=None here); None entries fall back.
  A sampling slot must end up with a seed; greedy and idle slots use 0.
  """
  b = len(params)
  for name, given in (("sample_indices", sample_indices), ("seeds", seeds)):
    if given is not None and len(given) != b:
      raise ValueError(f"{name} has {len(given)} entries for {b} slots.")
  cols = {f.name: [] for f in dataclasses.fields(SamplingArrays)}
  for i, p in enumerate(params):
    live = p is not None and not p.greedy
    seed = seeds[i] if seeds is not None and seeds[i] is not None else (p.seed if p is not None else None)
    if seed is None:
      if live:
        raise ValueError(f"slot {i} samples (temperature {p.temperature}) but has no seed; pass seeds=.")
      seed = 0
    cols["temperature"].append(p.temperature if live else 0.0)
    cols["top_k"].append(p.top_k if live else 0)
    cols["top_p"].append(p.top_p if live else 1.0)
    cols["min_p"].append(p.min_p if live else 0.0)
    cols["repetition_penalty"].append(p.repetition_penalty if p is not None else 1.0)
    cols["presence_penalty"].append(p.presence_penalty if p is not None else 0.0)
    cols["frequency_penalty"].append(p.frequency_penalty if p is not None else 0.0)
    cols["seed"].append(seed)
    cols["sample_index"].append(sample_indices[i] if sample_indices is not None else 0)
  dtypes = dict(top_k=np.int32, seed=np.uint32, sample_index=np.int32)
  return SamplingArrays(**{k: np.asarray(v, dtypes.get(k, np.float32)) for k, v in cols.items()})


def prompt_mask_for(token_ids_list: Sequence[Sequence[int] | None], vocab: int, batch: int | None = None,
                    ) -> np.ndarray:
  """[batch, vocab] bool: which tokens each slot's prompt holds (None: an idle slot), for repetition_penalty."""
  batch = len(token_ids_list) if batch is None else batch
  if len(token_ids_list) > batch:
    raise ValueError(f"{len(token_ids_list)} prompts do not fit in {batch} slots.")
  mask = np.zeros((batch, vocab), bool)
  for i, ids in enumerate(token_ids_list):
    if ids is None or len(ids) == 0:
      continue
    ids = np.asarray(ids, np.int64)
    if ids.min() < 0 or ids.max() >= vocab:
      raise InputError(f"prompt {i} holds token id {int(ids.max() if ids.max() >= vocab else ids.min())}, "
                       f"outside the vocabulary of {vocab}.")
    mask[i, ids] = True
  return mask


def update_counts(output_counts: jax.Array, tokens: jax.Array, active: jax.Array) -> jax.Array:
  """output_counts [B, V] int32 plus one at (b, tokens[b]) for each active slot b; a [B] scatter-add."""
  rows = jnp.arange(output_counts.shape[0])
  return output_counts.at[rows, tokens].add(jnp.asarray(active).astype(output_counts.dtype))


# --- The jitted step ----------------------------------------------------------------------------------------


def apply_penalties(logits: jax.Array, prompt_mask: jax.Array, output_counts: jax.Array,
                    repetition_penalty: jax.Array, presence_penalty: jax.Array,
                    frequency_penalty: jax.Array) -> jax.Array:
  """Penalised logits [B, V]: repetition over prompt and generated tokens, then presence and frequency.

  logits [B, V] float32; prompt_mask [B, V] bool; output_counts [B, V] int32; the penalties [B].
  Neutral values (1, 0, 0) leave a row bit-for-bit unchanged.
  """
  generated = output_counts > 0  # [B, V]
  r = repetition_penalty[:, None]
  seen = prompt_mask | generated
  out = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
  out = out - presence_penalty[:, None] * generated.astype(jnp.float32)
  return out - frequency_penalty[:, None] * output_counts.astype(jnp.float32)


def _sort_key(x: jax.Array) -> jax.Array:
  """int32 keys that order like float32 x (-0 just below +0): comparisons on them equal comparisons on x."""
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _bisect(keys: jax.Array, holds) -> jax.Array:
  """Per row, the largest int32 t with holds(t) [B] true, given that holds is monotone (true up to t, false above).

  keys [B, V]: holds(min key) is assumed true and holds(max key + 1) is false. 32 halvings cover int32.
  """
  lo = jnp.min(keys, axis=-1)  # [B]
  hi = jnp.max(keys, axis=-1) + 1

  def body(_, bounds):
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
    ok = holds(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return lo


def _top_p_target(top_p: jax.Array, mass: jax.Array) -> jax.Array:
  return top_p * mass  # [B]: the unnormalised mass the kept set must reach


def _filter_cutoffs(z, e, top_k, top_p, needs: SamplingNeeds, fast_k: int):
  """Per-row int32 key cutoffs (keep keys >= cutoff) for top-k and top-p; -2**31 where a filter is off.

  z [B, V] scaled logits; e [B, V] = exp(z - max z). Rows whose k, or top-p set, lies within the fast_k largest
  z are solved from lax.top_k; the batch falls back to bisection (a lax.cond) only if some row does not fit, and
  then only those rows take its answer, so a row's result does not depend on its batch mates.
  """
  b, v = z.shape
  keys = _sort_key(z)  # [B, V]
  off = jnp.full((b,), jnp.iinfo(jnp.int32).min, jnp.int32)
  k = jnp.minimum(top_k, fast_k)
  use_k = (top_k > 0) & (top_k < v) if needs.top_k else jnp.zeros((b,), bool)
  use_p = top_p < 1 if needs.top_p else jnp.zeros((b,), bool)

  # The barrier keeps XLA from folding the slicing below into a full sort of [B, V] (it did: 100x slower).
  vals = jax.lax.optimization_barrier(jax.lax.top_k(z, fast_k)[0])  # [B, K] descending
  val_keys = _sort_key(vals)  # [B, K]
  rank = jnp.arange(fast_k)
  k_fits = top_k <= fast_k
  cut_k_fast = jnp.where(use_k, jnp.take_along_axis(val_keys, jnp.maximum(k - 1, 0)[:, None], -1)[:, 0], off)

  def top_p_fast(cut_k):
    kept = keys >= cut_k[:, None]
    mass = jnp.sum(jnp.where(kept, e, 0.0), axis=-1)  # [B]
    ev = jnp.where(val_keys >= cut_k[:, None], jnp.exp(vals - vals[:, :1]), 0.0)  # [B, K]
    first = jnp.sum(jnp.cumsum(ev, axis=-1) < _top_p_target(top_p, mass)[:, None], axis=-1)  # [B]
    fits = first < fast_k
    cut = jnp.take_along_axis(val_keys, jnp.minimum(first, fast_k - 1)[:, None], -1)[:, 0]
    return jnp.where(use_p, cut, off), fits, kept, mass

  def exact(cut_k_fast, cut_p_fast, p_fits):
    cut_k = cut_k_fast
    if needs.top_k:
      kth = _bisect(keys, lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= top_k)
      cut_k = jnp.where(use_k & ~k_fits, kth, cut_k_fast)
    cut_p = off
    if needs.top_p:
      redo_p, redo_fits, kept, mass = top_p_fast(cut_k)
      moved = cut_k != cut_k_fast  # rows whose top-k cut the bisection changed; the others keep their answer
      cut_p_fast, p_fits = jnp.where(moved, redo_p, cut_p_fast), jnp.where(moved, redo_fits, p_fits)
      w = jnp.where(kept, e, 0.0)  # [B, V]
      target = _top_p_target(top_p, mass)
      nucleus = _bisect(keys, lambda t: jnp.sum(jnp.where(keys >= t[:, None], w, 0.0), axis=-1) >= target)
      cut_p = jnp.where(use_p & ~p_fits, nucleus, cut_p_fast)
    return cut_k, cut_p

  fits = jnp.all(~use_k | k_fits)
  cut_p_fast, p_fits = off, jnp.ones((b,), bool)
  if needs.top_p:
    cut_p_fast, p_fits, _, _ = top_p_fast(cut_k_fast)
    fits &= jnp.all(~use_p | p_fits)
  return jax.lax.cond(fits, lambda *a: (a[0], a[1]), exact, cut_k_fast, cut_p_fast, p_fits)


def _draw(w: jax.Array, u: jax.Array) -> jax.Array:
  """Per row, the token i with cumulative weight w[:i] <= u * sum(w) < w[:i+1]: inverse-CDF sampling.

  w [B, V] >= 0 with a positive entry in each row; u [B] uniform in [0, 1). Blocked so that only [B, N] and one
  [B, C] block are scanned. A token of weight 0 is never chosen, whatever the rounding.
  """
  b, v = w.shape
  n = -(-v // _BLOCK)
  blocks = jnp.pad(w, ((0, 0), (0, n * _BLOCK - v))).reshape(b, n, _BLOCK)  # [B, N, C]
  block_mass = jnp.sum(blocks, axis=-1)  # [B, N]
  cum = jnp.cumsum(block_mass, axis=-1)  # [B, N]
  target = u * cum[:, -1]  # [B]

  def last_positive(x):  # [B, X] -> [B], the index of the last entry > 0
    return x.shape[-1] - 1 - jnp.argmax(x[:, ::-1] > 0, axis=-1)

  blk = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), last_positive(block_mass))  # [B]
  before = jnp.where(blk > 0, jnp.take_along_axis(cum, jnp.maximum(blk - 1, 0)[:, None], -1)[:, 0], 0.0)
  inner = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]  # [B, C]
  j = jnp.sum(jnp.cumsum(inner, axis=-1) <= (target - before)[:, None], axis=-1)
  return (blk * _BLOCK + jnp.minimum(j, last_positive(inner))).astype(jnp.int32)


def _slot_uniforms(seed, sample_index, step) -> jax.Array:
  """[B] uniforms in [0, 1), slot b's from fold_in(fold_in(key(seed[b]), sample_index[b]), step[b])."""

  def one(s, i, t):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), t)
    return jax.random.uniform(key, (), jnp.float32)

  return jax.vmap(one)(seed, sample_index, step)


def sample(logits: jax.Array, arrays: SamplingArrays, step: jax.Array, prompt_mask: jax.Array | None,
           output_counts: jax.Array | None, needs: SamplingNeeds, *, fast_k: int = _FAST_K,
           ) -> tuple[jax.Array, jax.Array]:
  """Next tokens [B] int32 and their log-probabilities [B] float32 under the raw logits. Jittable, needs static.

  logits [B, V] raw model logits; step [B] int32, the index of the token each slot is generating;
  prompt_mask [B, V] bool and output_counts [B, V] int32, read only if needs.penalties (else may be None).
  fast_k: how many top candidates top-k / top-p examine before bisecting (static; tests lower it).
  """
  logits = logits.astype(jnp.float32)
  b, v = logits.shape
  a = arrays
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B]
  pen = logits
  if needs.penalties:
    pen = apply_penalties(logits, prompt_mask, output_counts, a.repetition_penalty, a.presence_penalty,
                          a.frequency_penalty)
  tokens = jnp.argmax(pen, axis=-1).astype(jnp.int32)  # [B] greedy
  if needs.sampling:
    live = a.temperature > 0  # [B]
    z = pen / jnp.where(live, a.temperature, 1.0)[:, None]  # [B, V]
    e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))  # [B, V], 1 at the argmax
    keep = None
    if needs.top_k or needs.top_p:
      fast_k = min(fast_k, v)
      top_k, top_p = jnp.where(live, a.top_k, 0), jnp.where(live, a.top_p, 1.0)  # greedy slots: no filter
      cut_k, cut_p = _filter_cutoffs(z, e, top_k, top_p, needs, fast_k)
      keep = _sort_key(z) >= jnp.maximum(cut_k, cut_p)[:, None]
    if needs.min_p:
      by_min_p = e >= a.min_p[:, None]
      keep = by_min_p if keep is None else keep & by_min_p
    w = e if keep is None else jnp.where(keep, e, 0.0)
    drawn = _draw(w, _slot_uniforms(a.seed, a.sample_index, jnp.broadcast_to(jnp.asarray(step, jnp.int32), (b,))))
    tokens = jnp.where(live, drawn, tokens)
  logprobs = jnp.take_along_axis(logits, tokens[:, None], -1)[:, 0] - lse
  return tokens, logprobs
