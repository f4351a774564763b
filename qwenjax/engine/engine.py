"""Continuous batching over a fixed set of decode slots and a pool of KV pages.

    engine = Engine.load("default", max_batch_size=8)
    outs = engine.generate(["def fib(n):", {"messages": [{"role": "user", "content": "Hi"}]}],
                           SamplingParams(max_tokens=64))
    for event in engine.stream(requests): ...

The engine holds B = max_batch_size decode slots and a `PagedKVCache` of pages sized from a memory budget
(`kv_cache_memory`), with one host-side page table per sequence (`qwenjax.engine.pages`). Each scheduler
iteration (`_run`)
  1. admits waiting sequences into free slots while the pool has pages for them, and prefills them together:
     each packed call takes the next chunk of several prompts, a row each (length buckets; chunks of
     max_prefill_chunk past the largest); then samples each one's first token;
  2. gives every decoding sequence pages for its next `decode_steps` tokens, preempting the most recently
     admitted ones while the pool is short (their context is recomputed when readmitted: outputs unchanged);
  3. advances every slot `decode_steps` tokens in one jitted call (a `fori_loop` of decode + sample); stops that
     the device can see (end-of-sequence and stop token ids, max_tokens) end a row exactly where they occur;
  4. on the host, appends the tokens, detokenizes incrementally, cuts stop strings, and frees finished
     sequences' slots and pages at once for the next waiting sequence.
A request with `prompt_logprobs` has its prompt scored by the prefill that runs anyway: each call whose rows ask
passes the next prompt token of every position (`targets`), and the program returns their log-probabilities
[rows, T], not the [rows, T, V] logits. Programs compile once per shape bucket and variant (decode: greedy, or
sampling with filters and penalties; prefill: scoring or not): `program_shapes` lists them, `warm_up` compiles
them, and no request shape compiles anything after that. They live in `qwenjax.engine.programs`; the engine
holds their device state (the cache and the `SlotState`) and does the host-side rest. What requests are, and
what comes back, is `qwenjax.engine.requests`.

With a device mesh (`Engine(..., mesh=qwenjax.parallel.sharding.mesh_from_flags("data:2,tensor:4"))`) the weights, the
cache and the [B, V] slot state are placed by `qwenjax.parallel.sharding`'s rules (pages and slots over data,
heads, MLP and vocabulary over tensor) and every jitted step returns them in the layout they came in.

Shapes: B slots, NP pages of PS tokens, P page-table width, T prefill bucket, V vocabulary, E stop ids per slot,
k decode steps per call.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from qwenjax._errors import CONTEXT_LENGTH_EXCEEDED, ConfigError, InputError
from qwenjax.checkpoints.peft import load_adapter
from qwenjax.engine import constraints as constraints_lib
from qwenjax.engine import programs
from qwenjax.engine import sampling as sampling_lib
from qwenjax.engine.pages import PagePool, SequencePages, common_prefix, pages_needed, prefix_hashes, prefix_root
from qwenjax.engine.programs import (
  DecodeInputs,
  FirstTokenInputs,
  PagedBatch,
  PagedDecodeInputs,
  SlotState,
  VisionInputs,
)
from qwenjax.engine.requests import Completion, Request, RequestOutput, StreamEvent, as_request, checked_message
from qwenjax.engine.sampling import SamplingParams
from qwenjax.kernels.attention import IMPLS, default_impl
from qwenjax.kernels.buckets import LengthBuckets, next_power_of_two
from qwenjax.model import lora as lora_lib
from qwenjax.model import registry
from qwenjax.model.decoder import PagedInputs, Qwen2
from qwenjax.model.kv_cache import PagedKVCache, default_page_size, page_bytes, paged_cache_sharding, pages_for_memory
from qwenjax.model.lora import Adapter, LoraBank
from qwenjax.multimodal import features as features_lib
from qwenjax.multimodal import processing
from qwenjax.multimodal.positions import VLPrompt, vl_prompt
from qwenjax.parallel import sharding
from qwenjax.parallel.axes import DEFAULT_RULES, KV_HEADS, PAGES, ShardingRules, spec_for
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
  top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # params.top_logprobs > 0
  # Asked for (params.prompt_logprobs; sample 0 only, the request's n samples share a prompt): the log-probability
  # of prompt tokens 1, 2, ... given those before them, as its prefill chunks score them; None: not asked.
  prompt_logprobs: list[float] | None = None
  text: str = ""
  finish_reason: str | None = None
  emitted_tokens: int = 0  # tokens and text already streamed
  emitted_text: int = 0
  searched_text: int = 0  # text already searched for stop strings
  pages: SequencePages | None = None  # the pages it holds while admitted
  # Prefix caching: the root its page hashes chain from (`pages.prefix_root` of its images' and videos' digest;
  # None until first admitted), and the prompt tokens its first admission read from shared pages, not computed.
  prefix_root: bytes | None = None
  prefix_hashes: list[bytes] | None = None  # its context's full-page digests at its latest admission
  cached_tokens: int = 0
  admitted: int = 0  # admission order (the most recent is preempted first)
  preemptions: int = 0
  # Its response_format / tool_choice (`qwenjax.engine.constraints`): the host-side matcher, which has consumed
  # exactly `tokens` (it stays with the sequence through preemption), or None: unconstrained.
  constraint: constraints_lib.Constraint | None = None
  adapter: int = -1  # its LoRA adapter's index in the engine's bank (-1: the base model)

  @property
  def context(self) -> list[int]:
    """What its cache holds once prefilled: the prompt, and on resuming after preemption the tokens it had
    generated but the last (the next one decode feeds)."""
    return self.prompt + self.tokens[:-1]

  @property
  def rope_offset(self) -> int:
    return self.vision.rope_offset if self.vision is not None else 0

  def targets(self, start: int, n: int) -> list[int]:
    """The prompt tokens that context positions [start, start + n) score: those after each, within the prompt;
    none unless prompt log-probabilities are asked and not yet taken (a resumed sequence has them already)."""
    if self.prompt_logprobs is None or self.tokens:
      return []
    return self.prompt[start + 1:start + n + 1]


@dataclasses.dataclass(frozen=True)
class _PrefixMatch:
  """What an admission reads of a sequence's context from cached pages. pages: full pages it shares (by block
  hash); copy: (a registered page, m) whose first m tokens continue the context, copied into a private page;
  hashes: the context's full-page digests; wait: a sequence admitted this round writes a page that shares more of
  the context than the cache holds, so this one waits for the next round and reads it."""

  pages: list[int]
  copy: tuple[int, int] | None
  hashes: list[bytes]
  wait: bool = False


_NO_MATCH = _PrefixMatch([], None, [])
# A prompt whose text (a raw prompt, or its messages' content together) is longer than this, in characters, is first
# counted in bounded pieces (`Engine._refuse_far_over`), so that one far over the context costs little to refuse.
_COUNT_FROM_CHARS = 1 << 18


# Decode variants, a static jit argument, three of them so that the compiled programs stay few: a greedy batch
# skips filters and penalties entirely; penalties (which touch [B, V] counts) only when some request asks.
_GREEDY = sampling_lib.SamplingNeeds(sampling=False, top_k=False, top_p=False, min_p=False, penalties=False)
_SAMPLE = sampling_lib.SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=False)
_FULL = sampling_lib.SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=True)


def _needs_of(params: Iterable[SamplingParams]) -> sampling_lib.SamplingNeeds:
  """One of the three decode variants, with top log-probabilities if some slot asks for them."""
  params = list(params)
  needs = sampling_lib.pack(params).needs
  variant = _FULL if needs.penalties else _SAMPLE if needs.sampling else _GREEDY
  if any(p.top_logprobs for p in params):
    variant = dataclasses.replace(variant, top_logprobs=True)
  return variant


class Engine:
  """Continuous-batching generation for one loaded model.

  tokenizer: renders chat messages, encodes text prompts, decodes completions; None: token ids only.
  max_batch_size: decode slots (B): sequences that decode together. max_seq_len: the longest sequence (prompt plus
    generated tokens); a bound, not a reservation: the model's full context costs nothing until a sequence grows
    that long.
  max_prefill_chunk: the largest prefill bucket, and the tokens one packed prefill call holds (rows x bucket);
    longer prompts are prefilled in chunks of it.
  decode_steps: decode steps per jitted call (fewer dispatches; a finished slot waits at most that many steps).
  page_size: tokens per page (default by backend, `qwenjax.model.kv_cache.PAGE_SIZES`).
  kv_cache_memory: GiB of KV pages per device. Default: on TPU/GPU 90% of what the device has free after the
    weights; on CPU what the slots would fill at max_seq_len, at most 4 GiB (beside the weights, in host memory).
    The pool never takes more pages than every slot fills at max_seq_len.
  kv_cache_dtype: None (the compute dtype) or "int8" (int8 pages with a float32 scale per token and KV head).
  attention_impl: "xla" or "pallas" (the Pallas kernels; interpret mode on CPU). Default: pallas on TPU/GPU, xla
    on CPU.
  prefix_caching: sequences that share a prompt prefix (a system prompt, a few-shot header, the n samples of one
    request) read its keys and values from the same pages instead of computing them again: full pages found by
    their chained block hash, plus a copy of the shared start of a partial page; pages that held a prefix stay
    cached when released, evicted least recently used first. Outputs are those without it.
  image_processor: how a Qwen2.5-VL model's images are resized (its preprocessor_config.json; None: Qwen's
    released defaults).
  media_root: the directory whose files requests may name as images, videos and frames (a path or file:// URL;
    relative ones are taken from it): each must resolve inside it, symlinks included, else that request's
    InputError names the field and says only that it is outside (never whether the file exists or what it is).
    None: the working directory when the engine was made, so a request cannot read /etc or ~/.ssh; "/" lets
    requests read any file this process can (only for requests you wrote). `prepare(..., media_root=)` sets one
    per request (batch jobs: the directory of the line's input file).
  mesh: a device mesh (`qwenjax.parallel.sharding.make_mesh` / `mesh_from_flags`) to shard the weights (in place, unless
    loaded onto it already), the KV cache and the slot state over, by `rules`; None: one device. A mesh may span
    several processes (hosts): each then runs the same requests in lockstep and sees the same tokens.
  seed: seeds the per-request seeds of requests that set none (default: fresh entropy); processes that share a
    mesh must pass the same one.
  lora: LoRA adapters by name (`qwenjax.model.lora.Adapter`s, or PEFT adapter directories): a request names its
    own (`Request.lora`; none: the base model), and rows with different adapters, or none, decode in one batch
    (`qwenjax.model.lora.LoraBank`). merge_lora: fold the one adapter given into the weights instead (every
    request then runs the tuned model; float weights only).
  """

  def __init__(self, model: Qwen2, tokenizer: Tokenizer | None, *, max_batch_size: int = 8, max_seq_len: int = 4096,
               max_prefill_chunk: int = 512, decode_steps: int = 4, eos_token_ids: Iterable[int] | None = None,
               page_size: int | None = None, kv_cache_memory: float | None = None, kv_cache_dtype: str | None = None,
               attention_impl: str | None = None, prefix_caching: bool = True,
               image_processor: processing.ImageProcessorConfig | None = None,
               mesh: jax.sharding.Mesh | None = None, rules: ShardingRules = DEFAULT_RULES,
               seed: int | None = None, lora: Mapping[str, Adapter | str | os.PathLike] | None = None,
               merge_lora: bool = False, media_root: str | os.PathLike | None = None):
    self.model, self.tokenizer = model, tokenizer
    self.media_root = os.path.realpath(os.getcwd() if media_root is None else media_root)
    self.mesh, self.rules = mesh, rules
    adapters = {name: a if isinstance(a, Adapter) else load_adapter(a, model.cfg) for name, a in (lora or {}).items()}
    self.adapters: dict[str, int] = {}  # name -> index in the bank (a merged adapter: none)
    self._merged_lora: str | None = None
    bank = None
    if merge_lora:
      if len(adapters) != 1:
        raise ConfigError(f"merge_lora folds exactly one LoRA adapter into the weights; {len(adapters)} given.")
      (self._merged_lora, adapter), = adapters.items()
      lora_lib.merge(model, adapter)
    elif adapters:
      bank = LoraBank.of(model.cfg, adapters)
      self.adapters = {name: i for i, name in enumerate(adapters)}
    model.lora = bank  # in the programs' params (placed on the mesh with the weights); detached below
    if mesh is not None:
      sharding.shard_model(model, mesh, rules)
    self.cfg = model.cfg
    self.vl_cfg = model.vl_cfg if registry.for_model(model).multimodal else None
    self.image_processor = image_processor or processing.ImageProcessorConfig()
    self.patch_buckets = features_lib.patch_buckets(self.image_processor)
    self.attention_impl = attention_impl or default_impl()
    if self.attention_impl not in IMPLS:
      raise ConfigError(f"attention_impl {self.attention_impl!r} is not one of {', '.join(IMPLS)}.")
    if kv_cache_dtype not in (None, "int8"):
      raise ConfigError(f"kv_cache_dtype {kv_cache_dtype!r} is not None (the compute dtype) or 'int8'.")
    if self.vl_cfg is not None:
      model.visual.attention_impl = self.attention_impl
    self.graphdef, self.params = nnx.split(model)
    model.lora = None  # the model object stays as it came; this engine's params hold the bank
    self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
    self.decode_steps = decode_steps
    self.prefix_caching = bool(prefix_caching)
    self.buckets = LengthBuckets(maximum=min(max_prefill_chunk, max_seq_len),
                                 minimum=min(16, max_prefill_chunk, max_seq_len))
    if eos_token_ids is None:  # the tokenizer's (generation_config, <|im_end|>) and the model config's
      eos_token_ids = set(self.cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
    self.eos_token_ids = frozenset(eos_token_ids)
    b, v = max_batch_size, self.cfg.vocab_size
    slot_sharding = None if mesh is None else sharding.named_sharding(mesh, SlotState.AXES, (b, v), rules)
    self._slots = SlotState.zeros(b, v, slot_sharding)
    self._init_pages(page_size, kv_cache_memory, kv_cache_dtype == "int8")
    self._seed_rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
    self._grammars: constraints_lib.Grammars | None = None  # built on the first constrained request
    # prompt_tokens: computed (prefilled) context tokens; preemptions, peak_sequences (most decoding at once),
    # peak_pages (most pages held) and cached_tokens (context tokens read from shared pages).
    self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "decode_calls": 0, "prefill_calls": 0,
                  "preemptions": 0, "peak_sequences": 0, "peak_pages": 0, "cached_tokens": 0}

  def _init_pages(self, page_size: int | None, memory_gib: float | None, quantized: bool) -> None:
    """The page pool: sized from the memory budget, sharded (pages over data, KV heads over tensor)."""
    cfg, mesh = self.cfg, self.mesh
    self.page_size = page_size or default_page_size()
    if self.page_size < 1:
      raise ConfigError(f"page_size must be a positive integer, got {self.page_size}.")
    mesh_shape = dict(mesh.shape) if mesh is not None else {}
    page_splits = math.prod(mesh_shape.get(a, 1) for a in self.rules[PAGES])  # pages: a multiple of it, split fully
    head_spec = spec_for((KV_HEADS,), (cfg.num_kv_heads,), mesh_shape, self.rules)[0]
    head_splits = math.prod(mesh_shape[a] for a in ((head_spec,) if isinstance(head_spec, str) else head_spec or ()))
    if memory_gib is None:
      pages = self.max_batch_size * pages_needed(self.max_seq_len, self.page_size)
      memory_gib = _default_kv_memory_gib(self.model, pages, self.page_size, quantized, head_splits * page_splits)
    if not memory_gib > 0:
      raise ConfigError(f"kv_cache_memory must be a positive number of GiB, got {memory_gib}.")
    num_pages = pages_for_memory(cfg, memory_gib * 2**30, self.page_size, self.model.dtype, quantized, page_splits,
                                 head_splits)
    # Never more than every slot can fill at max_seq_len (a topology planned for a larger device, one slot).
    most = self.max_batch_size * pages_needed(self.max_seq_len, self.page_size)
    num_pages = min(num_pages, -(-most // page_splits) * page_splits)
    if num_pages < page_splits:
      raise ConfigError(f"kv_cache_memory={memory_gib:g} GiB holds no page of {self.page_size} tokens for this model "
                        f"({PagedKVCache.__name__} of {cfg.num_layers} layers, {cfg.num_kv_heads} KV heads).")
    self.pool = PagePool(num_pages, self.page_size)
    where = (None if mesh is None else
             paged_cache_sharding(cfg, mesh, num_pages, self.page_size, quantized, self.rules))
    self._cache = PagedKVCache.zeros(cfg, num_pages, self.page_size, self.model.dtype, quantized, sharding=where)
    # A sequence never needs more than the pool: contexts past it end with finish_reason "length".
    self.context_len = min(self.max_seq_len, num_pages * self.page_size)
    self.max_pages = pages_needed(self.context_len, self.page_size)  # widest page table

  @classmethod
  def load(cls, model: str | None = "default", *, dtype: str = "float32", scan_layers: bool | None = None,
           mesh: jax.sharding.Mesh | None = None, rules: ShardingRules = DEFAULT_RULES, quantize: str | None = None,
           quantize_embeddings: bool = False, **kwargs) -> Engine:
    """Loads `model` (see `qwenjax.load`; with a mesh, each weight straight into its shards; `quantize`: int8
    weights) into an Engine."""
    from qwenjax.checkpoints.loader import load  # pylint: disable=g-import-not-at-top

    loaded = load(model, dtype=dtype, scan_layers=scan_layers, mesh=mesh, rules=rules, quantize=quantize,
                  quantize_embeddings=quantize_embeddings)
    kwargs.setdefault("image_processor", loaded.image_processor)
    return cls(loaded.model, loaded.tokenizer, mesh=mesh, rules=rules, **kwargs)

  def _on_mesh(self):
    """The context every jitted call of this engine runs in: its mesh and rules (nothing without a mesh)."""
    return sharding.use_mesh(self.mesh, self.rules)

  # ---- requests -------------------------------------------------------------------------------------------

  def prepare(self, request: Request | str | Sequence[int] | dict,
              media_root: str | os.PathLike | None = None) -> list[int] | VLPrompt:
    """A request's prompt as token ids, or, with images or videos, as a `VLPrompt` (ids with one pad per merged
    patch, 3D positions, preprocessed images). InputError for anything malformed, unreadable or too long.
    media_root: where this request's local media must lie (default: the engine's)."""
    request = as_request(request)
    if self.tokenizer is None and (request.messages is not None or isinstance(request.prompt, str)):
      raise InputError("this engine has no tokenizer: prompts must be token ids.")
    if request.messages is not None and (request.images or request.videos):
      raise InputError("'images' and 'videos' go with a raw 'prompt'; with 'messages', give them as content parts.")
    visuals = []  # (kind, source, field) in the order their pads appear
    messages = None if request.messages is None else [checked_message(i, m, visuals, join_text=self.vl_cfg is None)
                                                      for i, m in enumerate(request.messages)]
    if self.vl_cfg is None and (visuals or request.images or request.videos):
      raise InputError(f"this model ({type(self.model).__name__}) takes no images or videos.")
    if messages is not None:
      self._refuse_far_over([(f"messages[{i}]", _content_text(m)) for i, m in enumerate(messages)])
      ids = self.tokenizer.apply_chat_template(messages, tools=request.tools, add_generation_prompt=True,
                                               tokenize=True)
    elif isinstance(request.prompt, str):
      self._refuse_far_over([("the prompt", request.prompt)])
      ids = self.tokenizer.encode(request.prompt)
    elif request.prompt is not None:
      if len(request.prompt) >= self.context_len:  # images only add tokens: too long before anything is read
        self._refuse_length(len(request.prompt))
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
      root = self.media_root if media_root is None else media_root
      prompt = vl_prompt(ids, [self._preprocess(*visual, root) for visual in visuals], self.vl_cfg)
    elif self.vl_cfg is not None and any(t in (self.vl_cfg.image_token_id, self.vl_cfg.video_token_id) for t in ids):
      raise InputError("the prompt holds image or video pad tokens but no images or videos were given.")
    n = len(_ids(prompt))
    if n >= self.context_len:
      self._refuse_length(n)
    self._constraint_spec(request)  # a malformed or uncompilable response_format / tool_choice: InputError here
    self._adapter_of(request)
    return prompt

  def _held(self) -> str:
    """The context's size as errors say it: "128", or "64 (all 4 pages of the KV cache)"."""
    held = "" if self.context_len == self.max_seq_len else f" (all {self.pool.num_pages} pages of the KV cache)"
    return f"{self.context_len}{held}"

  def _refuse_length(self, n: int) -> None:
    raise InputError(f"the prompt has {n} tokens; the context holds {self._held()} (prompt plus at least one "
                     "generated token).", code=CONTEXT_LENGTH_EXCEEDED)

  def _refuse_far_over(self, texts: Sequence[tuple[str, str]]) -> None:
    """InputError if texts that a prompt holds verbatim, (name, text) pairs (a raw prompt, each message's content),
    certainly hold far more tokens than the context: counted in bounded pieces (`Tokenizer.count_tokens`), each
    stopping past twice the context, so a prompt of any size is refused for about that many tokens' work, before
    it is rendered or tokenized whole, and blamed on the text at fault. Texts of _COUNT_FROM_CHARS characters or
    fewer in all are left to the exact count; so is anything that may fit (its count is never above the truth)."""
    if sum(len(text) for _, text in texts) <= _COUNT_FROM_CHARS:
      return
    bound, total = 2 * self.context_len, 0
    for i, (what, text) in enumerate(texts):
      counted = self.tokenizer.count_tokens(text, stop_after=bound - total) if text else 0
      total += counted
      if total > bound:
        if counted <= bound:  # several texts together
          size = sum(len(t.encode("utf-8")) for _, t in texts[:i + 1])
          culprit, counted = f"{texts[0][0]} to {what}: their content is", total
        else:
          size = len(text.encode("utf-8"))
          culprit = "the prompt is" if what == "the prompt" else f"{what}: its content is"
        raise InputError(f"{culprit} {size:,} bytes, at least {counted:,} tokens; the context holds {self._held()} "
                         "tokens (prompt plus at least one generated token).", code=CONTEXT_LENGTH_EXCEEDED)

  @property
  def lora_names(self) -> tuple[str, ...]:
    """The LoRA adapters requests may name (a merged one included)."""
    return (*self.adapters, *((self._merged_lora,) if self._merged_lora else ()))

  def _adapter_of(self, request: Request) -> int:
    """The index of the request's LoRA adapter in the bank (-1: the base model); InputError for an unknown name."""
    if request.lora is None or request.lora == self._merged_lora:
      return -1
    if request.lora not in self.adapters:
      known = ", ".join(self.adapters) or "none: it was started without --lora"
      raise InputError(f"LoRA adapter {request.lora!r} is not loaded in this engine (loaded: {known}).")
    return self.adapters[request.lora]

  def _raw_prompt_visuals(self, ids: list[int], images: list, videos: list) -> list:
    visuals, given = [], {"image": len(images), "video": len(videos)}
    for t in ids:
      if t in (self.vl_cfg.image_token_id, self.vl_cfg.video_token_id):
        pool, kind = (images, "image") if t == self.vl_cfg.image_token_id else (videos, "video")
        if not pool:
          raise InputError(f"the prompt has more <|{kind}_pad|> tokens than {kind}s given.")
        visuals.append((kind, pool.pop(0), f"{kind}s[{given[kind] - len(pool) - 1}]"))
    if images or videos:
      raise InputError(f"{len(images)} image(s) and {len(videos)} video(s) have no <|image_pad|> / <|video_pad|> "
                       "token in the prompt.")
    return visuals

  def _preprocess(self, kind: str, source, field: str, media_root: str | os.PathLike) -> processing.VisualInput:
    """An image or video of a request; its InputError names the request's field."""
    try:
      if kind == "image":
        return processing.preprocess_image(source, self.image_processor, media_root=media_root)
      return processing.preprocess_video(source, self.image_processor, media_root=media_root)
    except InputError as e:
      raise InputError(f"{field}: {e}") from None

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
                                    seq.logprobs if seq.params.logprobs else None,
                                    seq.top_logprobs if seq.params.top_logprobs else None,
                                    seq.constraint.error if seq.constraint is not None else None))
      if seq.prompt_logprobs is not None:
        out.prompt_logprobs = [None, *seq.prompt_logprobs]
      if seq.sample_index == 0:
        out.cached_tokens = seq.cached_tokens
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
        features = features_lib.encode_visuals(self.model.visual, vision.visuals, self.patch_buckets)
    prompt = _ids(prompt)
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
    # The context bounds generation: a sequence that fills it ends with finish_reason "length".
    max_tokens = min(params.max_tokens, self.context_len - len(prompt))
    seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**31))
    seqs = [_Sequence(index, j, prompt, params, seed, stop_ids, max_tokens, vision, features,
                      decoder=self.tokenizer.stream(skip_special_tokens=True) if self.tokenizer else _NoText(),
                      prompt_logprobs=[] if params.prompt_logprobs and j == 0 else None)
            for j in range(params.n)]
    adapter = self._adapter_of(req)
    for seq in seqs:
      seq.adapter = adapter
    return self._constrain(req, seqs)

  # ---- constrained decoding (`qwenjax.engine.constraints`) -----------------------------------------------

  @property
  def grammars(self) -> constraints_lib.Grammars:
    """The engine's grammar compiler and cache (each distinct response_format / tool_choice compiles once)."""
    if self._grammars is None:
      self._grammars = constraints_lib.Grammars(self.tokenizer, self.cfg.vocab_size, self.eos_token_ids)
    return self._grammars

  def _constraint_spec(self, request: Request) -> dict | None:
    """What constrains `request` (None: nothing), its grammar compiled; InputError if it is malformed."""
    if request.response_format is None and request.tool_choice is None:
      return None
    if self.tokenizer is None:
      raise InputError("response_format and tool_choice need an engine with a tokenizer.")
    return self.grammars.spec(request)

  def _constrain(self, request: Request, seqs: list[_Sequence]) -> list[_Sequence]:
    """Gives each of a request's sequences its own constraint (n samples: n matchers), if the request has one."""
    spec = self._constraint_spec(request)
    if spec is not None:
      for seq in seqs:
        seq.constraint = self.grammars.constraint(spec, seq.stop_ids)
    return seqs

  def _masks(self, seqs: Sequence[_Sequence | None]) -> np.ndarray:
    """[len(seqs), W] int32: the tokens each may sample next (every bit set for an idle or free slot)."""
    mask = np.full((len(seqs), constraints_lib.words(self.cfg.vocab_size)), -1, np.int32)
    for i, seq in enumerate(seqs):
      if seq is not None and seq.constraint is not None:
        seq.constraint.fill(mask[i])
    return mask

  # ---- the scheduler --------------------------------------------------------------------------------------

  def _run(self, items: Iterator[tuple[int, Request, Any]], default, events: bool = False) -> Iterator[Any]:
    """Runs sequences to completion, pulling requests from `items` as slots free up; yields each finished
    _Sequence, or StreamEvents if `events`. Each iteration
      1. admits waiting sequences (preempted ones first, then new requests in order) into free slots while the
         pool has pages for their context plus one decode block of every admitted sequence, and prefills them
         together in packed calls (`_prefill_packed`);
      2. gives every decoding sequence pages for the next decode block, preempting the most recently admitted
         ones (pages returned, tokens kept; their context is recomputed when they are readmitted) while the pool
         is short: the oldest sequences always make progress, so every request finishes;
      3. runs the decode block and does the host-side bookkeeping, returning a finished sequence's pages."""
    waiting: collections.deque[_Sequence] = collections.deque()
    slots: list[_Sequence | None] = [None] * self.max_batch_size
    admissions, exhausted = 0, False
    while True:
      admitted, copies = [], []  # 1. admit
      pending: dict[bytes, list[np.ndarray]] = {}  # the pages this round's admissions write, by parent digest
      free = [s for s in range(self.max_batch_size) if slots[s] is None]
      reserve = sum(self._block_pages(seq) for seq in slots if seq is not None)
      while free:
        if not waiting:
          item = next(items, None)
          if item is None:
            exhausted = True
            break
          waiting.extend(self._sequences(*item, default))
        seq = waiting[0]
        match = self._match_prefix(seq, pending) if self.prefix_caching else _NO_MATCH
        if match.wait:
          break  # its prefix is being written this round: it reads it next round (FIFO)
        # Pages taken from the pool: now, cached pages it shares and the copy (its source held until copied);
        # later, by prefill and its first decode block, the rest.
        later = (pages_needed(len(seq.context) + min(self.decode_steps, self._budget(seq)), self.page_size)
                 - len(match.pages) - (match.copy is not None))
        now = sum(self.pool.refcount(p) == 0 for p in match.pages)
        if match.copy is not None:
          now += 1 + (self.pool.refcount(match.copy[0]) == 0)
        if later + now + reserve > self.pool.num_free and (admitted or any(slots)):
          break  # admission waits for pages (FIFO: nothing overtakes the head)
        waiting.popleft()
        seq.pages, seq.admitted = self._share_prefix(seq, match, copies, pending), admissions
        admissions += 1
        reserve += later
        slot = free.pop(0)
        slots[slot] = seq
        admitted.append((slot, seq))
      if copies:
        self._copy_pages(copies)
      for slot, seq, first in self._prefill_packed(admitted):
        if first is not None:
          yield from self._accept(seq, [first[0]], [first[1]], events)
          if seq.finish_reason:
            self._release(slots, slot)
      live = [s for s in range(self.max_batch_size) if slots[s] is not None]
      if not live:  # every admitted sequence ended at its first token: admit more, unless there are none
        if waiting or not exhausted:
          continue
        return
      for s in sorted(live, key=lambda s: slots[s].admitted):  # 2. pages for the block, oldest first
        seq = slots[s]
        if seq is None:
          continue
        grow = min(self.decode_steps, self._budget(seq))
        while True:
          extra = pages_needed(seq.pages.length + grow, self.page_size) - len(seq.pages.pages)
          if extra <= self.pool.num_free:
            break
          victim = max((v for v in range(self.max_batch_size) if slots[v] is not None),
                       key=lambda v: slots[v].admitted)
          self._preempt(slots, victim, waiting)
          if victim == s:
            break
        if slots[s] is not None:
          seq.pages.grow(grow)
      live = [s for s in range(self.max_batch_size) if slots[s] is not None]
      if not live:
        continue
      self.stats["peak_sequences"] = max(self.stats["peak_sequences"], len(live))
      self.stats["peak_pages"] = max(self.stats["peak_pages"], self.pool.num_pages - self.pool.num_free)
      out_tok, out_lp = self._decode(slots)  # 3. decode
      for s in live:
        seq = slots[s]
        yield from self._accept_block(seq, out_tok[:, s], out_lp[:, s], events)
        if seq.finish_reason:
          self._release(slots, s)

  def _budget(self, seq: _Sequence) -> int:
    """Tokens the next decode block may generate for seq, and so the most of its positions it writes: what seq
    may still generate, or 1 if a grammar constrains it (the host computes its mask one token at a time, so it
    pauses after one token of each block; it does not end)."""
    if seq.constraint is not None and seq.constraint.per_token:
      return 1
    return seq.max_tokens - len(seq.tokens)

  def _block_pages(self, seq: _Sequence) -> int:
    """Pages seq needs beyond those it holds to run the next decode block."""
    grow = min(self.decode_steps, self._budget(seq))
    return max(0, pages_needed(seq.pages.length + grow, self.page_size) - len(seq.pages.pages))

  def _release(self, slots: list, slot: int) -> None:
    """Frees a slot and lets go of its sequence's pages (those registered stay cached for later prefixes)."""
    slots[slot].pages.release()
    slots[slot] = None

  def _preempt(self, slots: list, slot: int, waiting: collections.deque) -> None:
    """Frees a decoding sequence's slot and pages (its holds on shared ones dropped); it waits at the head of the
    queue with its tokens, and its context is prefilled again when it is readmitted (recompute, from the prefix
    pages still cached: the outputs are unchanged)."""
    seq = slots[slot]
    self._release(slots, slot)
    seq.pages = None
    seq.preemptions += 1
    self.stats["preemptions"] += 1
    waiting.appendleft(seq)

  def _prefill_packed(self, admitted: list[tuple[int, _Sequence]]) -> Iterator[tuple[int, _Sequence, Any]]:
    """Prefills the admitted sequences' contexts, several rows per jitted call: every call takes the next chunk
    (at most max_prefill_chunk tokens) of as many sequences as fit `rows x bucket <= max_prefill_chunk`. Yields
    (slot, seq, (first token, logprob)) as each finishes, or (slot, seq, None) for a resumed sequence, whose
    next token it already has (its penalty state is restored instead)."""
    chunk = self.buckets.maximum
    todo = [(slot, seq, seq.context) for slot, seq in admitted]
    done = {id(seq): seq.pages.length for _, seq, _ in todo}  # context tokens in its pages: shared, or prefilled
    while todo:
      group, width = [], 0
      for item in todo:
        piece = min(chunk, len(item[2]) - done[id(item[1])])
        w = max(width, self.buckets.bucket(piece))
        if group and not self._rows_fit(len(group) + 1, w):
          break
        group.append(item)
        width = w
      logits = self._prefill_call(group, done, width)
      todo = [item for item in todo if done[id(item[1])] < len(item[2])]
      for i, (slot, seq, context) in enumerate(group):
        if done[id(seq)] == len(context):
          if self.prefix_caching:
            self._register_prefix(seq)
          yield slot, seq, self._start(slot, seq, logits[i:i + 1])

  def _rows_fit(self, rows: int, width: int) -> bool:
    """Whether a packed prefill call of `rows` rows (padded to a power of two) of `width` tokens is allowed."""
    return next_power_of_two(rows) * width <= self.buckets.maximum and rows <= self.max_batch_size

  # ---- prefix caching -------------------------------------------------------------------------------------

  def _match_prefix(self, seq: _Sequence, pending: dict[bytes, list[np.ndarray]]) -> _PrefixMatch:
    """The cached pages seq's context can start from: the longest run of full pages whose block hashes the pool
    holds, then the registered page under the last one that shares most of the next tokens (copied, if at least
    page_size / 8 of them). At most len(context) - 1 tokens: the last is computed, its logits give the next token.
    The first sample of a request with prompt_logprobs shares nothing (its prefill scores every prompt token); its
    other samples do. `pending`: the pages sequences admitted this round are about to write (not yet readable)."""
    ps, context = self.page_size, seq.context
    if seq.prefix_root is None:
      # Keys and values depend on the adapter too (it adapts k and v): each adapter's prefixes are its own.
      adapter = b"" if seq.adapter < 0 else b"lora:" + list(self.adapters)[seq.adapter].encode()
      seq.prefix_root = prefix_root(_visual_digest(seq.vision) + adapter)
    hashes = prefix_hashes(context, ps, seq.prefix_root)
    if seq.prompt_logprobs is not None and not seq.tokens:
      return _PrefixMatch([], None, hashes)
    limit = len(context) - 1
    pages = []
    for digest in hashes[:limit // ps]:
      page = self.pool.lookup(digest)
      if page is None:
        break
      pages.append(page)
    parent = hashes[len(pages) - 1] if pages else seq.prefix_root
    rest = np.asarray(context[len(pages) * ps:min(limit, (len(pages) + 1) * ps)], np.int64)
    least = max(1, ps // 8)  # a partial match of fewer tokens saves less than the copy's extra call costs
    source, m = self.pool.longest_child(parent, rest) if len(rest) else (None, 0)
    if m < least:
      source, m = None, 0
    ahead = max((common_prefix(tokens, rest) for tokens in pending.get(parent, ())), default=0)
    return _PrefixMatch(pages, None if source is None else (source, m), hashes, wait=ahead >= least and ahead > m)

  def _share_prefix(self, seq: _Sequence, match: _PrefixMatch, copies: list[tuple[int, int]],
                    pending: dict[bytes, list[np.ndarray]]) -> SequencePages:
    """seq's page table at admission: the shared pages of its match (a hold taken on each), then a fresh page for
    the copy of a partial one (`copies` gets (source, page); the source is held until copied). Notes in `pending`
    the pages its prefill writes and counts the tokens it reads."""
    pages = SequencePages(self.pool)
    if not self.prefix_caching:
      return pages
    ps, table = self.page_size, list(match.pages)
    for page in table:
      self.pool.acquire(page)
    length = len(table) * ps
    if match.copy is not None:
      source, m = match.copy
      self.pool.acquire(source)  # allocating the copy's page must not evict its source
      table += self.pool.alloc(1)
      copies.append((source, table[-1]))
      length += m
    pages.adopt(table, length)
    seq.prefix_hashes = match.hashes  # `_register_prefix` files its pages under them once prefilled
    context = seq.context
    for j in range(len(match.pages), pages_needed(len(context), ps)):
      parent = match.hashes[j - 1] if j else seq.prefix_root
      pending.setdefault(parent, []).append(np.asarray(context[j * ps:(j + 1) * ps], np.int64))
    self.stats["cached_tokens"] += length
    if not seq.tokens:
      seq.cached_tokens = length
    return pages

  def _copy_pages(self, copies: list[tuple[int, int]]) -> None:
    """The round's partial-page copies in one call (`programs.copy_pages`, one compiled shape of B pairs: at most
    one per admitted sequence), then the holds on their sources dropped."""
    src, dst = np.zeros(self.max_batch_size, np.int32), np.full(self.max_batch_size, -1, np.int32)
    for i, (source, page) in enumerate(copies):
      src[i], dst[i] = source, page
    with self._on_mesh():
      self._cache = programs.copy_pages(self._cache, src, dst)
    for source, _ in copies:
      self.pool.free([source])

  def _register_prefix(self, seq: _Sequence) -> None:
    """Once seq's prefill has written its context: each full page under its block hash, and its partial last
    page's tokens (whose start later prompts may copy), for the sequences admitted from the next round on. Those
    positions are never written again: decode writes past the context."""
    ps, context, hashes = self.page_size, seq.context, seq.prefix_hashes
    parents = [seq.prefix_root, *hashes]
    for i, page in enumerate(seq.pages.pages[:pages_needed(len(context), ps)]):
      self.pool.register(page, parents[i], context[i * ps:(i + 1) * ps], hashes[i] if i < len(hashes) else None)

  def program_shapes(self, constrained: bool = False) -> dict[str, list[tuple]]:
    """Every shape the scheduler's programs can be called with (rows x tokens x page-table width for
    prefill, page-table width for decode, padded prompt size for first tokens and restores): the bound on what a
    job of any length compiles, per sampling variant (and, for prefill, twice as many with prompt
    log-probabilities). constrained: also the masked variants, "masked_decode" (steps, page-table width), steps
    decode_steps and 1 (a block of grammar-constrained slots only), and "masked_first_token" (padded prompt
    size), per sampling variant. `warm_up` compiles them all."""
    widths = sorted({self._table_width(p) for p in range(1, self.max_pages + 1)})
    prefill = []
    for w in self.buckets.sizes:  # rows: the padded counts of every group size that fits
      rows = sorted({next_power_of_two(n) for n in range(1, self.max_batch_size + 1) if self._rows_fit(n, w)})
      least = self._table_width(pages_needed(w, self.page_size))
      prefill += [(r, w, p) for r in rows for p in widths if p >= least]
    pads = sorted({_pad_width(n) for n in (1 << i for i in range(self.context_len.bit_length() + 1))
                   if n <= self.context_len})
    copy = [self.max_batch_size] if self.prefix_caching else []  # pairs per copy_pages call
    shapes = {"prefill": prefill, "decode": widths, "first_token": pads, "restore_slot": pads, "copy_pages": copy}
    if constrained:
      steps = sorted({self.decode_steps, 1})
      shapes.update(masked_decode=[(k, p) for k in steps for p in widths], masked_first_token=pads)
    return shapes

  def warm_up(self, prompt_logprobs: bool = False, constrained: bool = False, top_logprobs: bool = False) -> int:
    """Compiles every program the scheduler can call (`program_shapes`, each decode and first-token shape
    for the greedy, sampling and penalty variants) with inputs that write nothing, so that a job compiles nothing
    once it runs; prompt_logprobs: each prefill shape's scoring variant too (for jobs whose requests ask for
    prompt log-probabilities); constrained: the masked decode and first-token variants too (for jobs with
    response_format or tool_choice); top_logprobs: every decode and first-token variant again with top
    log-probabilities (for jobs whose requests ask for them). Returns how many program variants it ran."""
    shapes, b, v = self.program_shapes(constrained), self.max_batch_size, self.cfg.vocab_size
    count = 0
    with self._on_mesh():
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
          logits, *_, self._cache = programs.paged_prefill(self.graphdef, self.params, self._cache,
                                                           dataclasses.replace(batch, targets=targets), vision,
                                                           impl=self.attention_impl)
          logits[0:1].block_until_ready()  # `_prefill_packed` slices each row's logits: that slice per row count
          count += 1
      idle = self._decode_inputs([None] * b)
      variants = (_GREEDY, _SAMPLE, _FULL)
      if top_logprobs:
        variants += tuple(dataclasses.replace(n, top_logprobs=True) for n in variants)
      for needs in variants:
        for p in shapes["decode"]:
          inputs = PagedDecodeInputs(idle, np.zeros(b, np.int32), np.zeros((b, p), np.int32), np.zeros(b, np.int32))
          out = programs.paged_decode_block(self.graphdef, self.params, self._cache, self._slots, inputs,
                                            needs=needs, num_steps=self.decode_steps, impl=self.attention_impl)
          _, _, self._cache, self._slots = out
          count += 1
        for pad in shapes["first_token"]:
          inputs = FirstTokenInputs(np.int32(0), np.zeros(pad, np.int32), np.int32(1), sampling_lib.pack(
              [SamplingParams()], sample_indices=[0], seeds=[0]))
          _, _, self._slots = programs.first_token(np.zeros((1, v), np.float32), self._slots, inputs, needs=needs)
          count += 1
        if constrained:
          count += self._warm_up_masked(shapes, needs, idle)
      for pad in shapes["restore_slot"]:
        self._slots = programs.restore_slot(self._slots, np.int32(0), np.zeros(pad, np.int32), np.int32(0),
                                            np.zeros(pad, np.int32), np.int32(0))
        count += 1
      for pairs in shapes["copy_pages"]:  # every destination -1: copies nothing
        self._cache = programs.copy_pages(self._cache, np.zeros(pairs, np.int32), np.full(pairs, -1, np.int32))
        count += 1
    return count

  def _warm_up_masked(self, shapes: dict, needs: sampling_lib.SamplingNeeds, idle: DecodeInputs) -> int:
    """warm_up's masked variants of one sampling variant (`program_shapes(constrained=True)`); returns how many."""
    b, v = self.max_batch_size, self.cfg.vocab_size
    needs, count = dataclasses.replace(needs, masked=True), 0
    idle = dataclasses.replace(idle, mask=self._masks([None] * b))
    for k, p in shapes["masked_decode"]:
      inputs = PagedDecodeInputs(idle, np.zeros(b, np.int32), np.zeros((b, p), np.int32), np.zeros(b, np.int32))
      *_, self._cache, self._slots = programs.paged_decode_block(self.graphdef, self.params, self._cache, self._slots,
                                                                 inputs, needs=needs, num_steps=k,
                                                                 impl=self.attention_impl)
      count += 1
    for pad in shapes["masked_first_token"]:
      inputs = FirstTokenInputs(np.int32(0), np.zeros(pad, np.int32), np.int32(1), sampling_lib.pack(
          [SamplingParams()], sample_indices=[0], seeds=[0]), self._masks([None]))
      _, _, self._slots = programs.first_token(np.zeros((1, v), np.float32), self._slots, inputs, needs=needs)
      count += 1
    return count

  def _prefill_call(self, group, done: dict, width: int) -> jax.Array:
    """One packed prefill call: the next chunk of each sequence of `group`, a row each (rows padded to a power
    of two, tokens to `width`), scoring the prompt tokens of the rows that ask (`_Sequence.targets`). Returns the
    logits at each row's last token [rows, V]."""
    rows = next_power_of_two(len(group))
    tokens = np.zeros((rows, width), np.int32)
    start, num_new, rope_offset = (np.zeros(rows, np.int32) for _ in range(3))
    slots = np.full((rows, width), -1, np.int32)
    pieces, scored = [], []
    for r, (_, seq, context) in enumerate(group):
      lo = done[id(seq)]
      piece = context[lo:lo + self.buckets.maximum]
      tokens[r, :len(piece)] = piece
      start[r], num_new[r], rope_offset[r] = lo, len(piece), seq.rope_offset
      slots[r, :len(piece)] = seq.pages.grow(len(piece))
      done[id(seq)] = lo + len(piece)
      pieces.append((seq, lo))
      scored.append((seq, seq.targets(lo, len(piece))))
    table = self._page_table([seq for _, seq, _ in group], rows)
    vision = self._vision_rows(pieces, rows, width) if self.vl_cfg is not None else None
    batch = PagedBatch(tokens, start, PagedInputs(slots, table, num_new), rope_offset,
                       _targets(scored, rows, width), self._adapter_rows([seq for _, seq, _ in group], rows))
    with self._on_mesh():
      logits, *scores, self._cache = programs.paged_prefill(self.graphdef, self.params, self._cache, batch, vision,
                                                            impl=self.attention_impl)
    _keep_scores(scored, scores)
    self.stats["prefill_calls"] += 1
    self.stats["prompt_tokens"] += int(num_new.sum())
    return logits

  def _table_width(self, pages: int) -> int:
    """The compiled page-table width for a widest table of `pages`: a power of two, capped at max_pages."""
    return min(next_power_of_two(pages), self.max_pages)

  def _page_table(self, seqs: list[_Sequence | None], rows: int) -> np.ndarray:
    """[rows, P] page tables, P the widest table rounded by `_table_width` (few compiled widths)."""
    width = self._table_width(max(len(s.pages.pages) for s in seqs if s is not None))
    table = np.zeros((rows, width), np.int32)
    for r, seq in enumerate(seqs):
      if seq is not None:
        table[r] = seq.pages.page_row(width)
    return table

  def _vision_rows(self, pieces: list[tuple[_Sequence, int]], rows: int, width: int) -> VisionInputs:
    """A Qwen2.5-VL model's packed prefill inputs: each row's chunk's `_vision_chunk`, features stacked (row r's
    index shifted by r * width)."""
    parts = [self._vision_chunk(seq, lo, width) for seq, lo in pieces]
    positions = np.zeros((3, rows, width), np.int32)
    features = np.zeros((rows * width, self.cfg.hidden_size), np.float32)
    index = np.full((rows, width), -1, np.int32)
    for r, part in enumerate(parts):
      positions[:, r] = part.rope_positions[:, 0]
      features[r * width:(r + 1) * width] = part.features
      index[r] = np.where(part.index[0] >= 0, part.index[0] + r * width, -1)
    return VisionInputs(positions, None, features, index)

  def _start(self, slot: int, seq: _Sequence, logits: jax.Array) -> tuple[int, float] | None:
    """After seq's context is prefilled: its first token (sampled from `logits` [1, V]), or, for a resumed
    sequence, None once its slot's penalty state is restored."""
    if seq.tokens:  # prompt and tokens padded alike: one compiled shape per power of two
      width = _pad_width(max(len(seq.prompt), len(seq.tokens)))
      with self._on_mesh():
        self._slots = programs.restore_slot(self._slots, np.int32(slot), _padded(seq.prompt, width),
                                            np.int32(len(seq.prompt)), _padded(seq.tokens, width),
                                            np.int32(len(seq.tokens)))
      return None
    return self._first_token(slot, seq, logits)

  def _first_token(self, slot: int, seq: _Sequence, logits: jax.Array) -> tuple[int, float]:
    """seq's first token and its log-probability, sampled from its prompt's last logits [1, V] into `slot`
    (penalty state reset to the prompt); masked by its constraint, if it has one."""
    mask = None
    if seq.constraint is not None:
      mask = self._masks([seq])
    inputs = FirstTokenInputs(np.int32(slot), _padded(seq.prompt), np.int32(len(seq.prompt)),
                              sampling_lib.pack([seq.params], sample_indices=[seq.sample_index], seeds=[seq.seed]),
                              mask)
    needs = dataclasses.replace(_needs_of([seq.params]), masked=mask is not None)
    with self._on_mesh():
      tok, logprob, self._slots = programs.first_token(logits, self._slots, inputs, needs=needs)
    logprob = np.asarray(logprob)
    return int(tok), float(logprob) if logprob.ndim == 0 else logprob.tolist()

  def _decode(self, slots: list[_Sequence | None]) -> tuple[np.ndarray, np.ndarray]:
    b = self.max_batch_size
    position, rope_offset = np.zeros(b, np.int32), np.zeros(b, np.int32)
    for i, seq in enumerate(slots):
      if seq is not None:
        position[i], rope_offset[i] = len(seq.prompt) + len(seq.tokens) - 1, seq.rope_offset
    inputs = PagedDecodeInputs(self._decode_inputs(slots), position, self._page_table(slots, b), rope_offset)
    needs, num_steps = self._decode_variant(slots)
    with self._on_mesh():
      out_tok, out_lp, self._cache, self._slots = programs.paged_decode_block(
          self.graphdef, self.params, self._cache, self._slots, inputs, needs=needs, num_steps=num_steps,
          impl=self.attention_impl)
    self.stats["decode_calls"] += 1
    return np.asarray(out_tok), np.asarray(out_lp)

  def _vision_chunk(self, seq: _Sequence, start: int, width: int) -> VisionInputs:
    """A Qwen2.5-VL model's extra prefill inputs for prompt tokens [start, start + width): 3D positions and the
    vision features of the chunk's pad tokens (index -1: text)."""
    positions = np.zeros((3, 1, width), np.int32)
    features = np.zeros((width, self.cfg.hidden_size), np.float32)
    index = np.full((1, width), -1, np.int32)
    if seq.vision is None:  # text on a VL model: the same position on all three axes
      positions[:] = start + np.arange(width)
      return VisionInputs(positions, None, features, index)
    vision = seq.vision
    part = vision.positions[:, start:start + width]
    positions[:, 0, :part.shape[1]] = part
    # Past the prompt (a resumed sequence's generated tokens, then padding): text positions, cache + rope offset.
    positions[:, 0, part.shape[1]:] = start + np.arange(part.shape[1], width) + vision.rope_offset
    offset = 0
    for first, v in zip(vision.starts, vision.visuals):  # features row of each pad token of this chunk
      lo, hi = max(first, start), min(first + v.num_tokens, start + width)
      if lo < hi:
        features[lo - start:hi - start] = seq.features[offset + lo - first:offset + hi - first]
        index[0, lo - start:hi - start] = np.arange(lo - start, hi - start)
      offset += v.num_tokens
    return VisionInputs(positions, None, features, index)

  def _decode_inputs(self, slots: list[_Sequence | None]) -> DecodeInputs:
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
      tokens[i], step[i], budget[i], active[i] = seq.tokens[-1], len(seq.tokens), self._budget(seq), True
      stop_ids[i, :len(seq.stop_ids)] = sorted(seq.stop_ids)
    arrays = sampling_lib.pack([s.params if s else None for s in slots],
                               sample_indices=[s.sample_index if s else 0 for s in slots],
                               seeds=[s.seed if s else 0 for s in slots])
    mask = self._masks(slots) if any(s.constraint is not None for s in live) else None
    return DecodeInputs(tokens, step, active, budget, stop_ids, arrays, mask, self._adapter_rows(slots, b))

  def _adapter_rows(self, seqs: Sequence[_Sequence | None], rows: int) -> np.ndarray | None:
    """[rows] int32: each row's LoRA adapter (-1: none, and for padding rows); None when the engine has no bank
    (the programs are then those of a model without adapters)."""
    if not self.adapters:
      return None
    index = np.full(rows, -1, np.int32)
    for r, seq in enumerate(seqs):
      if seq is not None:
        index[r] = seq.adapter
    return index

  def _decode_variant(self, slots: list[_Sequence | None]) -> tuple[sampling_lib.SamplingNeeds, int]:
    """A decode block's static variant: the sampling needs (masked if any slot is constrained) and its steps,
    one when every live slot is grammar-constrained (each samples one token per block: more steps would idle)."""
    live = [s for s in slots if s is not None]
    masked = any(s.constraint is not None for s in live)
    paused = all(s.constraint is not None and s.constraint.per_token for s in live)
    return dataclasses.replace(_needs_of(s.params for s in live), masked=masked), 1 if paused else self.decode_steps

  def _accept_block(self, seq: _Sequence, tokens: np.ndarray, logprobs: np.ndarray, events: bool) -> Iterator[Any]:
    """A decode block's column for seq: tokens [k] (-1 from where its row stopped) and logprobs [k]."""
    n = int(np.argmax(tokens < 0)) if (tokens < 0).any() else len(tokens)
    yield from self._accept(seq, tokens[:n].tolist(), logprobs[:n].tolist(), events)

  def _accept(self, seq: _Sequence, tokens: list[int], logprobs: list[float], events: bool) -> Iterator[Any]:
    """Appends tokens to seq, applying every stop condition exactly; yields what the caller asked for."""
    for tok, lp in zip(tokens, logprobs):
      if isinstance(lp, list):  # a row of sampling.with_top_logprobs: some slot of the call asked for them
        lp, top = sampling_lib.split_top_logprobs(lp, seq.params.top_logprobs)
        if seq.params.top_logprobs:
          seq.top_logprobs.append(top)
      seq.tokens.append(tok)
      seq.logprobs.append(lp)
      self.stats["generated_tokens"] += 1
      if tok in seq.stop_ids:
        seq.finish_reason = "stop"
        break
      seq.text += seq.decoder.add(tok)
      if seq.constraint is not None and not seq.constraint.advance(tok):
        seq.finish_reason = constraints_lib.GRAMMAR_ERROR  # never with a mask that held; a matcher's limit, say
        break
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


def _content_text(message: dict) -> str:
  """The text a message's content holds (a string, or its text parts), as the chat template renders it."""
  content = message.get("content")
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type", "text")
                   == "text" and isinstance(part.get("text"), str))
  return ""


def _pad_width(n: int) -> int:
  """The padded size of a first-token prompt or a restored history: powers of two from 16 (few shapes)."""
  return max(16, next_power_of_two(n))


def _padded(ids: list[int], width: int | None = None) -> np.ndarray:
  """ids as int32, zero-padded to `width` (default `_pad_width(len(ids))`)."""
  width = _pad_width(len(ids)) if width is None else width
  return np.pad(np.asarray(ids, np.int32), (0, width - len(ids)))


def _visual_digest(vision: VLPrompt | None) -> bytes:
  """What a multimodal prompt's keys and values depend on besides its token ids (its images' and videos' pixels,
  grids and frame timing; its positions follow from those), for the root of its block hashes: b"" for text."""
  if vision is None:
    return b""
  h = hashlib.blake2b(digest_size=16)
  for v in vision.visuals:
    h.update(repr((v.kind, v.grid_thw, v.second_per_grid_t, v.merge_size, v.patches.shape, v.patches.dtype.str))
             .encode())
    h.update(np.ascontiguousarray(v.patches).tobytes())
  return h.digest()


def _ids(prompt: list[int] | VLPrompt) -> list[int]:
  return prompt.ids if isinstance(prompt, VLPrompt) else prompt


def _targets(scored: list[tuple[_Sequence, list[int]]], rows: int, width: int) -> np.ndarray | None:
  """A prefill call's `targets` [rows, width]: row r's `_Sequence.targets` of its chunk (scored[r]), -1 past them
  and in padding rows; None when no row scores anything (the call then runs the program without scoring)."""
  if not any(t for _, t in scored):
    return None
  targets = np.full((rows, width), -1, np.int32)
  for r, (_, t) in enumerate(scored):
    targets[r, :len(t)] = t
  return targets


def _keep_scores(scored: list[tuple[_Sequence, list[int]]], scores: list[jax.Array]) -> None:
  """Appends each row's prompt log-probabilities (scores: [] or [the call's [rows, width] log-probabilities])
  to its sequence's `prompt_logprobs`, in prompt order: chunks are prefilled in order."""
  if not scores:
    return
  values = np.asarray(scores[0])
  for r, (seq, t) in enumerate(scored):
    if t:
      seq.prompt_logprobs.extend(values[r, :len(t)].tolist())



CPU_KV_MEMORY_GIB = 4.0  # the CPU default's cap: host memory beside the weights
DEVICE_KV_FRACTION = 0.9  # TPU/GPU default: this fraction of what a device has free once the weights are on it


def _default_kv_memory_gib(model: Qwen2, pages: int, page_size: int, quantized: bool, splits: int) -> float:
  """The page pool's budget per device when none is given (see Engine's kv_cache_memory)."""
  stats = None if jax.default_backend() == "cpu" else jax.local_devices()[0].memory_stats()
  if stats and stats.get("bytes_limit"):
    return DEVICE_KV_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 2**30
  full = pages * page_bytes(model.cfg, page_size, model.dtype, quantized) / splits
  return min(CPU_KV_MEMORY_GIB, full / 2**30)
