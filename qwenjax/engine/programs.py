"""Every jitted program of the decoder, the library's and the engine's: pure functions of (graphdef, params,
cache, inputs), the cache donated.

    graphdef, params = nnx.split(model)
    cache = KVCache.zeros(cfg, batch, max_len)
    logits, cache = prefill(graphdef, params, cache, tokens, lengths)   # tokens [B, T] padded to a bucket
    logits, cache = decode_step(graphdef, params, cache, next_tokens)    # next_tokens [B]

Two sets:
  the library's steps  `prefill`, `extend`, `decode_step` over a `KVCache` (one row per sequence): one model call
                       each (tests, notebooks, other loops); `*_impl` are the same unjitted, for composing into
                       larger jitted functions.
  the engine's         over a `PagedKVCache`: `ragged_step` (one engine step's model call: a token for every decode
  programs             slot and the next prefill chunks of admitted prompts on one flat token axis, giving the
                       logits of each slot whose next token is due, and scoring prompt tokens when asked), then
                       `sample_slots` (their samples), `paged_decode_block` (k decode + sample steps for every slot
                       in one `fori_loop`, when nothing prefills), `paged_verify` (a speculative step: every
                       slot's last token and proposals in one forward, then a sample per position),
                       `restore_slot` (an admitted sequence's penalty state) and `copy_pages`, over the named
                       inputs `RaggedBatch`, `SampleInputs`, `VisionInputs`, `PagedDecodeInputs` (the slots'
                       `DecodeInputs` and the host's page tables), `VerifyInputs` and the per-slot penalty state
                       `SlotState`, which they donate and return with the cache.

On a device mesh, place params with `qwenjax.parallel.sharding.shard_model` and the cache with `KVCache.zeros(...,
sharding=qwenjax.model.kv_cache.cache_sharding(...))`, and call the programs inside `sharding.use_mesh(mesh)`: each
returns the cache (and slot state) in the layout it came in.

The library's steps return float32 logits and the cache with `lengths` advanced. Prompt lengths (the library's
rows, the engine's prefill part) pad to `qwenjax.kernels.buckets.LengthBuckets`, and the engine's page tables are
always max_pages wide, so a long-running process compiles one step per bucket, one sampler per sampling variant
and one decode block per variant, not a program per prompt or per mix of them.

Shapes: B rows (slots), T tokens per row, V vocabulary, D hidden size, M vision features, E stop ids per slot,
k decode steps per call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.engine import sampling as sampling_lib
from qwenjax.kernels.paged_attention import scatter_index
from qwenjax.model.decoder import PagedInputs, StepMetadata
from qwenjax.model.kv_cache import KVCache, PagedKVCache
from qwenjax.parallel.axes import BATCH, VOCAB, constrain

# Named inputs and state: pytrees of arrays (None where absent), so jit traces them by shape and dtype.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenBatch:
  """Tokens for the library steps' cache rows. tokens: [B, T] int32, right-padded; num_new: [B] int32, how many of
  each row's T are real (the rest is padding); rows: [B] int32, the cache rows they go to (None: rows 0..B-1 of a
  B-row cache); adapter: [B] int32, each row's LoRA adapter in the model's bank (-1: none), or None: a model
  without adapters."""

  tokens: jax.Array
  num_new: jax.Array
  rows: jax.Array | None = None
  adapter: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionInputs:
  """A Qwen2.5-VL model's extra prefill inputs, for b rows of T tokens.

  rope_positions: [3, b, T] int32, the M-RoPE (temporal, height, width) positions of the tokens.
  rope_offset: [b] int32, rotary minus cache position of the tokens that follow (Qwen's `rope_deltas`).
  features: [M, D] vision features; index: [b, T] int32, each token's row of `features` (-1: its token embedding).
  The engine passes rope_positions, features and index on every ragged step (its offsets are RaggedBatch's).
  Through `prefill` / `extend` any may be None: positions are then the cache positions plus each row's offset,
  the offset stays (fresh rows: 0), and no token takes a vision feature.
  """

  rope_positions: jax.Array | None
  rope_offset: jax.Array | None
  features: jax.Array | None
  index: jax.Array | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
  """What the penalties of each decode slot read, on the device between calls. prompt_mask: [B, V] bool, the
  tokens of the slot's prompt; counts: [B, V] int32, how often the slot has generated each token."""

  prompt_mask: jax.Array
  counts: jax.Array

  AXES = (BATCH, VOCAB)  # logical axes of both arrays

  @classmethod
  def zeros(cls, batch: int, vocab: int, where: jax.sharding.Sharding | None = None) -> SlotState:
    """Empty slots; `where` (`qwenjax.parallel.sharding.named_sharding` of AXES) allocates each device's shards."""
    return cls(jnp.zeros((batch, vocab), bool, device=where), jnp.zeros((batch, vocab), jnp.int32, device=where))

  def constrained(self) -> SlotState:
    """Inside a jitted program under a mesh: both arrays pinned to their sharding (see `KVCache.constrained`)."""
    return SlotState(constrain(self.prompt_mask, self.AXES), constrain(self.counts, self.AXES))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  """Every slot's inputs to a decode block. tokens: [B] int32, each slot's last token; step: [B] int32, tokens
  it has generated; active: [B] bool, slots that decode (the rest idle); budget: [B] int32, tokens it may still
  generate; stop_ids: [B, E] int32, its stop token ids (-1 padded); sampling: the slots' SamplingArrays; mask:
  [B, W] int32, the tokens each slot may sample (`qwenjax.engine.constraints`; -1 words: all), read with
  needs.masked (else None). The same mask holds for all k steps: a slot whose mask changes per token (a grammar)
  gets budget 1, so it samples one token and then idles until the host has advanced its grammar. adapter: [B]
  int32, each slot's LoRA adapter in the model's bank (-1: none), or None: a model without adapters."""

  tokens: jax.Array
  step: jax.Array
  active: jax.Array
  budget: jax.Array
  stop_ids: jax.Array
  sampling: sampling_lib.SamplingArrays
  mask: jax.Array | None = None
  adapter: jax.Array | None = None


# The model steps, unjitted.


def _run(graphdef, params, cache: KVCache, batch: TokenBatch, vision: VisionInputs | None, *, fresh: bool,
         all_logits: bool, kv_len: int | None = None):
  """Runs batch.tokens [B, T] at positions lengths + [0, T) of cache rows `batch.rows`. fresh: the rows start
  empty (length 0; rotary offset 0 unless `vision` gives one) and the tokens attend within themselves only.

  RoPE positions are the cache positions plus each row's rotary offset, unless `vision.rope_positions` ([3, B, T]
  for M-RoPE) gives them; `vision.rope_offset` [B], when given, becomes the rows' offset for the tokens that
  follow."""
  model = nnx.merge(graphdef, params)
  tokens, rows = batch.tokens, batch.rows
  b, t = tokens.shape
  row = (lambda a: a) if rows is None else (lambda a: a[rows])
  vision = vision or VisionInputs(None, None, None, None)
  rope_offset = vision.rope_offset
  if fresh:
    empty = jnp.zeros_like(cache.lengths if rows is None else rows)
    cache = dataclasses.replace(cache, lengths=_set_rows(cache.lengths, rows, empty))
    if rope_offset is None:
      rope_offset = empty
  lengths = row(cache.lengths)  # [B]
  positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
  rope_positions = vision.rope_positions
  if rope_positions is None:
    rope_positions = positions + row(cache.rope_offset)[:, None]
  embeds = None if vision.features is None else (vision.features, vision.index)
  meta = StepMetadata(positions, rope_positions, embeds, rows=rows, attend_to_cache=not fresh, kv_len=kv_len,
                      lora_index=batch.adapter)
  h, cache = model(tokens, cache, meta)  # [B, T, D]
  cache = dataclasses.replace(cache, lengths=_set_rows(cache.lengths, rows, lengths + batch.num_new))
  if rope_offset is not None:
    cache = dataclasses.replace(cache, rope_offset=_set_rows(cache.rope_offset, rows, rope_offset))
  cache = cache.constrained()  # under a mesh (`qwenjax.parallel.sharding.use_mesh`): returned in the layout it came in
  if all_logits:
    return model.logits(h), cache  # [B, T, V]
  return _last_logits(model, h, batch.num_new) + (cache,)


def _last_logits(model, h: jax.Array, num_new: jax.Array) -> tuple[jax.Array]:
  """(logits at each row's last real token [B, V],) from hidden states h [B, T, D]."""
  last = jnp.take_along_axis(h, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
  return (model.logits(last),)


def target_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log_softmax(logits) at targets: logits [B, T, V] float32, targets [B, T] int32 (-1: none, scored 0) ->
  [B, T] float32, whole on every device under a mesh (the host reads it). The raw distribution: no temperature,
  no penalty. Prefill passes each position's next prompt token, so that position i scores token i + 1 and a
  chunk's last position scores the next chunk's first token."""
  picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]  # [B, T]
  scores = jnp.where(targets >= 0, picked - jax.nn.logsumexp(logits, axis=-1), 0.0)
  return constrain(scores, (None, None))


def _set_rows(array: jax.Array, rows, values: jax.Array) -> jax.Array:
  return values if rows is None else array.at[rows].set(values)


def _vision(rope_positions, rope_offset, embeds) -> VisionInputs | None:
  """The VisionInputs of `prefill` / `extend`'s keyword arguments; None when none is given."""
  if rope_positions is None and rope_offset is None and embeds is None:
    return None
  features, index = (None, None) if embeds is None else embeds
  return VisionInputs(rope_positions, rope_offset, features, index)


def prefill_impl(graphdef, params, cache: KVCache, tokens: jax.Array, lengths: jax.Array, rows=None,
                 all_logits: bool = False, rope_positions=None, rope_offset=None, embeds=None):
  """Prompts into empty cache rows. tokens: [B, T] right-padded; lengths: [B] true prompt lengths; rows: [B]
  the cache rows to fill (None: rows 0..B-1 of a B-row cache).

  Multimodal prompts also pass rope_positions [3, B, T] (M-RoPE), rope_offset [B] (rotary minus cache
  position after the prompt) and embeds (vision features [M, D], index [B, T]; see `StepMetadata.embeds`).
  Attends within the prompt only (T x T, not T x S). Returns logits at each prompt's last token [B, V] (or at
  every position [B, T, V] with all_logits) and the cache holding the prompts.
  """
  return _run(graphdef, params, cache, TokenBatch(tokens, lengths, rows), _vision(rope_positions, rope_offset, embeds),
              fresh=True, all_logits=all_logits)


def extend_impl(graphdef, params, cache: KVCache, tokens: jax.Array, num_new: jax.Array, rows=None,
                all_logits: bool = False, rope_positions=None, rope_offset=None, embeds=None):
  """Appends tokens [B, T] (num_new [B] real) after what cache rows `rows` hold: chunked prefill, prefixes."""
  return _run(graphdef, params, cache, TokenBatch(tokens, num_new, rows), _vision(rope_positions, rope_offset, embeds),
              fresh=False, all_logits=all_logits)


def decode_step_impl(graphdef, params, cache: KVCache, tokens: jax.Array, kv_len: int | None = None,
                     adapter: jax.Array | None = None):
  """One token per sequence, each at its own position. tokens: [B] -> logits [B, V]; adapter: [B] each row's
  LoRA adapter (-1: none), or None.

  kv_len (static): attend to positions [0, kv_len) only; every row's position must be below it. A cache of
  4096 positions holding 300-token sequences then reads 512 positions per step, not 4096."""
  batch = TokenBatch(tokens[:, None], jnp.ones_like(cache.lengths), adapter=adapter)
  return _run(graphdef, params, cache, batch, None, fresh=False, all_logits=False, kv_len=kv_len)


# The library's steps, one call each.

_jit = functools.partial(jax.jit, static_argnames=("graphdef", "all_logits"), donate_argnames=("cache",))
prefill = _jit(prefill_impl)
extend = _jit(extend_impl)
decode_step = jax.jit(decode_step_impl, static_argnames=("graphdef", "kv_len"), donate_argnames=("cache",))


# The engine's programs, over a PagedKVCache whose page tables and slots the host computes
# (`qwenjax.engine.pages`). Static arguments are kept to what changes the program (the attention impl and, for
# decode, the sampling variant and step count) so that the compiled programs stay few; shapes (rows b, tokens T,
# page-table width P) are bucketed by the engine. The cache and slot state are donated and come back in the
# layout they came in.


def _decode_loop(step, cache, slots: SlotState, inputs: DecodeInputs, needs: sampling_lib.SamplingNeeds,
                 num_steps: int, goes_on=None, sample=None):
  """num_steps of `step(i, cache, tokens [B]) -> (logits [B, V], cache)` then sampling, each row stopping where
  its stop ids or budget say, or where `goes_on(i, tokens [B]) -> [B] bool` (a verify step: the token sampled
  equals the proposal) is false. sample: None (`sampling.sample`), or `sample(i, logits, step [B], counts) ->
  (tokens [B], logprobs [B], goes on [B] bool)`, which draws instead (a sampled draft's verify step:
  `sampling.speculative_sample`). Returns tokens [k, B] (-1 once a row stopped), logprobs [k, B] ([k, B, 1 + 2
  TOP_LOGPROBS] with needs.top_logprobs: `sampling.with_top_logprobs`), cache, slot state."""
  prompt_mask = slots.prompt_mask

  def body(i, carry):
    cache, counts, tok, step_count, active, budget, out_tok, out_lp = carry
    logits, cache = step(i, cache, tok)
    with jax.named_scope("sample"):
      if sample is None:
        new, logprob = sampling_lib.sample(logits, inputs.sampling, step_count, prompt_mask, counts, needs,
                                           mask=_position_mask(inputs.mask, i))
        go = None if goes_on is None else goes_on(i, new)
      else:
        new, logprob, go = sample(i, logits, step_count, counts)
      if needs.top_logprobs:
        logprob = sampling_lib.with_top_logprobs(logits, logprob)  # [B, 1 + 2 TOP_LOGPROBS]
      counts = constrain(sampling_lib.update_counts(counts, new, active), SlotState.AXES)
    out_tok = out_tok.at[i].set(jnp.where(active, new, -1))
    out_lp = out_lp.at[i].set(logprob)
    stopped = jnp.any(new[:, None] == inputs.stop_ids, axis=-1) | (budget <= 1)
    if go is not None:
      stopped |= ~go
    return cache, counts, new, step_count + 1, active & ~stopped, budget - 1, out_tok, out_lp

  b = inputs.tokens.shape[0]
  lp_shape = (1 + 2 * sampling_lib.TOP_LOGPROBS,) if needs.top_logprobs else ()
  init = (cache, slots.counts, inputs.tokens, inputs.step, inputs.active, inputs.budget,
          jnp.full((num_steps, b), -1, jnp.int32), jnp.zeros((num_steps, b, *lp_shape), jnp.float32))
  cache, counts, *_, out_tok, out_lp = jax.lax.fori_loop(0, num_steps, body, init)
  # Under a mesh, whole on every device: the host reads them (on every process of a multi-host mesh).
  out_tok, out_lp = constrain(out_tok, (None, None)), constrain(out_lp, (None,) * out_lp.ndim)
  return out_tok, out_lp, cache, SlotState(prompt_mask, counts).constrained()


def _position_mask(mask: jax.Array | None, i) -> jax.Array | None:
  """A decode block's mask [B, words] (the same at every step), or a verify step's [B, W, words]: position i's."""
  if mask is None or mask.ndim == 2:
    return mask
  return jax.lax.dynamic_index_in_dim(mask, i, axis=1, keepdims=False)


def _pool_slots(page_table: jax.Array, positions: jax.Array, page_size: int, writes: jax.Array) -> jax.Array:
  """[B, T] int32: the pool slot (page * page_size + offset) of each position [B, T] in its row's pages [B, P], -1
  where writes [B, T] is false (nothing written there)."""
  page = jnp.take_along_axis(page_table, jnp.minimum(positions // page_size, page_table.shape[1] - 1), axis=1)
  return jnp.where(writes, page * page_size + positions % page_size, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedDecodeInputs:
  """A decode block over a PagedKVCache: the slots' DecodeInputs, plus position: [B] int32, the cache position of
  each slot's last token (the one it feeds); page_table: [B, P] int32, pages allocated for the block's k tokens
  ahead; rope_offset: [B] int32, rotary minus cache position (0, or a Qwen2.5-VL prompt's `rope_deltas`)."""

  decode: DecodeInputs
  position: jax.Array
  page_table: jax.Array
  rope_offset: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedBatch:
  """One engine step on a flat axis of T = S + C tokens: first one decode token for each of the S slots (the
  slot's row, idle ones padding), then C tokens of prefill chunks, each chunk starting a block of Q tokens (the
  static `block` of `ragged_step`) and padded to a whole number of blocks.

  tokens, positions, rope_offset: [T] int32, each token, its cache position and its rotary minus cache position;
  paged: slots [T, 1] (each token's pool slot, -1: padding), page_table [R, P] and num_new [R] of the R = S + C / Q
  attention rows (a decode row, or a block: the page table of its sequence, its real tokens); sample_at: [S] int32,
  the token whose logits sample slot s's next token (its decode token, or the last of a chunk that completes a
  fresh prompt; any token where slot s does not sample); adapter: [T] int32 each token's LoRA adapter (-1: none),
  or None; targets: [T] int32 the prompt token that follows each token (-1: none; see `target_logprobs`), or None:
  nothing scored."""

  tokens: jax.Array
  positions: jax.Array
  paged: PagedInputs
  rope_offset: jax.Array
  sample_at: jax.Array
  adapter: jax.Array | None = None
  targets: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleInputs:
  """What `sample_slots` needs beside the logits, for S slots. active: [S] bool, the slots that sample; step: [S]
  int32, tokens each has generated; sampling, mask: as `DecodeInputs`."""

  active: jax.Array
  step: jax.Array
  sampling: sampling_lib.SamplingArrays
  mask: jax.Array | None = None


def _draft_forward(draft_graphdef, draft_params, draft_cache: PagedKVCache, tokens: jax.Array,
                   meta: StepMetadata) -> PagedKVCache:
  """A draft model over a step's own tokens, positions and pool slots (its pages are the target's page ids in a
  pool of its own): its keys and values written, its logits unused."""
  draft = nnx.merge(draft_graphdef, draft_params)
  _, draft_cache = draft(tokens, draft_cache, meta)
  return draft_cache.constrained()


@functools.partial(jax.jit, static_argnames=("graphdef", "block", "impl", "draft_graphdef"),
                   donate_argnames=("cache", "draft_cache"))
def ragged_step(graphdef, params, cache: PagedKVCache, batch: RaggedBatch, vision: VisionInputs | None = None, *,
                block: int, impl: str = "xla", draft_graphdef=None, draft_params=None,
                draft_cache: PagedKVCache | None = None) -> tuple[jax.Array, ...]:
  """One step of the engine's model: every token of `batch` into its slot, each decode token attending over its
  sequence's pages and each prefill block over its sequence's pages (its own chunk included, causally). vision: a
  Qwen2.5-VL model's rotary positions [3, T, 1] and features (index [T, 1]). Returns the logits [S, V] at
  `batch.sample_at` (what `sample_slots` draws from), with `batch.targets` the prompt log-probabilities [T], then
  the cache. Compiled once per T (a bucket), scoring or not and vision or not: the sampling variants are
  `sample_slots`'s, a program a fraction of this one's size, so that they do not multiply the model's programs.
  A speculative engine's draft model (draft_graphdef, draft_params, draft_cache) runs over the same tokens, and its
  cache is returned last."""
  model = nnx.merge(graphdef, params)
  s = batch.sample_at.shape[0]
  rope_positions, embeds = None, None
  if vision is not None:
    rope_positions = vision.rope_positions
    embeds = None if vision.features is None else (vision.features, vision.index)
  meta = StepMetadata.paged_step(batch.positions[:, None], batch.paged, batch.rope_offset,
                                 rope_positions=rope_positions, embeds=embeds, impl=impl, lora_index=batch.adapter,
                                 ragged=(s, block))
  h, cache = model(batch.tokens[:, None], cache, meta)  # [T, 1, D], a token per row
  h = h[:, 0]
  out = [model.logits(h[batch.sample_at], impl)]  # [S, V]
  if batch.targets is not None:
    out.append(target_logprobs(model.logits(h, impl)[None], batch.targets[None])[0])  # [T]
  if draft_graphdef is not None:
    return (*out, cache.constrained(),
            _draft_forward(draft_graphdef, draft_params, draft_cache, batch.tokens[:, None], meta))
  return (*out, cache.constrained())


@functools.partial(jax.jit, static_argnames=("needs",), donate_argnames=("slots",))
def sample_slots(logits: jax.Array, slots: SlotState, inputs: SampleInputs, *,
                 needs: sampling_lib.SamplingNeeds) -> tuple[jax.Array, jax.Array, SlotState]:
  """One sample for every active slot from its logits [S, V] (`ragged_step`'s), its penalty state counting it.
  Returns tokens [S] (-1 where a slot did not sample), their log-probabilities [S] ([S, 1 + 2 TOP_LOGPROBS] with
  needs.top_logprobs), and the slot state. Compiled once per sampling variant."""
  tok, logprob = sampling_lib.sample(logits, inputs.sampling, inputs.step, slots.prompt_mask, slots.counts, needs,
                                     mask=inputs.mask)
  if needs.top_logprobs:
    logprob = sampling_lib.with_top_logprobs(logits, logprob)  # [S, 1 + 2 TOP_LOGPROBS]
  counts = constrain(sampling_lib.update_counts(slots.counts, tok, inputs.active), SlotState.AXES)
  # Whole on every device under a mesh: the host reads them (on every process of a multi-host mesh).
  return (constrain(jnp.where(inputs.active, tok, -1), (None,)), constrain(logprob, (None,) * logprob.ndim),
          SlotState(slots.prompt_mask, counts).constrained())


@functools.partial(jax.jit, donate_argnames=("slots",))
def restore_slot(slots: SlotState, slot: jax.Array, prompt: jax.Array, prompt_len: jax.Array,
                 generated: jax.Array, num_generated: jax.Array) -> SlotState:
  """An admitted sequence's slot penalty state: its prompt's mask and the counts of the tokens it has generated
  (none for a fresh one; a resumed, preempted one's as they were). prompt, generated: [T] int32 padded (the
  runner pads both to the longest context: one compiled shape), the first prompt_len / num_generated real."""
  v = slots.prompt_mask.shape[1]
  real = lambda ids, n: jnp.where(jnp.arange(ids.shape[0]) < n, ids, v)  # padding past the vocabulary: dropped
  mask = jnp.zeros(v, bool).at[real(prompt, prompt_len)].set(True, mode="drop")
  counts = jnp.zeros(v, jnp.int32).at[real(generated, num_generated)].add(1, mode="drop")
  return SlotState(slots.prompt_mask.at[slot].set(mask), slots.counts.at[slot].set(counts)).constrained()


@functools.partial(jax.jit, static_argnames=("graphdef", "needs", "num_steps", "impl", "draft_graphdef"),
                   donate_argnames=("cache", "slots", "draft_cache"))
def paged_decode_block(graphdef, params, cache: PagedKVCache, slots: SlotState, inputs: PagedDecodeInputs,
                       needs: sampling_lib.SamplingNeeds, num_steps: int, impl: str = "xla", draft_graphdef=None,
                       draft_params=None, draft_cache: PagedKVCache | None = None) -> tuple:
  """num_steps decode + sample steps for all B slots in one `fori_loop`, each token written to the slot of its
  position in the row's page table, for the first min(num_steps, budget) steps (idle slots write nothing).
  Returns tokens [k, B] (-1 where a row had stopped), logprobs [k, B], the cache and the slot state (and a draft
  model's cache, which takes every token the target does: `ragged_step`)."""
  model = nnx.merge(graphdef, params)
  d = inputs.decode
  table = inputs.page_table  # [B, P]
  page_size = cache.page_size
  num_new = d.active.astype(jnp.int32)

  def step(i, cache, tok):
    pos = inputs.position + i  # [B]
    # A row writes the positions of the tokens it may generate (min(k, budget): the pages the host allocated),
    # not those a stopped row runs on past its budget; an idle row writes nothing.
    writes = d.active & (i < d.budget)
    slot = _pool_slots(table, pos[:, None], page_size, writes[:, None])  # [B, 1]
    meta = StepMetadata.paged_step(pos[:, None], PagedInputs(slot, table, num_new), inputs.rope_offset,
                                   impl=impl, lora_index=d.adapter)
    if draft_graphdef is not None:
      cache, draft_cache = cache
      draft_cache = _draft_forward(draft_graphdef, draft_params, draft_cache, tok[:, None], meta)
    h, cache = model(tok[:, None], cache, meta)
    logits, cache = model.logits(h[:, 0], impl), cache.constrained()  # [B, V]
    return logits, (cache if draft_graphdef is None else (cache, draft_cache))

  if draft_graphdef is None:
    return _decode_loop(step, cache, slots, d, needs, num_steps)
  out_tok, out_lp, (cache, draft_cache), slots = _decode_loop(step, (cache, draft_cache), slots, d, needs, num_steps)
  return out_tok, out_lp, cache, slots, draft_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyInputs:
  """A speculative step over a PagedKVCache: the slots' PagedDecodeInputs (the page tables hold room for each
  slot's last token and its proposals; a mask, where the step is masked, is [B, W, words]: each position's, the
  one that holds after the proposals before it), drafts: [B, W - 1] int32, the tokens proposed to follow each
  slot's last one (-1 past its own), and num_drafts: [B] int32, how many (at most its budget - 1)."""

  decode: PagedDecodeInputs
  drafts: jax.Array
  num_drafts: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "needs", "impl", "draft_graphdef", "draft_sampled"),
                   donate_argnames=("cache", "slots", "draft_cache"))
def paged_verify(graphdef, params, cache: PagedKVCache, slots: SlotState, inputs: VerifyInputs,
                 needs: sampling_lib.SamplingNeeds, impl: str = "xla", draft_graphdef=None, draft_params=None,
                 draft_cache: PagedKVCache | None = None, draft_sampled: bool = False) -> tuple:
  """One target forward over every slot's last token and its proposals (W = drafts' width + 1 tokens a slot, a
  block of the ragged attention: each attends over its pages and, causally, the tokens before it), all written
  to the cache; then, position by position, a sample as `paged_decode_block` draws it (same step index, same
  random numbers, penalty counts including the tokens before it), a row going on while its sample equals its
  proposal (`qwenjax.engine.speculative`). Returns tokens [W, B] (each row's accepted proposals, then the sample
  that differs or follows them; -1 after), logprobs [W, B], the cache (positions past a row's emitted tokens
  hold refused ones: the host sets its length back) and the slot state. Compiled once per W and sampling
  variant.

  With a draft model (draft_graphdef, draft_params, draft_cache), the proposals are its own, made here first:
  greedy steps from each slot's last token, num_drafts of them (inputs.drafts' values are not read), each token it
  is fed written to its cache at the target's slots; then it is fed its last proposal too, so that its cache holds
  every position the target's does. Returns the proposals [B, W - 1] (-1 past num_drafts) and the draft cache
  after the slot state. draft_sampled (static): a sampling slot's draft draws its proposals from its own
  distribution q under the slot's temperature and filters (`sampling.draft_sample`), and each is weighed by
  rejection sampling, kept with probability min(1, p/q) (`sampling.speculative_sample`): the outputs follow
  plain sampling's distribution, not its draws seed for seed; greedy slots are as without it."""
  model = nnx.merge(graphdef, params)
  p, d = inputs.decode, inputs.decode.decode
  b, w = inputs.drafts.shape[0], inputs.drafts.shape[1] + 1
  proposals = inputs.drafts
  sampled = draft_graphdef is not None and draft_sampled and needs.sampling
  if draft_graphdef is not None:
    proposals, draft_probs, draft_cache = _draft_proposals(draft_graphdef, draft_params, draft_cache, inputs, impl,
                                                           needs if sampled else None)
  tokens = jnp.concatenate([d.tokens[:, None], jnp.maximum(proposals, 0)], axis=1)  # [B, W]
  pos = p.position[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]  # [B, W]
  fed = d.active[:, None] & (jnp.arange(w)[None, :] <= inputs.num_drafts[:, None])  # [B, W]
  slot = _pool_slots(p.page_table, pos, cache.page_size, fed)
  num_new = jnp.where(d.active, inputs.num_drafts + 1, 0)  # [B]
  flat = lambda a: a.reshape(b * w, 1)  # [B, W] -> [B * W, 1], a token per row
  adapter = None if d.adapter is None else jnp.repeat(d.adapter, w)
  meta = StepMetadata.paged_step(flat(pos), PagedInputs(flat(slot), p.page_table, num_new),
                                 jnp.repeat(p.rope_offset, w), impl=impl, lora_index=adapter, ragged=(0, w))
  h, cache = model(flat(tokens), cache, meta)  # [B * W, 1, D]
  logits = model.logits(h[:, 0], impl).reshape(b, w, -1)  # [B, W, V]
  drafts = jnp.pad(proposals, ((0, 0), (0, 1)), constant_values=-1)  # [B, W]: the proposal at each position

  def step(i, cache, tok):
    return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), cache

  def goes_on(i, new):
    return new == jax.lax.dynamic_index_in_dim(drafts, i, axis=1, keepdims=False)

  def weigh(i, logits, step_count, counts):  # a sampled draft's proposal at position i, by rejection sampling
    at = lambda a: jax.lax.dynamic_index_in_dim(a, jnp.minimum(i, w - 2), axis=1, keepdims=False)
    q = at(draft_probs)  # [B, V'] over the draft's vocabulary, which may be narrower than the target's logits
    q = jnp.pad(q, ((0, 0), (0, logits.shape[-1] - q.shape[-1])))
    return sampling_lib.speculative_sample(logits, d.sampling, step_count, slots.prompt_mask, counts, needs,
                                           at(proposals), q, i < inputs.num_drafts, mask=_position_mask(d.mask, i))

  out = _decode_loop(step, cache.constrained(), slots, d, needs, w, goes_on, weigh if sampled else None)
  if draft_graphdef is None:
    return out
  return (*out, constrain(proposals, (None, None)), draft_cache)


def _draft_proposals(draft_graphdef, draft_params, draft_cache: PagedKVCache, inputs: VerifyInputs, impl: str,
                     needs: sampling_lib.SamplingNeeds | None):
  """A draft model's proposals for `paged_verify`: W steps from each slot's last token (the last one only writes
  its final proposal's keys and values), each row writing positions up to its num_drafts. Greedy (needs None),
  or drawn by each slot's sampling settings (`sampling.draft_sample`). Returns the proposals [B, W - 1] (-1 past
  each row's num_drafts), the distributions they were drawn from [B, W - 1, V] (None where greedy) and the draft
  cache."""
  draft = nnx.merge(draft_graphdef, draft_params)
  p, d = inputs.decode, inputs.decode.decode
  b, w = inputs.drafts.shape[0], inputs.drafts.shape[1] + 1
  num_new = d.active.astype(jnp.int32)

  def propose(i, logits):  # [B, V] -> the proposals [B], their distributions [B, V] (or None)
    if needs is None:
      return sampling_lib.greedy(logits), None
    return sampling_lib.draft_sample(logits, d.sampling, d.step + i, needs)

  def body(i, carry):
    draft_cache, tok, proposals, probs = carry
    pos = p.position + i  # [B]
    writes = d.active & (i <= inputs.num_drafts)
    slot = _pool_slots(p.page_table, pos[:, None], draft_cache.page_size, writes[:, None])  # [B, 1]
    meta = StepMetadata.paged_step(pos[:, None], PagedInputs(slot, p.page_table, num_new), p.rope_offset,
                                   impl=impl)
    h, draft_cache = draft(tok[:, None], draft_cache, meta)
    new, q = propose(i, draft.logits(h[:, 0], impl))  # [B], [B, V]
    proposals = jax.lax.dynamic_update_index_in_dim(proposals, jnp.where(i < inputs.num_drafts, new, -1), i, axis=1)
    if q is not None:
      probs = jax.lax.dynamic_update_index_in_dim(probs, q, i, axis=1)
    return draft_cache.constrained(), new, proposals, probs

  probs = None if needs is None else jnp.zeros((b, w, draft.cfg.vocab_size), jnp.float32)
  init = (draft_cache, d.tokens, jnp.full((b, w), -1, jnp.int32), probs)
  draft_cache, _, proposals, probs = jax.lax.fori_loop(0, w, body, init)
  return proposals[:, :w - 1], None if probs is None else probs[:, :w - 1], draft_cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_pages(cache: PagedKVCache, src: jax.Array, dst: jax.Array) -> PagedKVCache:
  """Page src[i] of every layer (keys, values and int8 scales) copied to page dst[i]; src, dst: [n] int32, dst -1
  where pair i copies nothing. The engine's copy-on-write of a shared prefix's partial page: a sequence whose
  prompt begins as a cached page does takes a private copy, then writes its own tokens past the shared ones."""

  def copy(pages):  # [L, NP, PS, ...]
    if pages is None:
      return None
    target, source = scatter_index(dst, pages[:, src], pages.shape[1], axis=1)  # dst -1: past the end, dropped
    return pages.at[:, target].set(source, mode="drop")

  return PagedKVCache(*(copy(a) for a in (cache.k, cache.v, cache.k_scale, cache.v_scale))).constrained()
