"""The input processor: a `Request` in, its prepared sequences out. Host only (the vision tower runs later, in
the runner, when a sequence is first admitted).

    inputs = InputProcessor(tokenizer, cfg, vl_cfg, context_len=..., ...)
    prompt = inputs.prepare(request)                     # ids, or a VLPrompt; InputError for anything malformed
    seqs = inputs.sequences(index, request, prompt, default_sampling)   # its n samples

`prepare` renders the chat template, encodes, preprocesses images and videos into their positions, compiles the
grammar of a response_format or tool_choice and looks up the LoRA adapter, so a malformed request fails here,
before any work starts, with one InputError naming the field at fault.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from qwenjax._errors import CONTEXT_LENGTH_EXCEEDED, InputError
from qwenjax.config import QwenConfig
from qwenjax.engine import constraints as constraints_lib
from qwenjax.engine import sequence as sequence_lib
from qwenjax.engine.pages import prefix_root
from qwenjax.engine.requests import Request, as_request, checked_message
from qwenjax.engine.sampling_params import SamplingParams
from qwenjax.model.qwen2_vl import QwenVLConfig
from qwenjax.multimodal import processing
from qwenjax.multimodal.positions import VLPrompt, vl_prompt
from qwenjax.text.tokenizer import Tokenizer

# A prompt whose text (a raw prompt, or its messages' content together) is longer than this, in characters, is first
# counted in bounded pieces (`InputProcessor._refuse_far_over`), so that one far over the context costs little to
# refuse.
_COUNT_FROM_CHARS = 1 << 18


class InputProcessor:
  """Prepares requests for one engine: its tokenizer (None: token ids only), configs, context and adapters.

  context_len: the longest sequence the engine holds (prompt plus generated tokens); max_seq_len: what it was asked
  for (errors say when the cache is what bounds it, held_pages). adapters: LoRA adapter name -> index in the bank;
  merged_lora: the name of an adapter folded into the weights. media_root: where requests' local media must lie.
  """

  def __init__(self, tokenizer: Tokenizer | None, cfg: QwenConfig, vl_cfg: QwenVLConfig | None, *,
               context_len: int, max_seq_len: int, held_pages: int, eos_token_ids: frozenset[int],
               image_processor: processing.ImageProcessorConfig, media_root: str, adapters: dict[str, int],
               merged_lora: str | None, model_name: str, seed: int | None):
    self.tokenizer, self.cfg, self.vl_cfg = tokenizer, cfg, vl_cfg
    self.context_len, self.max_seq_len, self.held_pages = context_len, max_seq_len, held_pages
    self.eos_token_ids, self.image_processor, self.media_root = eos_token_ids, image_processor, media_root
    self.adapters, self.merged_lora, self.model_name = adapters, merged_lora, model_name
    self._seed_rng = np.random.default_rng(seed)
    self._grammars: constraints_lib.Grammars | None = None  # built on the first constrained request

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
      raise InputError(f"this model ({self.model_name}) takes no images or videos.")
    extra = request.chat_template_kwargs
    if extra is not None and (messages is None or not isinstance(extra, dict)
                              or not all(isinstance(k, str) for k in extra)):
      raise InputError("chat_template_kwargs must be an object of template variables, and goes with 'messages'.")
    own = sorted({"messages", "tools", "add_generation_prompt", "tokenize"} & set(extra or ()))
    if own:
      raise InputError(f"chat_template_kwargs may not set {own[0]!r}: the request sets it.")
    if messages is not None:
      self._refuse_far_over([(f"messages[{i}]", _content_text(m)) for i, m in enumerate(messages)])
      ids = self.tokenizer.apply_chat_template(messages, tools=request.tools, add_generation_prompt=True,
                                               tokenize=True, **(extra or {}))
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
    n = len(prompt_ids(prompt))
    if n >= self.context_len:
      self._refuse_length(n)
    self._constraint_spec(request)  # a malformed or uncompilable response_format / tool_choice: InputError here
    self.adapter_of(request)
    return prompt

  def sequences(self, index: int, request: Request, prompt: list[int] | VLPrompt,
                default: SamplingParams | None) -> list[sequence_lib.Sequence]:
    """A prepared request's n sequences (`index`: the engine's number for the request), each with its own seed
    stream, stop ids, detokenizer and grammar matcher."""
    params = request.sampling or default or SamplingParams()
    media = sequence_lib.Media(prompt) if isinstance(prompt, VLPrompt) else None
    ids = prompt_ids(prompt)
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
    # The context bounds generation: a sequence that fills it ends with finish_reason "length".
    max_tokens = min(params.max_tokens, self.context_len - len(ids))
    seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**31))
    adapter = self.adapter_of(request)
    # Keys and values depend on the adapter too (it adapts k and v), and on the images: each their own prefixes.
    root = prefix_root(visual_digest(media) + (b"" if adapter < 0 else b"lora:" + request.lora.encode()))
    text = lambda: self.tokenizer.stream(skip_special_tokens=True) if self.tokenizer else _NoText()
    seqs = [sequence_lib.Sequence(index, j, ids, params, seed, stop_ids, max_tokens, media, decoder=text(),
                                  prompt_logprobs=[] if params.prompt_logprobs and j == 0 else None,
                                  prefix_root=root, adapter=adapter)
            for j in range(params.n)]
    spec = self._constraint_spec(request)
    if spec is not None:  # n samples: n matchers
      for seq in seqs:
        seq.constraint = self.grammars.constraint(spec, seq.stop_ids)
    return seqs

  # ---- checks --------------------------------------------------------------------------------------------

  def _held(self) -> str:
    """The context's size as errors say it: "128", or "64 (all 4 pages of the KV cache)"."""
    held = "" if self.context_len == self.max_seq_len else f" (all {self.held_pages} pages of the KV cache)"
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

  def adapter_of(self, request: Request) -> int:
    """The index of the request's LoRA adapter in the bank (-1: the base model); InputError for an unknown name."""
    if request.lora is None or request.lora == self.merged_lora:
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

  # ---- constrained decoding (`qwenjax.engine.constraints`) -----------------------------------------------

  @property
  def grammars(self) -> constraints_lib.Grammars:
    """The grammar compiler and cache (each distinct response_format / tool_choice compiles once)."""
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


def prompt_ids(prompt: list[int] | VLPrompt) -> list[int]:
  return prompt.ids if isinstance(prompt, VLPrompt) else prompt


def visual_digest(media: sequence_lib.Media | None) -> bytes:
  """What a multimodal prompt's keys and values depend on besides its token ids (its images' and videos' pixels,
  grids and frame timing; its positions follow from those), for the root of its block hashes: b"" for text."""
  if media is None:
    return b""
  h = hashlib.blake2b(digest_size=16)
  for v in media.prompt.visuals:
    h.update(repr((v.kind, v.grid_thw, v.second_per_grid_t, v.merge_size, v.patches.shape, v.patches.dtype.str))
             .encode())
    h.update(np.ascontiguousarray(v.patches).tobytes())
  return h.digest()
