"""Per-request sampling over a fixed batch of decode slots: per-slot arrays and one jitted step.

    arrays = sampling.pack([SamplingParams(temperature=0.7, top_p=0.9, seed=1), None])  # slot 1 idle
    tokens, logprobs = jax.jit(sampling.sample, static_argnames="needs")(
        logits, arrays, step, prompt_mask, output_counts, needs=arrays.needs)
    output_counts = sampling.update_counts(output_counts, tokens, active)

Each slot carries its own settings: a request's `SamplingParams`, validated on the host without jax in
`qwenjax.engine.sampling_params` (and importable from here too). `sample` applies, per slot and in this order
(transformers' order: its repetition processor, then the temperature, top-k, top-p and min-p warpers; vLLM v1
applies min-p before top-k/top-p, which gives a different result only when top_p and min_p are both set):

  1. penalties, on the raw logits l. Repetition (transformers' and vLLM's CTRL rule), over every token that is in
     the prompt or was generated: l / r where l > 0, l * r otherwise. Then OpenAI's presence and frequency
     penalties, over generated tokens only: l - presence * (count > 0) - frequency * count. A constrained slot's
     forbidden tokens (its row of a token bitmask, `qwenjax.engine.constraints`) then become -inf.
  2. temperature: greedy (argmax of the penalised logits; the lowest id wins a tie) where temperature is 0, else
     z = l / temperature. Temperatures below 1e-5 count as 0 (vLLM's rule), which keeps z finite.
  3. top-k: keep the tokens whose z is at least the k-th largest. Every token tied with the k-th is kept, as in
     transformers' TopKLogitsWarper and vLLM, so a tie can keep more than k.
  4. top-p: p = softmax(z) over what top-k kept; keep the smallest set of most likely tokens whose mass reaches
     top_p (>=), so always at least one. Tokens whose logit ties with the last one kept are kept too
     (transformers and vLLM split such a tie by their sort's order, which is arbitrary).
  5. min-p: keep p >= min_p * max(p). The ratio does not change when top-k/top-p renormalise, so this equals
     transformers' MinPLogitsWarper applied after them.
  6. draw from softmax(z) over the kept tokens, with one uniform number per slot and the inverse CDF.

Top-k and top-p are thresholds on the penalised logits (dividing by a temperature > 0 keeps their order), so a
filter's result never depends on token ids. The most likely token always survives every filter.

The log-probability reported is log_softmax of the raw float32 logits at the chosen token, whatever the filters.

Randomness: slot b draws with fold_in(fold_in(key(seed), sample_index), step), so a request's tokens depend only
on its own seed, which of its n samples it is, and the index of the token; not on the batch or the slot. A
sampled draft's proposals (`draft_sample`) and their rejection sampling (`speculative_sample`: the acceptance test
and the draw from the residual max(p - q, 0)) take streams of their own, fold_in(stream) of the token's key.

Cost (V = 151,936 on a 2-core XLA:CPU). A sort of [32, V] takes 2.4 s, so nothing here sorts the vocabulary, and
beyond the penalised logits no [B, V] array is written on the common path (each costs ~10 ms at B = 32).
`SamplingNeeds`, a static argument, drops the unused stages: an all-greedy batch without penalties is a blocked
argmax and a logsumexp. Top-k and top-p look at the _FAST_K largest logits (`lax.top_k` over the blocks with the
largest maxima); a slot whose k or top-p set reaches beyond them sends the batch (a `lax.cond`) to an exact
bisection over float32 bit patterns, 32 passes over [V] per slot.

Legend:
  B decode slots (batch)   V vocabulary   K candidates from lax.top_k (_FAST_K)
  N vocabulary blocks      C tokens per block (_BLOCK) for the inverse-CDF draw
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.engine.sampling_params import TOP_LOGPROBS, SamplingParams

_FAST_K = 256  # top-k candidates examined before falling back to bisection
_BLOCK = 128  # tokens per block of the inverse-CDF draw (151,936 = 1,187 * 128)
_BISECT_ROWS = 4  # rows a bisection takes at a time: 2.4 MB at V = 151,936, fastest measured (1, 2, 4, 8)


# --- Per-slot arrays ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingNeeds:
  """Which stages a batch uses: a hashable, static jit argument. The default is greedy without penalties."""

  sampling: bool = False  # some slot has temperature > 0
  top_k: bool = False  # some sampling slot has top_k > 0
  top_p: bool = False  # some sampling slot has top_p < 1
  min_p: bool = False  # some sampling slot has min_p > 0
  penalties: bool = False  # some slot has a repetition, presence or frequency penalty
  masked: bool = False  # some slot is constrained: `sample` takes a token bitmask (`qwenjax.engine.constraints`)
  top_logprobs: bool = False  # some slot reports top log-probabilities (`with_top_logprobs`)


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


def _blocks(x: jax.Array, fill) -> jax.Array:
  """[B, V] -> [B, N, C], the last block padded with fill."""
  b, v = x.shape
  n = -(-v // _BLOCK)
  return jnp.pad(x, ((0, 0), (0, n * _BLOCK - v)), constant_values=fill).reshape(b, n, _BLOCK)


def _argmax(x: jax.Array) -> jax.Array:
  """[B] int32: the first index of each row's maximum, like jnp.argmax (which is 5x slower on XLA:CPU at B=32).

  Block maxima first, then a search of the one block that holds the first maximum.
  """
  blocks = _blocks(x, -jnp.inf)  # [B, N, C]
  blk = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)  # [B]
  inner = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]  # [B, C]
  return (blk * _BLOCK + jnp.argmax(inner, axis=-1)).astype(jnp.int32)


def greedy(logits: jax.Array) -> jax.Array:
  """[B] int32: each row's first maximum of logits [B, V] (argmax; the lowest id wins a tie), blocked."""
  return _argmax(logits.astype(jnp.float32))


def _top_values(x: jax.Array, k: int) -> jax.Array:
  """[B, k]: each row's k largest values, descending; equal to lax.top_k(x, k)[0], in a quarter of the time.

  The k largest lie in the k blocks with the largest maxima (a token outside them has k block maxima at least
  as large above it), so lax.top_k runs over those k * C candidates instead of all V.
  """
  blocks = _blocks(x, -jnp.inf)  # [B, N, C]
  b, n, _ = blocks.shape
  if k >= n:
    return jax.lax.top_k(x, k)[0]
  _, best = jax.lax.top_k(jnp.max(blocks, axis=-1), k)  # [B, k] block ids
  candidates = jnp.take_along_axis(blocks, best[:, :, None], axis=1).reshape(b, k * _BLOCK)  # [B, k * C]
  return jax.lax.top_k(candidates, k)[0]


def _sort_key(x: jax.Array) -> jax.Array:
  """int32 keys that order like float32 x (-0 just below +0). Its own inverse, up to the bitcast."""
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _from_key(k: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k), jnp.float32)


def _bisect(holds, lo: jax.Array, hi: jax.Array, *rows: jax.Array) -> jax.Array:
  """[B] int32: per row, the largest t in [lo, hi) with holds(t, *row) true.

  holds(t, *row) (t a scalar, row one row of each of rows) must be monotone: true at lo, false at hi. 32 halvings
  cover int32. Rows go _BISECT_ROWS at a time (lax.map) so that a chunk stays in cache through the halvings.
  """

  def solve(args):
    lo, hi, *row = args

    def halve(_, bounds):
      lo, hi = bounds
      mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
      ok = holds(mid, *row)
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]

  return jax.lax.map(solve, (lo, hi, *rows), batch_size=_BISECT_ROWS)


def _kth_largest(x: jax.Array, k: jax.Array) -> jax.Array:
  """[B] the k-th largest value of each row of x [B, V] (counting repeats), by bisection; 1 <= k <= V."""
  lo = _sort_key(jnp.min(x, axis=-1))
  hi = _sort_key(jnp.max(x, axis=-1)) + 1
  return _from_key(_bisect(lambda t, row, k: jnp.sum(_sort_key(row) >= t) >= k, lo, hi, x, k))


def _nucleus_floor(w: jax.Array, target: jax.Array) -> jax.Array:
  """[B]: the largest value c of each row of weights w [B, V] in [0, 1] with sum(w[w >= c]) >= target."""
  lo = jnp.zeros(target.shape, jnp.int32)  # non-negative floats order like their bits
  hi = jnp.full(target.shape, jax.lax.bitcast_convert_type(jnp.float32(1), jnp.int32) + 1)

  def holds(t, row, target):
    return jnp.sum(jnp.where(jax.lax.bitcast_convert_type(row, jnp.int32) >= t, row, 0.0)) >= target

  return jax.lax.bitcast_convert_type(_bisect(holds, lo, hi, w, target), jnp.float32)


def _col(x: jax.Array, like: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ...], to broadcast against like [B, ...]."""
  return x.reshape(x.shape + (1,) * (like.ndim - 1))


def _cutoff(pen: jax.Array, rel_prob, top_k: jax.Array, top_p: jax.Array, needs: SamplingNeeds, fast_k: int,
            ) -> jax.Array:
  """[B]: per row, the smallest penalised logit that top-k and top-p keep (-inf where both are off).

  pen [B, V] penalised logits; rel_prob(x) maps penalised logits [B, ...] to exp(x / t - max z), a token's
  probability relative to the most likely one. Dividing by t > 0 keeps the order, so thresholds on pen equal
  thresholds on z. Rows whose k, and top-p set, lie within the fast_k largest are solved from lax.top_k. If some
  row does not fit, the batch bisects (a lax.cond), but only the rows that did not fit take the bisection's
  answer: a row's cutoff never depends on its batch mates.
  """
  b, v = pen.shape
  none = jnp.full((b,), -jnp.inf, jnp.float32)
  use_k = (top_k > 0) & (top_k < v) if needs.top_k else jnp.zeros((b,), bool)
  use_p = top_p < 1 if needs.top_p else jnp.zeros((b,), bool)

  # Without the barrier XLA can fold the slicing below into a full sort of [B, V]: 100x slower at B=32.
  vals = jax.lax.optimization_barrier(_top_values(pen, fast_k))  # [B, K] descending
  k_fits = ~use_k | (top_k <= fast_k)
  cut_k = jnp.where(use_k, jnp.take_along_axis(vals, jnp.clip(top_k - 1, 0, fast_k - 1)[:, None], -1)[:, 0], none)

  def nucleus_fast(cut_k):
    """Top-p's cutoff from the fast_k largest, whether it lies among them, and the mass to reach."""
    target = top_p * jnp.sum(jnp.where(pen >= cut_k[:, None], rel_prob(pen), 0.0), axis=-1)  # [B]
    ev = jnp.where(vals >= cut_k[:, None], rel_prob(vals), 0.0)  # [B, K]
    last = jnp.sum(jnp.cumsum(ev, axis=-1) < target[:, None], axis=-1)  # [B] the last token kept
    cut = jnp.where(use_p, jnp.take_along_axis(vals, jnp.minimum(last, fast_k - 1)[:, None], -1)[:, 0], none)
    return cut, ~use_p | (last < fast_k), target

  cut_p, p_fits = none, jnp.ones((b,), bool)
  if needs.top_p:
    cut_p, p_fits, _ = nucleus_fast(cut_k)

  def fast(cut_k, cut_p, p_fits):
    return cut_k, cut_p

  def exact(cut_k, cut_p, p_fits):
    moved = ~k_fits
    if needs.top_k:
      cut_k = jnp.where(moved, _kth_largest(pen, jnp.maximum(top_k, 1)), cut_k)
    if needs.top_p:  # rows whose top-k cut moved look for their top-p cut again
      moved_cut, moved_fits, target = nucleus_fast(cut_k)
      cut_p, p_fits = jnp.where(moved, moved_cut, cut_p), jnp.where(moved, moved_fits, p_fits)
      w = jnp.where(pen >= cut_k[:, None], rel_prob(pen), 0.0)  # [B, V]
      floor = _nucleus_floor(w, target)  # [B] the smallest relative probability kept
      slow = jnp.min(jnp.where(w >= floor[:, None], pen, jnp.inf), axis=-1)  # the same set, on pen
      cut_p = jnp.where(p_fits, cut_p, slow)
    return cut_k, cut_p

  cut_k, cut_p = jax.lax.cond(jnp.all(k_fits & p_fits), fast, exact, cut_k, cut_p, p_fits)
  return jnp.maximum(cut_k, cut_p)


def _draw(pen: jax.Array, weight, u: jax.Array) -> jax.Array:
  """Per row, the token i with sum(w[:i]) <= u * sum(w) < sum(w[:i+1]), w = weight(pen): inverse-CDF sampling.

  pen [B, V]; weight maps [B, ...] elementwise to weights >= 0, positive somewhere in each row; u [B] uniform in
  [0, 1). Blocked: the weights are summed per block [B, N] as they are computed, and only the chosen block is
  computed again and scanned, so no [B, V] array is written. A token of weight 0 is never chosen.
  """
  blocks = _blocks(pen, -jnp.inf)  # [B, N, C]; weight(-inf) = 0
  block_mass = jnp.sum(weight(blocks), axis=-1)  # [B, N]
  cum = jnp.cumsum(block_mass, axis=-1)  # [B, N]
  target = u * cum[:, -1]  # [B]

  def last_positive(x):  # [B, X] -> [B], the index of the last entry > 0
    return x.shape[-1] - 1 - jnp.argmax(x[:, ::-1] > 0, axis=-1)

  # The first block whose running sum passes the target (it has weight), or the last with weight if rounding
  # put the target past the end.
  blk = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), last_positive(block_mass))  # [B]
  before = jnp.where(blk > 0, jnp.take_along_axis(cum, jnp.maximum(blk - 1, 0)[:, None], -1)[:, 0], 0.0)
  inner = weight(jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0])  # [B, C]
  # The first j whose running sum passes the rest has w[j] > 0 (adding 0 changes no sum).
  j = jnp.sum(jnp.cumsum(inner, axis=-1) <= (target - before)[:, None], axis=-1)
  return (blk * _BLOCK + jnp.minimum(j, last_positive(inner))).astype(jnp.int32)


def with_top_logprobs(logits: jax.Array, logprobs: jax.Array) -> jax.Array:
  """[B, 1 + 2 TOP_LOGPROBS] float32: each row's chosen-token log-probability (`sample`'s [B]), then the ids
  (exact in float32: below 2**24) and the log-probabilities of its TOP_LOGPROBS most likely tokens under the raw
  logits [B, V], most likely first (the lower id first among equals). Unpack with `split_top_logprobs`."""
  raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  values, ids = jax.lax.top_k(raw, TOP_LOGPROBS)
  return jnp.concatenate([logprobs[:, None], ids.astype(jnp.float32), values], axis=-1)


def split_top_logprobs(row, k: int) -> tuple[float, list[tuple[int, float]]]:
  """A host row of `with_top_logprobs` ([1 + 2 TOP_LOGPROBS] floats) -> (chosen logprob, its first k (id, logprob)
  pairs)."""
  ids, values = row[1:1 + TOP_LOGPROBS], row[1 + TOP_LOGPROBS:]
  return float(row[0]), [(int(i), float(v)) for i, v in zip(ids[:k], values[:k])]


def _unpack(mask: jax.Array, v: int) -> jax.Array:
  """[B, W] int32 bitmask -> [B, V] bool: token t allowed where bit t % 32 of word t // 32 is set."""
  bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
  return bits.reshape(mask.shape[0], -1)[:, :v].astype(bool)


# Streams of random numbers a slot draws per token index: the sample itself (plain decoding's, and the verify
# step's where it matches a proposal against that sample), and a sampled draft's three (`draft_sample`,
# `speculative_sample`): its proposal, the acceptance test, the draw from the residual. Independent by fold_in.
STREAM_SAMPLE, STREAM_DRAFT, STREAM_ACCEPT, STREAM_RESIDUAL = 0, 1, 2, 3


def _slot_uniforms(seed: jax.Array, sample_index: jax.Array, step: jax.Array, stream: int = STREAM_SAMPLE,
                   ) -> jax.Array:
  """[B] uniforms in [0, 1), slot b's from fold_in(fold_in(key(seed[b]), sample_index[b]), step[b]) (then
  fold_in(stream) for a stream other than the sample's)."""

  def one(s, i, t):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), t)
    if stream != STREAM_SAMPLE:
      key = jax.random.fold_in(key, stream)
    return jax.random.uniform(key, (), jnp.float32)

  return jax.vmap(one)(seed, sample_index, step)


@dataclasses.dataclass(frozen=True)
class _Filtered:
  """One batch's logits through the penalties, the mask and the filters (`_filter`): the raw float32 logits
  [B, V], the penalised ones, each row's greedy token [B] and log-normaliser [B] of the raw logits, and where
  some slot samples, live [B] (temperature > 0) and weight: penalised logits [B, ...] -> the unnormalised
  probability a live row draws with (0 where a filter drops the token)."""

  logits: jax.Array
  pen: jax.Array
  greedy: jax.Array
  lse: jax.Array
  live: jax.Array | None = None
  weight: Any = None

  def logprobs(self, tokens: jax.Array) -> jax.Array:
    """[B] log-probabilities of tokens [B] under the raw logits."""
    return jnp.take_along_axis(self.logits, tokens[:, None], -1)[:, 0] - self.lse

  def draw(self, arrays: SamplingArrays, step, stream: int = STREAM_SAMPLE) -> jax.Array:
    """[B] each row's token: a live row's drawn with its uniform of `stream` (`_draw`), a greedy row's argmax."""
    if self.live is None:
      return self.greedy
    u = _slot_uniforms(arrays.seed, arrays.sample_index, _steps(step, self.greedy.shape[0]), stream)
    return jnp.where(self.live, _draw(self.pen, self.weight, u), self.greedy)

  def probabilities(self) -> jax.Array:
    """[B, V] float32: the distribution each row draws from, normalised; a greedy row's is one-hot at its
    greedy token."""
    onehot = jax.nn.one_hot(self.greedy, self.logits.shape[-1], dtype=jnp.float32)
    if self.live is None:
      return onehot
    w = self.weight(self.pen)
    return jnp.where(self.live[:, None], w / jnp.sum(w, axis=-1, keepdims=True), onehot)


def _filter(logits: jax.Array, arrays: SamplingArrays, prompt_mask: jax.Array | None,
            output_counts: jax.Array | None, needs: SamplingNeeds, fast_k: int, mask: jax.Array | None) -> _Filtered:
  """Stages 1-5 of the module's docstring: what `sample` draws from."""
  logits = logits.astype(jnp.float32)
  b, v = logits.shape
  a = arrays
  pen = logits
  if needs.penalties:
    pen = apply_penalties(logits, prompt_mask, output_counts, a.repetition_penalty, a.presence_penalty,
                          a.frequency_penalty)
  if needs.masked:
    pen = jnp.where(_unpack(mask, v), pen, -jnp.inf)
  tokens = _argmax(pen)  # [B] greedy
  pen_max = jnp.take_along_axis(pen, tokens[:, None], -1)[:, 0]  # [B]
  raw_max = jnp.max(logits, axis=-1) if needs.penalties or needs.masked else pen_max
  lse = raw_max + jnp.log(jnp.sum(jnp.exp(logits - raw_max[:, None]), axis=-1))  # [B]
  if not needs.sampling:
    return _Filtered(logits, pen, tokens, lse)
  live = a.temperature > 0  # [B]
  inv_t = 1.0 / jnp.where(live, a.temperature, 1.0)  # [B]; multiplied, so z's maximum is pen_max * inv_t
  z_max = pen_max * inv_t

  def rel_prob(x):  # penalised logits [B, ...] -> probability relative to the most likely token, in [0, 1]
    return jnp.exp(x * _col(inv_t, x) - _col(z_max, x))

  cut = None
  if needs.top_k or needs.top_p:
    top_k, top_p = jnp.where(live, a.top_k, 0), jnp.where(live, a.top_p, 1.0)  # greedy slots: no filter
    cut = _cutoff(pen, rel_prob, top_k, top_p, needs, min(fast_k, v))  # [B]
  min_p = jnp.where(live, a.min_p, 0.0) if needs.min_p else None

  def weight(x):  # penalised logits [B, ...] -> unnormalised probability after the filters
    e = rel_prob(x)
    keep = jnp.ones(x.shape, bool)
    if cut is not None:
      keep &= x >= _col(cut, x)
    if min_p is not None:  # min_p 1 must keep the maximum even if rounding leaves its e a hair under 1
      keep &= (e >= _col(min_p, x)) | (x >= _col(pen_max, x))
    return jnp.where(keep, e, 0.0)

  return _Filtered(logits, pen, tokens, lse, live, weight)


def _steps(step, b: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(step, jnp.int32), (b,))


def sample(logits: jax.Array, arrays: SamplingArrays, step: jax.Array, prompt_mask: jax.Array | None,
           output_counts: jax.Array | None, needs: SamplingNeeds, *, fast_k: int = _FAST_K,
           mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Next tokens [B] int32 and their log-probabilities [B] float32 under the raw logits. Jittable, needs static.

  logits [B, V] raw model logits; step [B] int32 (or a scalar), the index of the token each slot generates;
  prompt_mask [B, V] bool and output_counts [B, V] int32 are read only if needs.penalties (else may be None).
  fast_k: how many of the largest logits top-k and top-p look at before bisecting (static; tests lower it).
  mask: [B, W] int32 token bitmask (`qwenjax.engine.constraints`; -1 words allow everything), read only if
    needs.masked: a forbidden token's penalised logit becomes -inf before every filter, so neither greedy nor
    sampling ever picks it (each row must allow some token). The log-probability reported stays the raw one.
  """
  f = _filter(logits, arrays, prompt_mask, output_counts, needs, fast_k, mask)
  tokens = f.draw(arrays, step)
  return tokens, f.logprobs(tokens)


def draft_sample(logits: jax.Array, arrays: SamplingArrays, step: jax.Array, needs: SamplingNeeds, *,
                 fast_k: int = _FAST_K) -> tuple[jax.Array, jax.Array]:
  """A sampled draft's proposals: tokens [B] drawn from the draft's logits [B, V] under each slot's temperature,
  top-k, top-p and min-p (no penalties, no grammar: a proposal distribution need only be the one drawn from),
  with the slot's draft stream of random numbers, and that distribution [B, V] (one-hot at the argmax for a
  greedy slot), which `speculative_sample` weighs the proposal against."""
  needs = dataclasses.replace(needs, penalties=False, masked=False, top_logprobs=False)
  f = _filter(logits, arrays, None, None, needs, fast_k, None)
  return f.draw(arrays, step, STREAM_DRAFT), f.probabilities()


def speculative_sample(logits: jax.Array, arrays: SamplingArrays, step: jax.Array, prompt_mask: jax.Array | None,
                       output_counts: jax.Array | None, needs: SamplingNeeds, proposal: jax.Array,
                       proposal_probs: jax.Array, proposed: jax.Array, *, fast_k: int = _FAST_K,
                       mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rejection sampling of proposals drawn from a distribution q (a sampled draft's): row b keeps proposal[b] = d
  with probability min(1, p(d) / q(d)), p the distribution `sample` draws from (penalties, mask, temperature and
  filters applied), and otherwise draws from max(p - q, 0), normalised. The token that comes out is distributed
  as p exactly (Leviathan et al. 2023; Chen et al. 2023). A row not proposed (proposed[b] false: the position after
  every proposal was kept) samples as `sample` does. Greedy rows: p is one-hot, so a proposal is kept iff it is
  the argmax, and the argmax comes out.

  proposal: [B] int32; proposal_probs: [B, V] q (rows sum to 1, q(proposal) > 0 where proposed); proposed: [B]
  bool; the rest as `sample`. Returns tokens [B], their log-probabilities [B] under the raw logits, and kept [B]
  (proposed and kept). The acceptance test and the residual draw use the slot's own streams of random numbers.
  """
  f = _filter(logits, arrays, prompt_mask, output_counts, needs, fast_k, mask)
  b = proposal.shape[0]
  p = f.probabilities()  # [B, V]
  d = jnp.maximum(proposal, 0)[:, None]
  pd, qd = jnp.take_along_axis(p, d, -1)[:, 0], jnp.take_along_axis(proposal_probs, d, -1)[:, 0]  # [B]
  a, steps = arrays, _steps(step, b)
  u = _slot_uniforms(a.seed, a.sample_index, steps, STREAM_ACCEPT)
  kept = proposed & (u * qd < pd)  # P(u < p(d) / q(d)) for u uniform in [0, 1); never where p(d) = 0
  residual = jnp.maximum(p - proposal_probs, 0.0)  # [B, V]
  # p = q to the last bit keeps every proposal; a refusal where rounding alone parted them draws from p.
  residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p)
  u_res = _slot_uniforms(a.seed, a.sample_index, steps, STREAM_RESIDUAL)
  refused = _draw(residual, lambda x: jnp.maximum(x, 0.0), u_res)  # blocks padded with -inf weigh 0
  tokens = jnp.where(proposed, jnp.where(kept, proposal, refused), f.draw(arrays, steps))
  return tokens, f.logprobs(tokens), kept
