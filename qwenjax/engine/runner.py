"""The model runner: the scheduler's plans in, device calls out. It holds everything on the device.

    runner = ModelRunner(model, max_batch_size=8, ...)
    runner.copy_pages(admission.copies)
    runner.encode_visuals(admission.seqs)               # a multimodal prompt's vision tower, at first admission
    logits = runner.prefill(call)                       # one packed prefill call, [rows, V]
    first = runner.start(seq, logits[r:r + 1])          # its first token (or a resumed one's penalty state)
    tokens, logprobs = runner.decode(plan)              # a decode block, [k, B] each

It owns the weights (split once), the `PagedKVCache` (sized from a memory budget, `kv_pages`) and the per-slot
penalty state (`SlotState`), which every jitted program of `qwenjax.engine.programs` donates and returns; it turns
the plain data of a plan into those programs' named inputs (bucketed shapes: rows and tokens of prefill,
page-table widths, padded prompts) and owns warm-up and `program_shapes`, the bound on what it compiles.

Shapes: B slots, P page-table width, T prefill bucket, V vocabulary, D hidden size, W mask words, k decode steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.engine import constraints as constraints_lib
from qwenjax.engine import programs
from qwenjax.engine import sampling as sampling_lib
from qwenjax.engine.kv_pages import KVPages
from qwenjax.engine.pages import pages_needed
from qwenjax.engine.programs import (
  DecodeInputs,
  FirstTokenInputs,
  PagedBatch,
  PagedDecodeInputs,
  SlotState,
  VisionInputs,
)
from qwenjax.engine.sampling_params import SamplingParams
from qwenjax.engine.scheduler import DecodePlan, PrefillCall, rows_fit
from qwenjax.engine.sequence import Sequence as Seq
from qwenjax.kernels.attention import IMPLS, default_impl
from qwenjax.kernels.buckets import LengthBuckets, next_power_of_two
from qwenjax.model import registry
from qwenjax.model.decoder import PagedInputs, Qwen2
from qwenjax.model.lora import LoraBank
from qwenjax.multimodal import features as features_lib
from qwenjax.multimodal import processing
from qwenjax.parallel import sharding
from qwenjax.parallel.axes import DEFAULT_RULES, ShardingRules

# Decode variants, a static jit argument, three of them so that the compiled programs stay few: a greedy batch
# skips filters and penalties entirely; penalties (which touch [B, V] counts) only when some request asks.
GREEDY = sampling_lib.SamplingNeeds(sampling=False, top_k=False, top_p=False, min_p=False, penalties=False)
SAMPLE = sampling_lib.SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=False)
FULL = sampling_lib.SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=True)


def needs_of(params: Iterable[SamplingParams]) -> sampling_lib.SamplingNeeds:
  """One of the three decode variants, with top log-probabilities if some slot asks for them."""
  params = list(params)
  needs = sampling_lib.pack(params).needs
  variant = FULL if needs.penalties else SAMPLE if needs.sampling else GREEDY
  if any(p.top_logprobs for p in params):
    variant = dataclasses.replace(variant, top_logprobs=True)
  return variant


class ModelRunner:
  """Runs one model's programs for the engine (see `qwenjax.engine.engine.Engine` for the arguments).

  bank: the LoRA adapters rows may name (None: a model without adapters), placed in the programs' params.
  """

  def __init__(self, model: Qwen2, *, bank: LoraBank | None, max_batch_size: int, max_seq_len: int,
               buckets: LengthBuckets, decode_steps: int, page_size: int | None, kv_cache_memory: float | None,
               kv_cache_dtype: str | None, attention_impl: str | None, prefix_caching: bool,
               image_processor: processing.ImageProcessorConfig, mesh: jax.sharding.Mesh | None,
               rules: ShardingRules = DEFAULT_RULES):
    self.mesh, self.rules, self.cfg = mesh, rules, model.cfg
    self.attention_impl = attention_impl or default_impl()
    if self.attention_impl not in IMPLS:
      raise ConfigError(f"attention_impl {self.attention_impl!r} is not one of {', '.join(IMPLS)}.")
    if kv_cache_dtype not in (None, "int8"):
      raise ConfigError(f"kv_cache_dtype {kv_cache_dtype!r} is not None (the compute dtype) or 'int8'.")
    model.lora = bank  # in the programs' params (placed on the mesh with the weights); detached below
    if mesh is not None:
      sharding.shard_model(model, mesh, rules)
    self.vl_cfg = model.vl_cfg if registry.for_model(model).multimodal else None
    if self.vl_cfg is not None:
      model.visual.attention_impl = self.attention_impl
    self.visual = model.visual if self.vl_cfg is not None else None
    self.graphdef, self.params = nnx.split(model)
    model.lora = None  # the model object stays as it came; this runner's params hold the bank
    self.has_adapters = bank is not None
    self.patch_buckets = features_lib.patch_buckets(image_processor)
    self.max_batch_size, self.buckets, self.decode_steps = max_batch_size, buckets, decode_steps
    self.prefix_caching = prefix_caching
    b, v = max_batch_size, self.cfg.vocab_size
    slot_sharding = None if mesh is None else sharding.named_sharding(mesh, SlotState.AXES, (b, v), rules)
    self.slots = SlotState.zeros(b, v, slot_sharding)
    self.pages = KVPages.sized(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, page_size=page_size,
                               memory_gib=kv_cache_memory, quantized=kv_cache_dtype == "int8", mesh=mesh, rules=rules)
    self.cache = self.pages.zeros()
    self.stats = {"prompt_tokens": 0, "prefill_calls": 0, "decode_calls": 0}

  def on_mesh(self):
    """The context every jitted call runs in: the mesh and rules (nothing without a mesh)."""
    return sharding.use_mesh(self.mesh, self.rules)

  # ---- admission and prefill -----------------------------------------------------------------------------

  def encode_visuals(self, seqs: Iterable[Seq]) -> None:
    """Runs the vision tower on each multimodal prompt not yet encoded (once per request: its n samples share
    the features)."""
    for seq in seqs:
      if seq.media is not None and seq.media.features is None:
        with self.on_mesh():
          seq.media.features = features_lib.encode_visuals(self.visual, seq.media.prompt.visuals, self.patch_buckets)

  def copy_pages(self, copies: list[tuple[int, int]]) -> None:
    """A round's partial-page copies in one call (`programs.copy_pages`, one compiled shape of B pairs: at most
    one per admitted sequence)."""
    if not copies:
      return
    src, dst = np.zeros(self.max_batch_size, np.int32), np.full(self.max_batch_size, -1, np.int32)
    for i, (source, page) in enumerate(copies):
      src[i], dst[i] = source, page
    with self.on_mesh():
      self.cache = programs.copy_pages(self.cache, src, dst)

  def prefill(self, call: PrefillCall) -> jax.Array:
    """One packed prefill call: a row per chunk (rows padded to a power of two, tokens to call.width), scoring the
    prompt tokens of the rows that ask (`Sequence.targets`, kept in their `prompt_logprobs`). Returns the logits
    at each row's last token [rows, V]."""
    rows, width = next_power_of_two(len(call.rows)), call.width
    tokens = np.zeros((rows, width), np.int32)
    start, num_new, rope_offset = (np.zeros(rows, np.int32) for _ in range(3))
    slots = np.full((rows, width), -1, np.int32)
    scored = []
    for r, row in enumerate(call.rows):
      n = len(row.tokens)
      tokens[r, :n], slots[r, :n] = row.tokens, row.slots
      start[r], num_new[r], rope_offset[r] = row.start, n, row.seq.rope_offset
      scored.append(row.seq.targets(row.start, n))
    seqs = [row.seq for row in call.rows]
    vision = self._vision_rows(call, rows) if self.vl_cfg is not None else None
    batch = PagedBatch(tokens, start, PagedInputs(slots, self._page_table(seqs, rows), num_new), rope_offset,
                       _targets(scored, rows, width), self._adapter_rows(seqs, rows))
    with self.on_mesh():
      logits, *scores, self.cache = programs.paged_prefill(self.graphdef, self.params, self.cache, batch, vision,
                                                           impl=self.attention_impl)
    if scores:  # in prompt order: chunks are prefilled in order
      values = np.asarray(scores[0])
      for r, (seq, t) in enumerate(zip(seqs, scored)):
        if t:
          seq.prompt_logprobs.extend(values[r, :len(t)].tolist())
    self.stats["prefill_calls"] += 1
    self.stats["prompt_tokens"] += int(num_new.sum())
    return logits

  def start(self, seq: Seq, logits: jax.Array) -> tuple[int, float] | None:
    """After seq's context is prefilled: its first token and log-probability, sampled from `logits` [1, V] into its
    slot (penalty state reset to the prompt; masked by its constraint, if any), or, for a resumed sequence, None
    once its slot's penalty state is restored."""
    slot = np.int32(seq.slot)
    if seq.tokens:  # prompt and tokens padded alike: one compiled shape per power of two
      width = _pad_width(max(len(seq.prompt), len(seq.tokens)))
      with self.on_mesh():
        self.slots = programs.restore_slot(self.slots, slot, _padded(seq.prompt, width), np.int32(len(seq.prompt)),
                                           _padded(seq.tokens, width), np.int32(len(seq.tokens)))
      return None
    mask = None if seq.constraint is None else self._masks([seq])
    inputs = FirstTokenInputs(slot, _padded(seq.prompt), np.int32(len(seq.prompt)),
                              sampling_lib.pack([seq.params], sample_indices=[seq.sample_index], seeds=[seq.seed]),
                              mask)
    needs = dataclasses.replace(needs_of([seq.params]), masked=mask is not None)
    with self.on_mesh():
      tok, logprob, self.slots = programs.first_token(logits, self.slots, inputs, needs=needs)
    logprob = np.asarray(logprob)
    return int(tok), float(logprob) if logprob.ndim == 0 else logprob.tolist()

  # ---- decode --------------------------------------------------------------------------------------------

  def decode(self, plan: DecodePlan) -> tuple[np.ndarray, np.ndarray]:
    """A decode block for every slot of the plan: tokens [k, B] (-1 from where a row stopped) and logprobs."""
    b, slots = self.max_batch_size, plan.slots
    position, rope_offset = np.zeros(b, np.int32), np.zeros(b, np.int32)
    for i, seq in enumerate(slots):
      if seq is not None:
        position[i], rope_offset[i] = len(seq.prompt) + len(seq.tokens) - 1, seq.rope_offset
    inputs = PagedDecodeInputs(self._decode_inputs(slots), position, self._page_table(slots, b), rope_offset)
    live = [s for s in slots if s is not None]
    needs = dataclasses.replace(needs_of(s.params for s in live), masked=any(s.constraint is not None for s in live))
    with self.on_mesh():
      out_tok, out_lp, self.cache, self.slots = programs.paged_decode_block(
          self.graphdef, self.params, self.cache, self.slots, inputs, needs=needs, num_steps=plan.num_steps,
          impl=self.attention_impl)
    self.stats["decode_calls"] += 1
    return np.asarray(out_tok), np.asarray(out_lp)

  def _decode_inputs(self, slots: Sequence[Seq | None]) -> DecodeInputs:
    """Every slot's DecodeInputs (idle slots inactive)."""
    b = self.max_batch_size
    live = [s for s in slots if s is not None]
    tokens, step, budget = (np.zeros(b, np.int32) for _ in range(3))
    active = np.zeros(b, bool)
    width = next_power_of_two(max([8] + [len(s.stop_ids) for s in live]))
    stop_ids = np.full((b, width), -1, np.int32)
    for i, seq in enumerate(slots):
      if seq is None:
        continue
      tokens[i], step[i], budget[i], active[i] = seq.tokens[-1], len(seq.tokens), seq.budget(), True
      stop_ids[i, :len(seq.stop_ids)] = sorted(seq.stop_ids)
    arrays = sampling_lib.pack([s.params if s else None for s in slots],
                               sample_indices=[s.sample_index if s else 0 for s in slots],
                               seeds=[s.seed if s else 0 for s in slots])
    mask = self._masks(slots) if any(s.constraint is not None for s in live) else None
    return DecodeInputs(tokens, step, active, budget, stop_ids, arrays, mask, self._adapter_rows(slots, b))

  # ---- inputs shared by prefill and decode -----------------------------------------------------------------

  def _masks(self, seqs: Sequence[Seq | None]) -> np.ndarray:
    """[len(seqs), W] int32: the tokens each may sample next (every bit set for an idle or free slot)."""
    mask = np.full((len(seqs), constraints_lib.words(self.cfg.vocab_size)), -1, np.int32)
    for i, seq in enumerate(seqs):
      if seq is not None and seq.constraint is not None:
        seq.constraint.fill(mask[i])
    return mask

  def _adapter_rows(self, seqs: Sequence[Seq | None], rows: int) -> np.ndarray | None:
    """[rows] int32: each row's LoRA adapter (-1: none, and for padding rows); None when the runner has no bank
    (the programs are then those of a model without adapters)."""
    if not self.has_adapters:
      return None
    index = np.full(rows, -1, np.int32)
    for r, seq in enumerate(seqs):
      if seq is not None:
        index[r] = seq.adapter
    return index

  def table_width(self, pages: int) -> int:
    """The compiled page-table width for a widest table of `pages`: a power of two, capped at max_pages."""
    return min(next_power_of_two(pages), self.pages.max_pages)

  def _page_table(self, seqs: Sequence[Seq | None], rows: int) -> np.ndarray:
    """[rows, P] page tables, P the widest table rounded by `table_width` (few compiled widths)."""
    width = self.table_width(max(len(s.pages.pages) for s in seqs if s is not None))
    table = np.zeros((rows, width), np.int32)
    for r, seq in enumerate(seqs):
      if seq is not None:
        table[r] = seq.pages.page_row(width)
    return table

  def _vision_rows(self, call: PrefillCall, rows: int) -> VisionInputs:
    """A Qwen2.5-VL model's packed prefill inputs: each row's chunk's `_vision_chunk`, features stacked (row r's
    index shifted by r * width)."""
    width = call.width
    positions = np.zeros((3, rows, width), np.int32)
    features = np.zeros((rows * width, self.cfg.hidden_size), np.float32)
    index = np.full((rows, width), -1, np.int32)
    for r, row in enumerate(call.rows):
      part = self._vision_chunk(row.seq, row.start, width)
      positions[:, r] = part.rope_positions[:, 0]
      features[r * width:(r + 1) * width] = part.features
      index[r] = np.where(part.index[0] >= 0, part.index[0] + r * width, -1)
    return VisionInputs(positions, None, features, index)

  def _vision_chunk(self, seq: Seq, start: int, width: int) -> VisionInputs:
    """A Qwen2.5-VL model's extra prefill inputs for prompt tokens [start, start + width): 3D positions and the
    vision features of the chunk's pad tokens (index -1: text)."""
    positions = np.zeros((3, 1, width), np.int32)
    features = np.zeros((width, self.cfg.hidden_size), np.float32)
    index = np.full((1, width), -1, np.int32)
    if seq.media is None:  # text on a VL model: the same position on all three axes
      positions[:] = start + np.arange(width)
      return VisionInputs(positions, None, features, index)
    vision = seq.media.prompt
    part = vision.positions[:, start:start + width]
    positions[:, 0, :part.shape[1]] = part
    # Past the prompt (a resumed sequence's generated tokens, then padding): text positions, cache + rope offset.
    positions[:, 0, part.shape[1]:] = start + np.arange(part.shape[1], width) + vision.rope_offset
    offset = 0
    for first, v in zip(vision.starts, vision.visuals):  # features row of each pad token of this chunk
      lo, hi = max(first, start), min(first + v.num_tokens, start + width)
      if lo < hi:
        features[lo - start:hi - start] = seq.media.features[offset + lo - first:offset + hi - first]
        index[0, lo - start:hi - start] = np.arange(lo - start, hi - start)
      offset += v.num_tokens
    return VisionInputs(positions, None, features, index)

  # ---- warm-up -------------------------------------------------------------------------------------------

  def program_shapes(self, constrained: bool = False) -> dict[str, list[tuple]]:
    """Every shape the programs can be called with (rows x tokens x page-table width for prefill, page-table width
    for decode, padded prompt size for first tokens and restores): the bound on what a job of any length compiles,
    per sampling variant (and, for prefill, twice as many with prompt log-probabilities). constrained: also the
    masked variants, "masked_decode" (steps, page-table width), steps decode_steps and 1 (a block of
    grammar-constrained slots only), and "masked_first_token" (padded prompt size), per sampling variant."""
    max_pages, context_len = self.pages.max_pages, self.pages.context_len
    widths = sorted({self.table_width(p) for p in range(1, max_pages + 1)})
    prefill = []
    for w in self.buckets.sizes:  # rows: the padded counts of every group size that fits
      rows = sorted({next_power_of_two(n) for n in range(1, self.max_batch_size + 1)
                     if rows_fit(n, w, self.buckets, self.max_batch_size)})
      least = self.table_width(pages_needed(w, self.pages.page_size))
      prefill += [(r, w, p) for r in rows for p in widths if p >= least]
    pads = sorted({_pad_width(n) for n in (1 << i for i in range(context_len.bit_length() + 1)) if n <= context_len})
    copy = [self.max_batch_size] if self.prefix_caching else []  # pairs per copy_pages call
    shapes = {"prefill": prefill, "decode": widths, "first_token": pads, "restore_slot": pads, "copy_pages": copy}
    if constrained:
      steps = sorted({self.decode_steps, 1})
      shapes.update(masked_decode=[(k, p) for k in steps for p in widths], masked_first_token=pads)
    return shapes

  def warm_up(self, prompt_logprobs: bool = False, constrained: bool = False, top_logprobs: bool = False) -> int:
    """Compiles every program `program_shapes` lists, with inputs that write nothing (see `Engine.warm_up`);
    returns how many program variants it ran."""
    shapes, b = self.program_shapes(constrained), self.max_batch_size
    count = 0
    with self.on_mesh():
      for r, w, p in shapes["prefill"]:
        batch = PagedBatch(np.zeros((r, w), np.int32), np.zeros(r, np.int32),
                           PagedInputs(np.full((r, w), -1, np.int32), np.zeros((r, p), np.int32),
                                       np.zeros(r, np.int32)), np.zeros(r, np.int32),
                           adapter=self._adapter_rows([], r))
        vision = None
        if self.vl_cfg is not None:
          features = np.zeros((r * w, self.cfg.hidden_size), np.float32)
          vision = VisionInputs(np.zeros((3, r, w), np.int32), None, features, np.full((r, w), -1, np.int32))
        for targets in (None, np.full((r, w), -1, np.int32)) if prompt_logprobs else (None,):
          logits, *_, self.cache = programs.paged_prefill(self.graphdef, self.params, self.cache,
                                                          dataclasses.replace(batch, targets=targets), vision,
                                                          impl=self.attention_impl)
          logits[0:1].block_until_ready()  # the engine slices each row's logits: that slice per row count
          count += 1
      idle = self._decode_inputs([None] * b)
      variants = (GREEDY, SAMPLE, FULL)
      if top_logprobs:
        variants += tuple(dataclasses.replace(n, top_logprobs=True) for n in variants)
      for needs in variants:
        count += self._warm_up_decode(shapes, needs, idle, [(self.decode_steps, p) for p in shapes["decode"]],
                                      shapes["first_token"])
        if constrained:
          masked = dataclasses.replace(idle, mask=self._masks([None] * b))
          count += self._warm_up_decode(shapes, dataclasses.replace(needs, masked=True), masked,
                                        shapes["masked_decode"], shapes["masked_first_token"])
      for pad in shapes["restore_slot"]:
        self.slots = programs.restore_slot(self.slots, np.int32(0), np.zeros(pad, np.int32), np.int32(0),
                                           np.zeros(pad, np.int32), np.int32(0))
        count += 1
      for pairs in shapes["copy_pages"]:  # every destination -1: copies nothing
        self.cache = programs.copy_pages(self.cache, np.zeros(pairs, np.int32), np.full(pairs, -1, np.int32))
        count += 1
    return count

  def _warm_up_decode(self, shapes: dict, needs: sampling_lib.SamplingNeeds, idle: DecodeInputs,
                      blocks: list[tuple[int, int]], pads: list[int]) -> int:
    """One sampling variant's decode blocks (steps, page-table width) and first-token shapes (padded prompt
    size), run with idle slots; returns how many."""
    b, v = self.max_batch_size, self.cfg.vocab_size
    for k, p in blocks:
      inputs = PagedDecodeInputs(idle, np.zeros(b, np.int32), np.zeros((b, p), np.int32), np.zeros(b, np.int32))
      *_, self.cache, self.slots = programs.paged_decode_block(self.graphdef, self.params, self.cache, self.slots,
                                                               inputs, needs=needs, num_steps=k,
                                                               impl=self.attention_impl)
    for pad in pads:
      inputs = FirstTokenInputs(np.int32(0), np.zeros(pad, np.int32), np.int32(1), sampling_lib.pack(
          [SamplingParams()], sample_indices=[0], seeds=[0]), self._masks([None]) if needs.masked else None)
      _, _, self.slots = programs.first_token(np.zeros((1, v), np.float32), self.slots, inputs, needs=needs)
    return len(blocks) + len(pads)


def _pad_width(n: int) -> int:
  """The padded size of a first-token prompt or a restored history: powers of two from 16 (few shapes)."""
  return max(16, next_power_of_two(n))


def _padded(ids: list[int], width: int | None = None) -> np.ndarray:
  """ids as int32, zero-padded to `width` (default `_pad_width(len(ids))`)."""
  width = _pad_width(len(ids)) if width is None else width
  return np.pad(np.asarray(ids, np.int32), (0, width - len(ids)))


def _targets(scored: list[list[int]], rows: int, width: int) -> np.ndarray | None:
  """A prefill call's `targets` [rows, width]: row r's `Sequence.targets` of its chunk (scored[r]), -1 past them
  and in padding rows; None when no row scores anything (the call then runs the program without scoring)."""
  if not any(scored):
    return None
  targets = np.full((rows, width), -1, np.int32)
  for r, t in enumerate(scored):
    targets[r, :len(t)] = t
  return targets
