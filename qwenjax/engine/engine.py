"""The engine: continuous batching of requests over B decode slots and a pool of KV pages, behind a step seam.

    engine = Engine.load("default", max_batch_size=8)
    outs = engine.generate(["def fib(n):", {"messages": [{"role": "user", "content": "Hi"}]}],
                           SamplingParams(max_tokens=64))
    for event in engine.stream(requests): ...

    rid = engine.add_request(request)          # an online client: add, step, abort
    while engine.has_unfinished():
      for out in engine.step(): ...            # RequestOutputs of the requests that advanced
    engine.abort(rid); engine.stats()

`Engine` owns four parts that hand each other plain data:
  input processor (`input_processor`)   a Request -> its prompt (template, tokens, images, grammar, adapter) and
                                        its n `Sequence`s;
  scheduler (`scheduler`, host only)    waiting and running queues, admission, pages through the `KVManager`
                                        (the pool and the prefix cache), preemption, each step's plan;
  runner (`runner`)                     the plans as device inputs, the jitted programs, the cache and the slot
                                        state, the vision tower, warm-up;
  output processor (`output_processor`) stop conditions, incremental text, stream hold-back, n samples gathered.
Each `step()`
  1. admits waiting sequences into free slots while the pool has pages for their context plus one decode block of
     every admitted sequence (prefix pages shared, partial pages copied, vision features encoded, slot state set);
  2. while some admitted sequence is still prefilling, runs one jitted call over a ragged batch (`StepPlan`): one
     token for every decoding sequence and the next chunks of the prefilling ones, oldest first, up to
     `max_prefill_chunk` prompt tokens, then a sample for each decoding sequence and each prompt that completed;
  3. otherwise gives every decoding sequence pages for its next `decode_steps` tokens and advances every slot that
     many tokens in one jitted call (a `fori_loop` of decode + sample); stops that the device can see
     (end-of-sequence and stop token ids, max_tokens) end a row exactly where they occur; on a speculative engine
     (`speculative=`), when some sequence has proposals, one jitted call verifies every sequence's last token and
     proposals instead (`qwenjax.engine.speculative`), and the refused positions are dropped. In both, the most
     recently admitted sequences are preempted while the pool is short (their context is recomputed when
     readmitted: outputs unchanged);
  4. on the host, appends the tokens, detokenizes, cuts stop strings, and frees finished sequences' slots and
     pages at once for the next waiting sequence.

With a device mesh (`Engine(..., mesh=qwenjax.parallel.sharding.mesh_from_flags("data:2,tensor:4"))`) the weights,
the cache and the [B, V] slot state are placed by `qwenjax.parallel.sharding`'s rules (pages and slots over data,
heads, MLP and vocabulary over tensor) and every jitted step returns them in the layout they came in.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax

from qwenjax._errors import ConfigError, InputError
from qwenjax.checkpoints.peft import load_adapter
from qwenjax.engine import constraints as constraints_lib
from qwenjax.engine.input_processor import InputProcessor, prompt_ids
from qwenjax.engine.kv_manager import KVManager
from qwenjax.engine.output_processor import OutputProcessor
from qwenjax.engine.pages import PagePool
from qwenjax.engine.requests import Request, RequestOutput, StreamEvent, as_request
from qwenjax.engine.runner import ModelRunner
from qwenjax.engine.sampling_params import SamplingParams
from qwenjax.engine.scheduler import Scheduler, StepPlan, VerifyPlan
from qwenjax.engine.speculative import Proposer, SpeculativeConfig
from qwenjax.kernels.buckets import step_buckets
from qwenjax.model import lora as lora_lib
from qwenjax.model import registry
from qwenjax.model.decoder import Qwen2
from qwenjax.model.lora import Adapter, LoraBank
from qwenjax.multimodal import processing
from qwenjax.multimodal.positions import VLPrompt
from qwenjax.parallel.axes import DEFAULT_RULES, ShardingRules
from qwenjax.text.tokenizer import Tokenizer


class Engine:
  """Continuous-batching generation for one loaded model.

  tokenizer: renders chat messages, encodes text prompts, decodes completions; None: token ids only.
  max_batch_size: decode slots (B): sequences that decode together. max_seq_len: the longest sequence (prompt plus
    generated tokens); a bound, not a reservation: the model's full context costs nothing until a sequence grows
    that long.
  max_prefill_chunk: the token budget of a step's prefill part (launch flag --max_num_batched_tokens): the prompt
    tokens one step computes beside a token for each decode slot, and its largest length bucket; longer prompts
    prefill over several steps.
  decode_steps: decode steps per jitted call while nothing prefills (fewer dispatches; a finished slot waits at most
    that many steps).
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
  mesh: a device mesh (`qwenjax.parallel.sharding.make_mesh` / `mesh_from_flags`) to shard the weights (in place,
    unless loaded onto it already), the KV cache and the slot state over, by `rules`; None: one device. A mesh may
    span several processes (hosts): each then runs the same requests in lockstep and sees the same tokens.
  seed: seeds the per-request seeds of requests that set none (default: fresh entropy); processes that share a
    mesh must pass the same one.
  lora: LoRA adapters by name (`qwenjax.model.lora.Adapter`s, or PEFT adapter directories): a request names its
    own (`Request.lora`; none: the base model), and rows with different adapters, or none, decode in one batch
    (`qwenjax.model.lora.LoraBank`). merge_lora: fold the one adapter given into the weights instead (every
    request then runs the tuned model; float weights only).
  speculative: speculative decoding (`qwenjax.engine.speculative.SpeculativeConfig`, or a mapping of its fields):
    decode steps verify proposed tokens (n-gram prompt lookup, or a draft model's) in one forward and keep those
    the target samples anyway, so outputs are those without it, token for token; None: off.
  """

  def __init__(self, model: Qwen2, tokenizer: Tokenizer | None, *, max_batch_size: int = 8, max_seq_len: int = 4096,
               max_prefill_chunk: int = 512, decode_steps: int = 4, eos_token_ids: Iterable[int] | None = None,
               page_size: int | None = None, kv_cache_memory: float | None = None, kv_cache_dtype: str | None = None,
               attention_impl: str | None = None, prefix_caching: bool = True,
               image_processor: processing.ImageProcessorConfig | None = None,
               mesh: jax.sharding.Mesh | None = None, rules: ShardingRules = DEFAULT_RULES,
               seed: int | None = None, lora: Mapping[str, Adapter | str | os.PathLike] | None = None,
               merge_lora: bool = False, media_root: str | os.PathLike | None = None,
               speculative: SpeculativeConfig | Mapping[str, Any] | None = None):
    self.model, self.tokenizer, self.cfg = model, tokenizer, model.cfg
    self.speculative = SpeculativeConfig.of(speculative)
    self.proposer = Proposer(self.speculative) if self.speculative is not None else None
    self.mesh, self.rules = mesh, rules
    adapters = {name: a if isinstance(a, Adapter) else load_adapter(a, model.cfg) for name, a in (lora or {}).items()}
    self.adapters: dict[str, int] = {}  # name -> index in the bank (a merged adapter: none)
    merged, bank = None, None
    if merge_lora:
      if len(adapters) != 1:
        raise ConfigError(f"merge_lora folds exactly one LoRA adapter into the weights; {len(adapters)} given.")
      (merged, adapter), = adapters.items()
      lora_lib.merge(model, adapter)
    elif adapters:
      bank = LoraBank.of(model.cfg, adapters)
      self.adapters = {name: i for i, name in enumerate(adapters)}
    self._merged_lora = merged
    self.image_processor = image_processor or processing.ImageProcessorConfig()
    self.max_batch_size, self.max_seq_len, self.decode_steps = max_batch_size, max_seq_len, decode_steps
    self.prefix_caching = bool(prefix_caching)
    self.buckets = step_buckets(max_prefill_chunk, max_batch_size, max_seq_len)
    if eos_token_ids is None:  # the tokenizer's (generation_config, <|im_end|>) and the model config's
      eos_token_ids = set(self.cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
    self.eos_token_ids = frozenset(eos_token_ids)
    draft = self._draft(model, tokenizer) if self.speculative is not None else None
    self.runner = ModelRunner(model, bank=bank, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                              buckets=self.buckets, decode_steps=decode_steps, page_size=page_size,
                              kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                              attention_impl=attention_impl, prefix_caching=self.prefix_caching,
                              image_processor=self.image_processor, mesh=mesh, rules=rules,
                              verify_widths=self.speculative.widths if self.speculative is not None else (),
                              draft=draft,
                              draft_sampled=draft is not None and self.speculative.draft_sampling == "sampled")
    self.vl_cfg, self.attention_impl = self.runner.vl_cfg, self.runner.attention_impl
    kv = self.runner.pages
    self.pool = PagePool(kv.num_pages, kv.page_size)
    self.kv = KVManager(self.pool, self.prefix_caching)
    self.scheduler = Scheduler(self.kv, max_batch_size=max_batch_size, decode_steps=decode_steps,
                               buckets=self.buckets, proposer=self.proposer)
    self.inputs = InputProcessor(tokenizer, self.cfg, self.vl_cfg, context_len=kv.context_len,
                                 max_seq_len=max_seq_len, held_pages=kv.num_pages, eos_token_ids=self.eos_token_ids,
                                 image_processor=self.image_processor,
                                 media_root=os.path.realpath(os.getcwd() if media_root is None else media_root),
                                 adapters=self.adapters, merged_lora=merged, model_name=type(model).__name__,
                                 seed=secrets.randbits(64) if seed is None else seed)
    self.outputs = OutputProcessor()
    self._requests: dict[Any, int] = {}  # add_request's ids of unfinished requests -> their index
    self._indices = itertools.count()

  def _draft(self, model: Qwen2, tokenizer: Tokenizer | None) -> Qwen2 | None:
    """The speculative config's draft model, loaded in the target's dtype and checked against it: a text model
    whose vocabulary is the target's (its tokenizer's tokens; its logits no wider than the target's). ConfigError
    naming the draft otherwise."""
    draft = self.speculative.draft_model
    if draft is None:
      return None
    name, draft_tokenizer = type(draft).__name__, None
    if not isinstance(draft, Qwen2):
      from qwenjax.checkpoints.loader import load  # pylint: disable=g-import-not-at-top

      name = str(draft)
      loaded = load(name, dtype=jax.numpy.dtype(model.dtype).name)
      draft, draft_tokenizer = loaded.model, loaded.tokenizer
    if registry.for_model(model).multimodal or registry.for_model(draft).multimodal:
      raise ConfigError(f"draft model {name}: speculation with a draft model serves text models only; a Qwen2.5-VL "
                        "target or draft can use method 'ngram'.")
    ours, theirs = model.cfg.vocab_size, draft.cfg.vocab_size
    if tokenizer is not None and draft_tokenizer is not None:
      ours, theirs = tokenizer.vocab_size, draft_tokenizer.vocab_size
    if ours != theirs or draft.cfg.vocab_size > model.cfg.vocab_size:
      raise ConfigError(f"draft model {name}: its vocabulary ({theirs} tokens, logits over "
                        f"{draft.cfg.vocab_size}) is not the target's ({ours} tokens, logits over "
                        f"{model.cfg.vocab_size}); a draft must share the target's tokenizer.")
    return draft

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

  # ---- what the parts know ----------------------------------------------------------------------------------

  @property
  def page_size(self) -> int:
    return self.runner.pages.page_size

  @property
  def context_len(self) -> int:
    """The longest sequence that runs (max_seq_len, or what the whole page pool holds if less)."""
    return self.runner.pages.context_len

  @property
  def max_pages(self) -> int:
    return self.runner.pages.max_pages

  @property
  def media_root(self) -> str:
    return self.inputs.media_root

  @property
  def grammars(self) -> constraints_lib.Grammars:
    """The engine's grammar compiler and cache (each distinct response_format / tool_choice compiles once)."""
    return self.inputs.grammars

  @property
  def lora_names(self) -> tuple[str, ...]:
    """The LoRA adapters requests may name (a merged one included)."""
    return (*self.adapters, *((self._merged_lora,) if self._merged_lora else ()))

  def prepare(self, request: Request | str | Sequence[int] | dict,
              media_root: str | os.PathLike | None = None) -> list[int] | VLPrompt:
    """A request's prompt as token ids, or, with images or videos, as a `VLPrompt` (ids with one pad per merged
    patch, 3D positions, preprocessed images). InputError for anything malformed, unreadable or too long.
    media_root: where this request's local media must lie (default: the engine's)."""
    return self.inputs.prepare(request, media_root)

  def program_shapes(self, constrained: bool = False) -> dict[str, list[tuple]]:
    """Every shape the programs can be called with (`ModelRunner.program_shapes`): the bound on what a job of
    any length compiles."""
    return self.runner.program_shapes(constrained)

  def warm_up(self, prompt_logprobs: bool = False, constrained: bool = False, top_logprobs: bool = False,
              sampling: Iterable[SamplingParams] | None = None) -> int:
    """Compiles every program the scheduler can call (`program_shapes`: each step shape, and the sampler and
    decode shapes for the greedy, sampling and penalty variants) with inputs that write nothing, so that a job
    compiles nothing once it runs; prompt_logprobs: each step shape's scoring variant too (for jobs whose requests
    ask for prompt log-probabilities); constrained: the masked sampler and decode variants too (for jobs with
    response_format or tool_choice); top_logprobs: every variant again with top log-probabilities (for jobs whose
    requests ask for them); sampling: only the variants these parameters need (a job's default sampling), not all
    three. Returns how many programs it ran."""
    return self.runner.warm_up(prompt_logprobs, constrained, top_logprobs,
                               None if sampling is None else list(sampling))

  def stats(self) -> dict[str, int]:
    """Counters since the engine was made: prompt_tokens (computed by prefill), cached_tokens (read from shared
    prefix pages), generated_tokens, prefill_calls, decode_calls, preemptions, peak_sequences (most decoding at
    once), peak_pages (most pages held); and now: kv_pages_in_use, kv_pages_total, requests_running,
    requests_waiting. A speculative engine adds verify_calls (its decode_calls that verified proposals),
    spec_proposed_tokens, spec_accepted_tokens, spec_verify_rows (sequence steps with a proposal) and
    spec_mean_accepted_length (tokens such a step gained: accepted proposals plus the token after them)."""
    running = {seq.request_index for seq in self.scheduler.running}
    waiting = {seq.request_index for seq in self.scheduler.waiting} - running
    spec = self.proposer.stats() if self.proposer is not None else {}
    return {**self.runner.stats, "generated_tokens": self.outputs.generated_tokens, **self.scheduler.stats,
            "cached_tokens": self.kv.cached_tokens, "kv_pages_in_use": self.kv.pages_in_use,
            "kv_pages_total": self.pool.num_pages, "requests_running": len(running),
            "requests_waiting": len(waiting), **spec}

  # ---- the step seam --------------------------------------------------------------------------------------

  def add_request(self, request: Request | str | Sequence[int] | dict, sampling: SamplingParams | None = None, *,
                  prompt: list[int] | VLPrompt | None = None) -> Any:
    """Validates and queues a request (InputError if it is malformed: nothing is queued); returns its id, the
    request's own (`Request.id`) or a new one. sampling: the default for a request that carries none. prompt: the
    request's `prepare` result, where it was made already (a server prepares off the thread that steps)."""
    request = as_request(request)
    if request.id is not None and request.id in self._requests:
      raise InputError(f"request id {request.id!r} is already running.")
    if prompt is None:
      prompt = self.prepare(request)
    request_id = request.id if request.id is not None else f"req-{secrets.token_hex(6)}"
    self._requests[request_id] = self._add(request, prompt, sampling, request_id)
    return request_id

  def _add(self, request: Request, prompt: list[int] | VLPrompt, sampling: SamplingParams | None,
           request_id: Any) -> int:
    """Queues a prepared request; returns the engine's index of it."""
    index = next(self._indices)
    seqs = self.inputs.sequences(index, request, prompt, sampling)
    self.outputs.add(index, request_id, len(prompt_ids(prompt)), seqs)
    self.scheduler.add(seqs)
    return index

  def abort(self, request_id: Any) -> bool:
    """Stops a request added with `add_request`: its pages go back to the pool at once and nothing more comes out
    for it. False if no such request is unfinished."""
    index = self._requests.pop(request_id, None)
    if index is None:
      return False
    self.scheduler.abort(index)
    self.outputs.drop(index)
    return True

  def has_unfinished(self) -> bool:
    return self.scheduler.has_unfinished()

  def step(self) -> list[RequestOutput]:
    """One scheduler iteration (admission, then one ragged step or one decode block); returns a RequestOutput for
    each request that advanced, its completions so far, `finished` once all its samples are."""
    outputs, _ = self._step()
    return [out for _, out in outputs]

  def _step(self, refill: Callable[[], bool] | None = None
            ) -> tuple[list[tuple[int, RequestOutput]], list[StreamEvent]]:
    """`step`, queueing requests through `refill` (see `Scheduler.admit`); returns (index, output) pairs and the
    stream events."""
    admission = self.scheduler.admit(refill)
    self.runner.copy_pages(admission.copies)
    self.kv.copied(admission.copies)
    self.runner.encode_visuals(admission.seqs)
    self.runner.admit(admission.seqs)
    plan, advanced = self.scheduler.schedule(), []
    if isinstance(plan, StepPlan):
      tokens, logprobs = self.runner.step(plan)
      for row in plan.chunks:
        if row.last:
          self.scheduler.prefilled(row.seq)
      advanced = [row.seq for row in plan.decode + plan.chunks if row.last and tokens[row.seq.slot] >= 0]
      for seq in advanced:
        self.outputs.accept(seq, [int(tokens[seq.slot])], [logprobs[seq.slot].tolist()])
    elif isinstance(plan, VerifyPlan):
      start = time.perf_counter()
      tokens, logprobs, drafted = self.runner.verify(plan)
      self.proposer.note_seconds(plan.width, time.perf_counter() - start)
      advanced = [seq for seq in plan.slots if seq is not None]
      for seq in advanced:
        before = len(seq.tokens)
        self.outputs.accept_block(seq, tokens[:, seq.slot], logprobs[:, seq.slot])
        proposal = plan.proposals[seq.slot]
        if drafted is not None:  # the draft model's, made on the device
          proposal = drafted[seq.slot, :len(proposal)].tolist()
        self.proposer.record(seq, proposal, seq.tokens[before:])
        if not seq.finish_reason:
          self.scheduler.verified(seq)
    elif plan is not None:
      start = time.perf_counter()
      tokens, logprobs = self.runner.decode(plan)
      if self.proposer is not None:
        self.proposer.note_seconds(1, (time.perf_counter() - start) / plan.num_steps)
      advanced = [seq for seq in plan.slots if seq is not None]
      for seq in advanced:
        self.outputs.accept_block(seq, tokens[:, seq.slot], logprobs[:, seq.slot])
    for seq in advanced:
      if seq.finish_reason:
        self.scheduler.finish(seq)
    outputs, events = self.outputs.collect()
    for index, out in outputs:
      if out.finished and self._requests.get(out.id) == index:
        del self._requests[out.id]
    return outputs, events

  # ---- whole jobs ----------------------------------------------------------------------------------------

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
    for key, out, _ in self._drive(items, sampling):
      if out.finished:
        yield key, out

  def stream(self, requests: Sequence[Request | str | Sequence[int] | dict],
             sampling: SamplingParams | None = None) -> Iterator[StreamEvent]:
    """Yields text and tokens as they are produced; `request_index` is the position in `requests`."""
    requests = [as_request(r) for r in requests]
    items = [(i, r, self.prepare(r)) for i, r in enumerate(requests)]
    for _, _, event in self._drive(items, sampling, events=True):
      yield event

  def _drive(self, items: Iterable[tuple[Any, Request, list[int] | VLPrompt]], sampling: SamplingParams | None,
             events: bool = False) -> Iterator[tuple[Any, RequestOutput | None, StreamEvent | None]]:
    """Steps until `items` are done, queueing the next one whenever the scheduler has a free slot and nothing
    waiting; yields (key, output, None) per output, or with `events` (key, None, event) per stream event (an
    event's request_index: its key)."""
    source, keys = iter(items), {}

    def refill() -> bool:
      item = next(source, None)
      if item is None:
        return False
      key, request, prompt = item
      keys[self._add(request, prompt, sampling, request.id)] = key
      return True

    while True:
      outputs, stepped = self._step(refill)
      if events:
        for event in stepped:
          event.request_index = keys[event.request_index]
          yield event.request_index, None, event
      for index, out in outputs:
        if not events:
          yield keys[index], out, None
        if out.finished:
          del keys[index]
      if not self.scheduler.has_unfinished() and not refill():
        return
