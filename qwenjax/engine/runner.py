"""The model runner: the scheduler's plans in, device calls out. It holds everything on the device.

    runner = ModelRunner(model, max_batch_size=8, ...)
    runner.copy_pages(admission.copies)
    runner.encode_visuals(admission.seqs)               # a multimodal prompt's vision tower, at first admission
    runner.admit(admission.seqs)                        # their slots' penalty state
    tokens, logprobs = runner.step(plan)                # a ragged step (StepPlan): [B] each, -1 where none sampled
    tokens, logprobs = runner.decode(plan)              # a decode block (DecodePlan), [k, B] each
    tokens, logprobs, drafted = runner.verify(plan)     # a speculative step (VerifyPlan), [W, B] each

It owns the weights (split once), the `PagedKVCache` (sized from a memory budget, `kv_pages`) and the per-slot
penalty state (`SlotState`), which every jitted program of `qwenjax.engine.programs` donates and returns; it turns
the plain data of a plan into those programs' named inputs (a flat token axis padded to a length bucket, page
tables max_pages wide, padded prompts) and owns warm-up and `program_shapes`, the bound on what it compiles.

Shapes: B slots, T step tokens (B + C, C the prefill part), Q block, P max pages, V vocabulary, D hidden size,
W mask words, k decode steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.engine import constraints as constraints_lib
from qwenjax.engine import profiling, programs
from qwenjax.engine import sampling as sampling_lib
from qwenjax.engine.kv_pages import KVPages
from qwenjax.engine.programs import DecodeInputs, PagedDecodeInputs, SlotState, VerifyInputs, VisionInputs
from qwenjax.engine.sampling_params import SamplingParams
from qwenjax.engine.scheduler import DecodePlan, StepPlan, VerifyPlan
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
  verify_widths: a speculative engine's verify widths (`SpeculativeConfig.widths`); () for none.
  draft: a speculative engine's draft model: it takes every token the target does, into a pool of its own with the
    target's page ids, and proposes in the verify programs; draft_sampled: it draws a sampling slot's proposals
    by the slot's settings (`programs.paged_verify`), else proposes greedily.
  """

  def __init__(self, model: Qwen2, *, bank: LoraBank | None, max_batch_size: int, max_seq_len: int,
               buckets: LengthBuckets, decode_steps: int, page_size: int | None, kv_cache_memory: float | None,
               kv_cache_dtype: str | None, attention_impl: str | None, prefix_caching: bool,
               image_processor: processing.ImageProcessorConfig, mesh: jax.sharding.Mesh | None,
               rules: ShardingRules = DEFAULT_RULES, verify_widths: tuple[int, ...] = (),
               draft: Qwen2 | None = None, draft_sampled: bool = False):
    self.mesh, self.rules, self.cfg = mesh, rules, model.cfg
    profiling.trim_after_compilations()  # the compiler's freed heap goes back to the system
    self.verify_widths = tuple(verify_widths)
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
    self.draft_graphdef = self.draft_params = self.draft_cache = None
    # paged_verify's static draft_sampled, passed only with a draft (the programs' one variant per engine)
    self.verify_kwargs = dict(draft_sampled=True) if draft is not None and draft_sampled else {}
    if draft is not None:
      if mesh is not None:
        sharding.shard_model(draft, mesh, rules)
      self.draft_graphdef, self.draft_params = nnx.split(draft)
      self.draft_cache = self.pages.for_draft(draft, mesh, rules).zeros()
    self.stats = {"prompt_tokens": 0, "prefill_calls": 0, "decode_calls": 0}
    if self.verify_widths:
      self.stats["verify_calls"] = 0

  def _call(self, program, *args, **kwargs) -> tuple:
    """program(*args, **kwargs), with the draft model's arguments when there is one (its cache, returned last, is
    taken back here): the outputs the program has without a draft."""
    if self.draft_graphdef is None:
      return program(*args, **kwargs)
    *out, self.draft_cache = program(*args, **kwargs, draft_graphdef=self.draft_graphdef,
                                     draft_params=self.draft_params, draft_cache=self.draft_cache)
    return tuple(out)

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
      if self.draft_cache is not None:
        self.draft_cache = programs.copy_pages(self.draft_cache, src, dst)

  def admit(self, seqs: Iterable[Seq]) -> None:
    """Each admitted sequence's slot penalty state: its prompt's tokens, and the counts of those it had generated
    (a resumed sequence; none for a fresh one). One compiled shape: both padded to the longest context."""
    width = _pad_width(self.pages.context_len)
    for seq in seqs:
      with self.on_mesh():
        self.slots = programs.restore_slot(self.slots, np.int32(seq.slot), _padded(seq.prompt, width),
                                           np.int32(len(seq.prompt)), _padded(seq.tokens, width),
                                           np.int32(len(seq.tokens)))

  def step(self, plan: StepPlan) -> tuple[np.ndarray, np.ndarray]:
    """One ragged step (`programs.ragged_step`): the plan's decode rows in their slots, then its chunks, block
    aligned, T = B + plan.width tokens; scores the prompt tokens of the chunks that ask (`Sequence.targets`, kept
    in their `prompt_logprobs`). Returns tokens [B] (-1 where a slot did not sample: a chunk that does not end
    its context, a resumed sequence, an idle slot) and logprobs [B]."""
    b, q, c = self.max_batch_size, plan.block, plan.width
    t, rows, width = b + c, b + c // q, self.pages.max_pages
    tokens, positions, rope_offset = (np.zeros(t, np.int32) for _ in range(3))
    kv_slots, adapter = np.full((t, 1), -1, np.int32), np.full(t, -1, np.int32)
    table, num_new = np.zeros((rows, width), np.int32), np.zeros(rows, np.int32)
    sample_at, step = np.zeros(b, np.int32), np.zeros(b, np.int32)
    samplers: list[Seq | None] = [None] * b
    scored, vision = [], self._vision_step(t) if self.vl_cfg is not None else None
    for row in plan.decode:
      seq, i = row.seq, row.seq.slot
      tokens[i], positions[i], kv_slots[i, 0], rope_offset[i] = row.tokens[0], row.start, row.slots[0], seq.rope_offset
      table[i], num_new[i], adapter[i] = seq.pages.page_row(width), 1, seq.adapter
      sample_at[i], step[i], samplers[i] = i, len(seq.tokens), seq
      if vision is not None:
        vision.rope_positions[:, i, 0] = row.start + seq.rope_offset
    at = b  # the next chunk's first token
    for row in plan.chunks:
      seq, n = row.seq, len(row.tokens)
      span = -(-n // q) * q
      tokens[at:at + n], kv_slots[at:at + n, 0] = row.tokens, row.slots
      positions[at:at + span] = row.start + np.arange(span)
      rope_offset[at:at + span], adapter[at:at + n] = seq.rope_offset, seq.adapter
      first = b + (at - b) // q  # its first block's attention row
      table[first:first + span // q] = seq.pages.page_row(width)
      num_new[first:first + span // q] = np.minimum(q, n - q * np.arange(span // q))
      scored.append((seq, at, seq.targets(row.start, n)))
      if row.last and not seq.tokens:  # a fresh prompt's last chunk: its first token
        sample_at[seq.slot], step[seq.slot], samplers[seq.slot] = at + n - 1, 0, seq
      if vision is not None:
        self._vision_chunk(vision, at, seq, row.start, span)
      at += span
    live = [seq for seq in samplers if seq is not None]
    masked = any(seq.constraint is not None for seq in live)
    arrays = sampling_lib.pack([seq.params if seq else None for seq in samplers],
                               sample_indices=[seq.sample_index if seq else 0 for seq in samplers],
                               seeds=[seq.seed if seq else 0 for seq in samplers])
    targets = None
    if any(target for _, _, target in scored):
      targets = np.full(t, -1, np.int32)
      for _, at, target in scored:
        targets[at:at + len(target)] = target
    batch = programs.RaggedBatch(tokens, positions, PagedInputs(kv_slots, table, num_new), rope_offset, sample_at,
                                 adapter if self.has_adapters else None, targets)
    draw = programs.SampleInputs(np.array([seq is not None for seq in samplers]), step, arrays,
                                 self._masks(samplers) if masked else None)
    needs = dataclasses.replace(needs_of(seq.params for seq in live), masked=masked)
    with self.on_mesh():
      logits, *scores, self.cache = self._call(programs.ragged_step, self.graphdef, self.params, self.cache, batch,
                                               vision, block=q, impl=self.attention_impl)
      out_tok, out_lp, self.slots = programs.sample_slots(logits, self.slots, draw, needs=needs)
    if scores:  # in prompt order: a sequence's chunks are computed in order
      values = np.asarray(scores[0])
      for seq, at, target in scored:
        if target:
          seq.prompt_logprobs.extend(values[at:at + len(target)].tolist())
    self.stats["prefill_calls"] += bool(plan.chunks)
    self.stats["decode_calls"] += bool(plan.decode)
    self.stats["prompt_tokens"] += sum(len(row.tokens) for row in plan.chunks)
    return np.asarray(out_tok), np.asarray(out_lp)

  # ---- decode --------------------------------------------------------------------------------------------

  def decode(self, plan: DecodePlan) -> tuple[np.ndarray, np.ndarray]:
    """A decode block for every slot of the plan: tokens [k, B] (-1 from where a row stopped) and logprobs."""
    inputs, needs = self._block_inputs(plan.slots)
    with self.on_mesh():
      out_tok, out_lp, self.cache, self.slots = self._call(
          programs.paged_decode_block, self.graphdef, self.params, self.cache, self.slots, inputs, needs=needs,
          num_steps=plan.num_steps, impl=self.attention_impl)
    self.stats["decode_calls"] += 1
    return np.asarray(out_tok), np.asarray(out_lp)

  def verify(self, plan: VerifyPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A speculative step (`programs.paged_verify`) for every slot of the plan: tokens [W, B] (each row's accepted
    proposals and the token after them; -1 after), logprobs, and with a draft model its proposals [B, W - 1] (the
    plan's proposals are then placeholders: how many to make); None without."""
    b = self.max_batch_size
    block, needs = self._block_inputs(plan.slots)
    drafts, num_drafts = np.full((b, plan.width - 1), -1, np.int32), np.zeros(b, np.int32)
    for i, proposal in enumerate(plan.proposals):
      drafts[i, :len(proposal)], num_drafts[i] = proposal, len(proposal)
    if needs.masked:  # each position's mask: the one that holds after the proposals before it
      d = block.decode
      masks = np.repeat(d.mask[:, None], plan.width, axis=1)  # [B, W, words]
      budget = d.budget.copy()
      for i, (seq, proposal) in enumerate(zip(plan.slots, plan.proposals)):
        if seq is not None and seq.constraint is not None and proposal:
          # The proposer proposed only what the constraint takes (`Constraint.admits`); were it to take fewer
          # now, the proposal is verified only that far.
          kept = seq.constraint.fill_along(proposal, masks[i])
          drafts[i, kept:], num_drafts[i] = -1, kept
          budget[i] = min(kept + 1, seq.remaining())  # a grammar's budget() is 1: one mask known
      block = dataclasses.replace(block, decode=dataclasses.replace(d, mask=masks, budget=budget))
    inputs = VerifyInputs(block, drafts, num_drafts)
    with self.on_mesh():
      out_tok, out_lp, self.cache, self.slots, *drafted = self._call(
          programs.paged_verify, self.graphdef, self.params, self.cache, self.slots, inputs, needs=needs,
          impl=self.attention_impl, **self.verify_kwargs)
    self.stats["decode_calls"] += 1
    self.stats["verify_calls"] += 1
    return np.asarray(out_tok), np.asarray(out_lp), np.asarray(drafted[0]) if drafted else None

  def _block_inputs(self, slots: Sequence[Seq | None]) -> tuple[PagedDecodeInputs, sampling_lib.SamplingNeeds]:
    """A decode block's or verify step's inputs for every slot: its DecodeInputs, the cache position of its last
    token, its page table and rotary offset; and the sampling variant the slots need (masked if one is
    constrained)."""
    b = self.max_batch_size
    position, rope_offset = np.zeros(b, np.int32), np.zeros(b, np.int32)
    for i, seq in enumerate(slots):
      if seq is not None:
        position[i], rope_offset[i] = len(seq.prompt) + len(seq.tokens) - 1, seq.rope_offset
    inputs = PagedDecodeInputs(self._decode_inputs(slots), position, self._page_table(slots, b), rope_offset)
    live = [s for s in slots if s is not None]
    needs = dataclasses.replace(needs_of(s.params for s in live), masked=any(s.constraint is not None for s in live))
    return inputs, needs

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

  def _page_table(self, seqs: Sequence[Seq | None], rows: int) -> np.ndarray:
    """[rows, P] page tables, P = max_pages: one width for every program (the XLA attention's work follows the
    sequences' lengths, not the table's width)."""
    table = np.zeros((rows, self.pages.max_pages), np.int32)
    for r, seq in enumerate(seqs):
      if seq is not None:
        table[r] = seq.pages.page_row(self.pages.max_pages)
    return table

  def _vision_step(self, t: int) -> VisionInputs:
    """A Qwen2.5-VL model's ragged-step inputs for T tokens, before its chunks fill theirs: rotary positions [3, T,
    1], features [T, D] and index [T, 1] (-1: every token its token embedding)."""
    return VisionInputs(np.zeros((3, t, 1), np.int32), None, np.zeros((t, self.cfg.hidden_size), np.float32),
                        np.full((t, 1), -1, np.int32))

  def _vision_chunk(self, vision: VisionInputs, at: int, seq: Seq, start: int, span: int) -> None:
    """Fills tokens [at, at + span) of `vision` (see `_vision_step`) with a chunk of seq's context from `start`: its
    3D positions and the vision features of its pad tokens."""
    positions = vision.rope_positions[:, at:at + span, 0]  # [3, span], a view
    if seq.media is None:  # text on a VL model: the same position on all three axes
      positions[:] = start + np.arange(span)
      return
    prompt = seq.media.prompt
    part = prompt.positions[:, start:start + span]
    positions[:, :part.shape[1]] = part
    # Past the prompt (a resumed sequence's generated tokens, then padding): text positions, cache + rope offset.
    positions[:, part.shape[1]:] = start + np.arange(part.shape[1], span) + prompt.rope_offset
    offset = 0
    for first, v in zip(prompt.starts, prompt.visuals):  # features row of each pad token of this chunk
      lo, hi = max(first, start), min(first + v.num_tokens, start + span)
      if lo < hi:
        vision.features[at + lo - start:at + hi - start] = seq.media.features[offset + lo - first:offset + hi - first]
        vision.index[at + lo - start:at + hi - start, 0] = np.arange(at + lo - start, at + hi - start)
      offset += v.num_tokens

  # ---- warm-up -------------------------------------------------------------------------------------------

  def program_shapes(self, constrained: bool = False) -> dict[str, list]:
    """Every shape the programs can be called with, the bound on what a job of any length compiles: "step", the
    ragged step's prefill parts (its T is max_batch_size plus one of them; twice as many programs with prompt
    log-probabilities); "sample", the sampler's slots, and "decode", the steps of a decode block, each once per
    sampling variant; "restore_slot" and "copy_pages", one shape each. Page tables are always max_pages wide.
    constrained: also "masked_sample" and "masked_decode" (steps decode_steps and 1: a block of
    grammar-constrained slots only), per variant. A speculative engine: "verify", its verify widths, and "decode"
    also 1 (the block a step whose proposals gave way to the pool runs), per variant (and "masked_verify")."""
    decode = sorted({self.decode_steps, 1}) if self.verify_widths else [self.decode_steps]
    shapes = {"step": list(self.buckets.sizes), "sample": [self.max_batch_size], "decode": decode,
              "restore_slot": [_pad_width(self.pages.context_len)],
              "copy_pages": [self.max_batch_size] if self.prefix_caching else []}
    if self.verify_widths:
      shapes["verify"] = list(self.verify_widths)
    if constrained:
      shapes.update(masked_sample=[self.max_batch_size], masked_decode=sorted({self.decode_steps, 1}))
      if self.verify_widths:
        shapes["masked_verify"] = list(self.verify_widths)
    return shapes

  def warm_up(self, prompt_logprobs: bool = False, constrained: bool = False, top_logprobs: bool = False,
              sampling: list[SamplingParams] | None = None) -> int:
    """Compiles every program `program_shapes` lists, with inputs that write nothing (see `Engine.warm_up`);
    returns how many programs it ran."""
    shapes, b = self.program_shapes(constrained), self.max_batch_size
    variants = (GREEDY, SAMPLE, FULL)
    if sampling is not None:  # only those these parameters need (`needs_of` each, top log-probabilities aside)
      variants = tuple(v for v in variants if v in {dataclasses.replace(needs_of([p]), top_logprobs=False)
                                                    for p in sampling})
    if top_logprobs:
      variants += tuple(dataclasses.replace(n, top_logprobs=True) for n in variants)
    runs = [(needs, "sample", "decode", "verify") for needs in variants]
    if constrained:
      runs += [(dataclasses.replace(needs, masked=True), "masked_sample", "masked_decode", "masked_verify")
               for needs in variants]
    count, logits = 0, None
    with self.on_mesh():
      for c in shapes["step"]:
        for scored in (False, True) if prompt_logprobs else (False,):
          logits = self._warm_up_step(c, scored)
          count += 1
      idle = self._decode_inputs([None] * b)
      for needs, samplers, blocks, verifies in runs:
        draw = programs.SampleInputs(idle.active, idle.step, idle.sampling,
                                     self._masks([None] * b) if needs.masked else None)
        for _ in shapes[samplers]:  # the step's own logits: their layout is the one a job's steps give
          *_, self.slots = programs.sample_slots(logits, self.slots, draw, needs=needs)
          count += 1
        for k in shapes[blocks]:
          inputs = PagedDecodeInputs(dataclasses.replace(idle, mask=draw.mask), np.zeros(b, np.int32),
                                     self._page_table([], b), np.zeros(b, np.int32))
          _, _, self.cache, self.slots = self._call(programs.paged_decode_block, self.graphdef, self.params,
                                                    self.cache, self.slots, inputs, needs=needs, num_steps=k,
                                                    impl=self.attention_impl)
          count += 1
        for w in shapes.get(verifies, []):
          mask = None if draw.mask is None else np.repeat(draw.mask[:, None], w, axis=1)  # a mask per position
          inputs = VerifyInputs(PagedDecodeInputs(dataclasses.replace(idle, mask=mask), np.zeros(b, np.int32),
                                                  self._page_table([], b), np.zeros(b, np.int32)),
                                np.full((b, w - 1), -1, np.int32), np.zeros(b, np.int32))
          _, _, self.cache, self.slots, *_ = self._call(programs.paged_verify, self.graphdef, self.params,
                                                        self.cache, self.slots, inputs, needs=needs,
                                                        impl=self.attention_impl, **self.verify_kwargs)
          count += 1
      for pad in shapes["restore_slot"]:
        self.slots = programs.restore_slot(self.slots, np.int32(0), np.zeros(pad, np.int32), np.int32(0),
                                           np.zeros(pad, np.int32), np.int32(0))
        count += 1
      for pairs in shapes["copy_pages"]:  # every destination -1: copies nothing
        self.cache = programs.copy_pages(self.cache, np.zeros(pairs, np.int32), np.full(pairs, -1, np.int32))
        if self.draft_cache is not None:
          self.draft_cache = programs.copy_pages(self.draft_cache, np.zeros(pairs, np.int32),
                                                 np.full(pairs, -1, np.int32))
        count += 1
    return count

  def _warm_up_step(self, c: int, scored: bool) -> jax.Array:
    """The ragged step of prefill part c, nothing written; returns its logits [B, V]."""
    b, q = self.max_batch_size, self.buckets.minimum
    t, rows = b + c, b + c // q
    batch = programs.RaggedBatch(
        np.zeros(t, np.int32), np.zeros(t, np.int32),
        PagedInputs(np.full((t, 1), -1, np.int32), self._page_table([], rows), np.zeros(rows, np.int32)),
        np.zeros(t, np.int32), np.zeros(b, np.int32), np.full(t, -1, np.int32) if self.has_adapters else None,
        np.full(t, -1, np.int32) if scored else None)
    vision = self._vision_step(t) if self.vl_cfg is not None else None
    logits, *_, self.cache = self._call(programs.ragged_step, self.graphdef, self.params, self.cache, batch, vision,
                                        block=q, impl=self.attention_impl)
    return logits


def _pad_width(n: int) -> int:
  """The padded size of a first-token prompt or a restored history: powers of two from 16 (few shapes)."""
  return max(16, next_power_of_two(n))


def _padded(ids: list[int], width: int | None = None) -> np.ndarray:
  """ids as int32, zero-padded to `width` (default `_pad_width(len(ids))`)."""
  width = _pad_width(len(ids)) if width is None else width
  return np.pad(np.asarray(ids, np.int32), (0, width - len(ids)))
