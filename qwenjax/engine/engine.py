"""Continuous batching over a fixed set of decode slots.

    engine = Engine.load("default", max_batch_size=8)
    outs = engine.generate(["def fib(n):", {"messages": [{"role": "user", "content": "Hi"}]}],
                           SamplingParams(max_tokens=64))
    for event in engine.stream(requests): ...

The engine holds one KV cache of B = max_batch_size rows (slots) and S = max_seq_len positions. Each scheduler
iteration
  1. admits waiting sequences into free slots: the prompt is prefilled straight into that slot's cache row, in
     length buckets (chunked past the largest one), and its first token is sampled;
  2. advances every slot `decode_steps` tokens in one jitted call (a `fori_loop` of decode + sample); stops that
     the device can see (end-of-sequence and stop token ids, max_tokens) end a row exactly where they occur;
  3. on the host, appends the tokens, detokenizes incrementally, cuts stop strings, and frees finished slots at
     once for the next waiting sequence.
Programs compile once per prefill bucket and once per decode variant (greedy, or sampling with filters and
penalties); no request shape compiles anything after warm-up. They live in `qwenjax.engine.programs`
(`prefill_rows`, `first_token`, `decode_block`); the engine holds their device state (the cache and the
`SlotState`) and does the host-side rest. What requests are, and what comes back, is `qwenjax.engine.requests`.

With a device mesh (`Engine(..., mesh=qwenjax.parallel.sharding.mesh_from_flags("data:2,tensor:4"))`) the weights, the
cache and the [B, V] slot state are placed by `qwenjax.parallel.sharding`'s rules (slots over data, heads, MLP and
vocabulary over tensor) and every jitted step returns them in the layout they came in.

Shapes: B slots, S cache positions, T prefill bucket, V vocabulary, E stop ids per slot, k decode steps per call.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from qwenjax._errors import InputError
from qwenjax.engine import programs
from qwenjax.engine import sampling as sampling_lib
from qwenjax.engine.buckets import LengthBuckets, next_power_of_two
from qwenjax.engine.programs import DecodeInputs, FirstTokenInputs, SlotState, TokenBatch, VisionInputs
from qwenjax.engine.requests import Completion, Request, RequestOutput, StreamEvent, as_request, checked_message
from qwenjax.engine.sampling import SamplingParams
from qwenjax.model import qwen2_vl
from qwenjax.model.decoder import Qwen2
from qwenjax.model.kv_cache import KVCache
from qwenjax.multimodal import processing
from qwenjax.multimodal.positions import VLPrompt, vl_prompt
from qwenjax.parallel import sharding
from qwenjax.parallel.axes import DEFAULT_RULES, ShardingRules
from qwenjax.text.tokenizer import Tokenizer


@dataclasses.dataclass
class _Sequence:
  """Host-side state of one sequence while it waits or decodes."""

  request_index: int
  sample_index: int
  prompt: list[int]
  params: SamplingParams
  seed: int
  stop_ids: frozenset[int]
  max_tokens: int
  vision: VLPrompt | None = None  # a multimodal prompt's positions and images
  features: np.ndarray | None = None  # [M, D] its vision features, shared by the request's n samples
  decoder: Any = None
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: str | None = None
  emitted_tokens: int = 0  # tokens and text already streamed
  emitted_text: int = 0
  searched_text: int = 0  # text already searched for stop strings


# Decode variants, a static jit argument, three of them so that the compiled programs stay few: a greedy batch
# skips filters and penalties entirely; penalties (which touch [B, V] counts) only when some request asks.
_GREEDY = sampling_lib.SamplingNeeds(sampling=False, top_k=False, top_p=False, min_p=False, penalties=False)
_SAMPLE = sampling_lib.SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=False)
_FULL = sampling_lib.SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=True)


def _needs_of(params: Iterable[SamplingParams]) -> sampling_lib.SamplingNeeds:
  needs = sampling_lib.pack(list(params)).needs
  if needs.penalties:
    return _FULL
  return _SAMPLE if needs.sampling else _GREEDY


class Engine:
  """Continuous-batching generation for one loaded model.

  tokenizer: renders chat messages, encodes text prompts, decodes completions; None: token ids only.
  max_batch_size: decode slots (B). max_seq_len: cache positions per slot (prompt plus generated tokens).
  max_prefill_chunk: the largest prefill bucket; longer prompts are prefilled in chunks of it.
  decode_steps: decode steps per jitted call (fewer dispatches; a finished slot waits at most that many steps).
  image_processor: how a Qwen2.5-VL model's images are resized (its preprocessor_config.json; None: Qwen's
    released defaults).
  mesh: a device mesh (`qwenjax.parallel.sharding.make_mesh` / `mesh_from_flags`) to shard the weights (in place, unless
    loaded onto it already), the KV cache and the slot state over, by `rules`; None: one device. A mesh may span
    several processes (hosts): each then runs the same requests in lockstep and sees the same tokens.
  seed: seeds the per-request seeds of requests that set none (default: fresh entropy); processes that share a
    mesh must pass the same one.
  """

  def __init__(self, model: Qwen2, tokenizer: Tokenizer | None, *, max_batch_size: int = 8, max_seq_len: int = 4096,
               max_prefill_chunk: int = 512, decode_steps: int = 4, eos_token_ids: Iterable[int] | None = None,
               image_processor: processing.ImageProcessorConfig | None = None,
               mesh: jax.sharding.Mesh | None = None, rules: ShardingRules = DEFAULT_RULES,
               seed: int | None = None):
    self.model, self.tokenizer = model, tokenizer
    self.mesh, self.rules = mesh, rules
    if mesh is not None:
      sharding.shard_model(model, mesh, rules)
    self.cfg = model.cfg
    self.vl_cfg = model.vl_cfg if isinstance(model, qwen2_vl.Qwen2VL) else None
    self.image_processor = image_processor or processing.ImageProcessorConfig()
    self.patch_buckets = qwen2_vl.patch_buckets(self.image_processor)
    self.graphdef, self.params = nnx.split(model)
    self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
    self.decode_steps = decode_steps
    self.buckets = LengthBuckets(maximum=min(max_prefill_chunk, max_seq_len),
                                 minimum=min(16, max_prefill_chunk, max_seq_len))
    if eos_token_ids is None:  # the tokenizer's (generation_config, <|im_end|>) and the model config's
      eos_token_ids = set(self.cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
    self.eos_token_ids = frozenset(eos_token_ids)
    b, v = max_batch_size, self.cfg.vocab_size
    # Headroom of one prefill chunk past the context: a padded last chunk is written whole, never clamped.
    cache_len = max_seq_len + self.buckets.maximum
    cache_sharding = slot_sharding = None
    if mesh is not None:
      cache_sharding = sharding.cache_sharding(self.cfg, mesh, b, cache_len, rules)
      slot_sharding = sharding.named_sharding(mesh, SlotState.AXES, (b, v), rules)
    self._cache = KVCache.zeros(self.cfg, b, cache_len, model.dtype, sharding=cache_sharding)
    self._slots = SlotState.zeros(b, v, slot_sharding)
    self._seed_rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
    self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "decode_calls": 0, "prefill_calls": 0}

  @classmethod
  def load(cls, model: str | None = "default", *, dtype: str = "float32", scan_layers: bool | None = None,
           mesh: jax.sharding.Mesh | None = None, rules: ShardingRules = DEFAULT_RULES,
           **kwargs) -> Engine:
    """Loads `model` (see `qwenjax.load`; with a mesh, each weight straight into its shards) into an Engine."""
    from qwenjax.checkpoints.loader import load  # pylint: disable=g-import-not-at-top

    loaded = load(model, dtype=dtype, scan_layers=scan_layers, mesh=mesh, rules=rules)
    kwargs.setdefault("image_processor", loaded.image_processor)
    return cls(loaded.model, loaded.tokenizer, mesh=mesh, rules=rules, **kwargs)

  def _on_mesh(self):
    """The context every jitted call of this engine runs in: its mesh and rules (nothing without a mesh)."""
    return sharding.use_mesh(self.mesh, self.rules)

  # ---- requests -------------------------------------------------------------------------------------------

  def prepare(self, request: Request | str | Sequence[int] | dict) -> list[int] | VLPrompt:
    """A request's prompt as token ids, or, with images or videos, as a `VLPrompt` (ids with one pad per merged
    patch, 3D positions, preprocessed images). InputError for anything malformed, unreadable or too long."""
    request = as_request(request)
    if self.tokenizer is None and (request.messages is not None or isinstance(request.prompt, str)):
      raise InputError("this engine has no tokenizer: prompts must be token ids.")
    if request.messages is not None and (request.images or request.videos):
      raise InputError("'images' and 'videos' go with a raw 'prompt'; with 'messages', give them as content parts.")
    visuals = []  # (kind, source) in the order their pads appear
    messages = None if request.messages is None else [checked_message(i, m, visuals, join_text=self.vl_cfg is None)
                                                      for i, m in enumerate(request.messages)]
    if self.vl_cfg is None and (visuals or request.images or request.videos):
      raise InputError(f"this model ({type(self.model).__name__}) takes no images or videos.")
    if messages is not None:
      ids = self.tokenizer.apply_chat_template(messages, tools=request.tools, add_generation_prompt=True,
                                               tokenize=True)
    elif isinstance(request.prompt, str):
      ids = self.tokenizer.encode(request.prompt)
    elif request.prompt is not None:
      ids = [int(t) for t in request.prompt]
      bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
      if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size}).")
    else:
      raise InputError("a request needs a 'prompt' or 'messages'.")
    if request.messages is None and (request.images or request.videos):
      visuals = self._raw_prompt_visuals(ids, list(request.images or ()), list(request.videos or ()))
    if not ids:
      raise InputError("the prompt is empty.")
    prompt = ids
    if visuals:
      prompt = vl_prompt(ids, [self._preprocess(kind, source) for kind, source in visuals], self.vl_cfg)
    elif self.vl_cfg is not None and any(t in (self.vl_cfg.image_token_id, self.vl_cfg.video_token_id) for t in ids):
      raise InputError("the prompt holds image or video pad tokens but no images or videos were given.")
    n = len(_ids(prompt))
    if n >= self.max_seq_len:
      raise InputError(f"the prompt has {n} tokens; the context holds {self.max_seq_len} "
                       "(prompt plus at least one generated token).")
    return prompt

  def _raw_prompt_visuals(self, ids: list[int], images: list, videos: list) -> list:
    visuals = []
    for t in ids:
      if t in (self.vl_cfg.image_token_id, self.vl_cfg.video_token_id):
        pool, kind = (images, "image") if t == self.vl_cfg.image_token_id else (videos, "video")
        if not pool:
          raise InputError(f"the prompt has more <|{kind}_pad|> tokens than {kind}s given.")
        visuals.append((kind, pool.pop(0)))
    if images or videos:
      raise InputError(f"{len(images)} image(s) and {len(videos)} video(s) have no <|image_pad|> / <|video_pad|> "
                       "token in the prompt.")
    return visuals

  def _preprocess(self, kind: str, source) -> processing.VisualInput:
    if kind == "image":
      return processing.preprocess_image(source, self.image_processor)
    return processing.preprocess_video(source, self.image_processor)

  def generate(self, requests: Sequence[Request | str | Sequence[int] | dict],
               sampling: SamplingParams | None = None) -> list[RequestOutput]:
    """Generates for every request, in order. `sampling` is the default for requests that carry none.

    Every request is validated first: a malformed one raises InputError before any work starts."""
    requests = [as_request(r) for r in requests]
    items = [(i, r, self.prepare(r)) for i, r in enumerate(requests)]
    outputs = [None] * len(items)
    for i, out in self.serve(items, sampling):
      outputs[i] = out
    return outputs

  def serve(self, items: Iterable[tuple[Any, Request, list[int] | VLPrompt]],
            sampling: SamplingParams | None = None) -> Iterator[tuple[Any, RequestOutput]]:
    """Continuous batching over a stream of (key, request, `prepare(request)`): yields (key, output) as each request
    completes (all n samples), pulling the next request whenever a slot frees. For jobs of any size."""
    pending: dict[int, tuple[Any, RequestOutput, int]] = {}
    keyed = self._keyed(items, pending, sampling)
    for seq in self._run(keyed, sampling):
      key, out, left = pending[seq.request_index]
      out.outputs.append(Completion(seq.text, seq.tokens, seq.finish_reason, seq.sample_index,
                                    seq.logprobs if seq.params.logprobs else None))
      if left == 1:
        del pending[seq.request_index]
        out.outputs.sort(key=lambda c: c.index)
        yield key, out
      else:
        pending[seq.request_index] = (key, out, left - 1)

  def stream(self, requests: Sequence[Request | str | Sequence[int] | dict],
             sampling: SamplingParams | None = None) -> Iterator[StreamEvent]:
    """Yields text and tokens as they are produced; `request_index` is the position in `requests`."""
    requests = [as_request(r) for r in requests]
    items = [(i, r, self.prepare(r)) for i, r in enumerate(requests)]
    yield from self._run(iter(items), sampling, events=True)

  # ---- scheduler -------------------------------------------------------------------------------------------

  @staticmethod
  def _keyed(items, pending, default):
    for index, (key, request, prompt) in enumerate(items):
      n = (request.sampling or default or SamplingParams()).n
      pending[index] = (key, RequestOutput(request.id, len(_ids(prompt)), []), n)
      yield index, request, prompt

  def _sequences(self, index: int, req: Request, prompt: list[int] | VLPrompt,
                 default: SamplingParams | None) -> list[_Sequence]:
    params = req.sampling or default or SamplingParams()
    vision = prompt if isinstance(prompt, VLPrompt) else None
    features = None
    if vision is not None:  # once per request: its n samples share the features
      with self._on_mesh():
        features = qwen2_vl.encode_visuals(self.model.visual, vision.visuals, self.patch_buckets)
    prompt = _ids(prompt)
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
    # The context bounds generation: a sequence that fills it ends with finish_reason "length".
    max_tokens = min(params.max_tokens, self.max_seq_len - len(prompt))
    seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**31))
    return [_Sequence(index, j, prompt, params, seed, stop_ids, max_tokens, vision, features,
                      decoder=self.tokenizer.stream(skip_special_tokens=True) if self.tokenizer else _NoText())
            for j in range(params.n)]

  def _run(self, items: Iterator[tuple[int, Request, Any]], default, events: bool = False) -> Iterator[Any]:
    """Runs sequences to completion, pulling requests from `items` as slots free up. Yields each finished
    _Sequence, or StreamEvents if `events`."""
    waiting: list[_Sequence] = []  # the current request's samples not yet admitted, reversed
    slots: list[_Sequence | None] = [None] * self.max_batch_size
    while True:
      for s in range(self.max_batch_size):  # 1. admit into free slots
        while slots[s] is None:
          if not waiting:
            item = next(items, None)
            if item is None:
              break
            waiting = self._sequences(*item, default)[::-1]
          seq = waiting.pop()
          first, logprob = self._admit(seq, s)
          slots[s] = seq
          yield from self._accept(seq, [first], [logprob], events)
          if seq.finish_reason:
            slots[s] = None
      active = [s for s in range(self.max_batch_size) if slots[s] is not None]
      if not active:
        return
      out_tok, out_lp = self._decode(slots)  # 2. advance every slot
      for s in active:  # 3. host-side bookkeeping
        seq = slots[s]
        column = out_tok[:, s]
        n = int(np.argmax(column < 0)) if (column < 0).any() else len(column)
        yield from self._accept(seq, column[:n].tolist(), out_lp[:n, s].tolist(), events)
        if seq.finish_reason:
          slots[s] = None

  def _admit(self, seq: _Sequence, slot: int) -> tuple[int, float]:
    """Prefills seq's prompt into `slot` (chunked past the largest bucket); returns its first token."""
    prompt, chunk = seq.prompt, self.buckets.maximum
    rows = np.array([slot], np.int32)
    for start in range(0, len(prompt), chunk):
      piece = prompt[start:start + chunk]
      tokens = np.zeros((1, self.buckets.bucket(len(piece))), np.int32)
      tokens[0, :len(piece)] = piece
      vision = self._vision_chunk(seq, start, tokens.shape[1]) if self.vl_cfg is not None else None
      with self._on_mesh():
        logits, self._cache = programs.prefill_rows(self.graphdef, self.params, self._cache,
                                                    TokenBatch(tokens, np.array([len(piece)], np.int32), rows),
                                                    vision, fresh=start == 0)
      self.stats["prefill_calls"] += 1
    self.stats["prompt_tokens"] += len(prompt)
    padded = np.zeros(max(16, next_power_of_two(len(prompt))), np.int32)  # powers of two: few compiled shapes
    padded[:len(prompt)] = prompt
    inputs = FirstTokenInputs(np.int32(slot), padded, np.int32(len(prompt)),
                              sampling_lib.pack([seq.params], sample_indices=[seq.sample_index], seeds=[seq.seed]))
    with self._on_mesh():
      tok, logprob, self._slots = programs.first_token(logits, self._slots, inputs, needs=_needs_of([seq.params]))
    return int(tok), float(logprob)

  def _vision_chunk(self, seq: _Sequence, start: int, width: int) -> VisionInputs:
    """A Qwen2.5-VL model's extra prefill inputs for prompt tokens [start, start + width): 3D positions, the
    rotary offset after the prompt, and the vision features of the chunk's pad tokens (index -1: text)."""
    positions = np.zeros((3, 1, width), np.int32)
    features = np.zeros((width, self.cfg.hidden_size), np.float32)
    index = np.full((1, width), -1, np.int32)
    if seq.vision is None:  # text on a VL model: the same position on all three axes
      positions[:] = start + np.arange(width)
      return VisionInputs(positions, np.zeros(1, np.int32), features, index)
    vision = seq.vision
    part = vision.positions[:, start:start + width]
    positions[:, 0, :part.shape[1]] = part
    positions[:, 0, part.shape[1]:] = part.max() + 1 + np.arange(width - part.shape[1])  # padding, never read
    offset = 0
    for first, v in zip(vision.starts, vision.visuals):  # features row of each pad token of this chunk
      lo, hi = max(first, start), min(first + v.num_tokens, start + width)
      if lo < hi:
        features[lo - start:hi - start] = seq.features[offset + lo - first:offset + hi - first]
        index[0, lo - start:hi - start] = np.arange(lo - start, hi - start)
      offset += v.num_tokens
    return VisionInputs(positions, np.array([vision.rope_offset], np.int32), features, index)

  def _decode(self, slots: list[_Sequence | None]) -> tuple[np.ndarray, np.ndarray]:
    b = self.max_batch_size
    live = [s for s in slots if s is not None]
    tokens, step, budget = (np.zeros(b, np.int32) for _ in range(3))
    active = np.zeros(b, bool)
    width = next_power_of_two(max(8, max(len(s.stop_ids) for s in live)))
    stop_ids = np.full((b, width), -1, np.int32)
    for i, seq in enumerate(slots):
      if seq is None:
        continue
      tokens[i], step[i], budget[i], active[i] = seq.tokens[-1], len(seq.tokens), seq.max_tokens - len(seq.tokens), True
      stop_ids[i, :len(seq.stop_ids)] = sorted(seq.stop_ids)
    arrays = sampling_lib.pack([s.params if s else None for s in slots],
                               sample_indices=[s.sample_index if s else 0 for s in slots],
                               seeds=[s.seed if s else 0 for s in slots])
    inputs = DecodeInputs(tokens, step, active, budget, stop_ids, arrays)
    with self._on_mesh():
      out_tok, out_lp, self._cache, self._slots = programs.decode_block(
          self.graphdef, self.params, self._cache, self._slots, inputs, needs=_needs_of(s.params for s in live),
          num_steps=self.decode_steps, kv_len=self._kv_len(live))
    self.stats["decode_calls"] += 1
    return np.asarray(out_tok), np.asarray(out_lp)

  def _kv_len(self, live: list[_Sequence]) -> int:
    """The cache positions this decode call can touch, rounded up to a power of two (few compiled variants)."""
    furthest = max(len(s.prompt) + len(s.tokens) for s in live) + self.decode_steps
    return min(self.max_seq_len, max(128, next_power_of_two(furthest)))

  def _accept(self, seq: _Sequence, tokens: list[int], logprobs: list[float], events: bool) -> Iterator[Any]:
    """Appends tokens to seq, applying every stop condition exactly; yields what the caller asked for."""
    for tok, lp in zip(tokens, logprobs):
      seq.tokens.append(tok)
      seq.logprobs.append(lp)
      self.stats["generated_tokens"] += 1
      if tok in seq.stop_ids:
        seq.finish_reason = "stop"
        break
      seq.text += seq.decoder.add(tok)
      if seq.params.stop and self._cut_stop_string(seq):
        break
      if len(seq.tokens) >= seq.max_tokens:
        seq.finish_reason = "length"
        break
    if events:
      upto = len(seq.text)
      if seq.params.stop and seq.finish_reason is None:  # hold back what may yet begin a stop string
        upto = max(seq.emitted_text, upto - max(len(s) for s in seq.params.stop) + 1)
      event = StreamEvent(seq.request_index, seq.sample_index, seq.tokens[seq.emitted_tokens:],
                          seq.text[seq.emitted_text:upto], seq.finish_reason)
      seq.emitted_tokens, seq.emitted_text = len(seq.tokens), upto
      if event.token_ids or event.finish_reason:
        yield event
    elif seq.finish_reason:
      yield seq

  @staticmethod
  def _cut_stop_string(seq: _Sequence) -> bool:
    """Ends seq at the first stop string in its text (which may span several tokens); the text is cut before it."""
    start = max(0, seq.searched_text - max(len(s) for s in seq.params.stop) + 1)
    hits = [i for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
    seq.searched_text = len(seq.text)
    if not hits:
      return False
    seq.text = seq.text[:min(hits)]
    seq.finish_reason = "stop"
    return True


class _NoText:
  """Stands in for a stream decoder when the engine has no tokenizer: completions carry token ids only."""

  def add(self, token_id: int) -> str:
    del token_id
    return ""


def _ids(prompt: list[int] | VLPrompt) -> list[int]:
  return prompt.ids if isinstance(prompt, VLPrompt) else prompt

