r"""Generates a completion for one prompt.

  python -m launch.generate --prompt="Write a Python function that checks whether a number is prime."
  python -m launch.generate --model=/path/to/Qwen2.5-0.5B-Instruct --prompt="Hi" --json
  python -m launch.generate --model=model.gguf --raw --prompt="def fib(n):" --max_new_tokens=64
  python -m launch.generate --model=/path/to/Qwen2.5-VL-3B-Instruct --image=chart.png --prompt="What does it show?"
  python -m launch.generate --model=/path/to/Qwen2.5-VL-3B-Instruct --video=clip.mp4 --prompt="What happens?"
  python -m launch.generate --model=/path/to/Qwen2.5-32B-Instruct --mesh=tensor:8 --dtype=bfloat16 --prompt="Hi"
  python -m launch.generate --raw --prompt="def fib(n):" --max_new_tokens=1 --json --prompt_logprobs
  python -m launch.generate --quantize=int8 --prompt="Write a quicksort in Python."

stdout holds the generated text alone (or, with --json, one JSON object); logs go to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app, flags

from launch import _cli, _common

_PROMPT = flags.DEFINE_string("prompt", None, "The user message, rendered with the chat template (raw text with "
                              "--raw).", required=True)
_SYSTEM = flags.DEFINE_string("system", None, "System message; default: the chat template's own default.")
_RAW = flags.DEFINE_bool("raw", False, "Treat --prompt as raw text: no chat template.")
_USE_LORA = flags.DEFINE_string("use_lora", None, "The --lora adapter (by name) to answer with; default: the only "
                                "one given, if one is (and none with several: the base model).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object with text, token_ids, finish_reason and usage.")
_PROMPT_LOGPROBS = flags.DEFINE_bool("prompt_logprobs", False, "Add \"prompt_logprobs\" to the --json output: the "
                                     "log-probability of each prompt token given those before it (null for the "
                                     "first), scored in the prefill. Needs --json.")
_IMAGE = flags.DEFINE_multi_string("image", [], "An image (path, file:// or data: URL) placed before the prompt "
                                   "in the user message (repeatable; Qwen2.5-VL models). With --raw the prompt "
                                   "holds its own <|vision_start|><|image_pad|><|vision_end|> for each.")
_VIDEO = flags.DEFINE_multi_string("video", [], "A video placed before the prompt in the user message (repeatable; "
                                   "Qwen2.5-VL models): a video file (mp4, webm, mkv, ...: decoded with PyAV and "
                                   "sampled at 2 frames per second by Qwen's rules), or a directory of frame images "
                                   "read in name order as frames taken at 2 per second.")

_CHAT_TEMPLATE_KWARGS = flags.DEFINE_string("chat_template_kwargs", None, "A JSON object of chat template variables, "
                                            "e.g. '{\"enable_thinking\": false}' (Qwen3: no thinking block).")

_MEDIA_ROOT = flags.DEFINE_string("media_root", "/", "The directory --image and --video paths must lie in, symlinks "
                                  "resolved (default: anywhere: the command line is yours; batch_generate's lines are "
                                  "held to their input file's directory).")


def main(argv):
  del argv
  import qwenjax  # pylint: disable=g-import-not-at-top  (after flag parsing: --help stays fast)

  try:
    if _PROMPT_LOGPROBS.value and not _JSON.value:
      raise qwenjax.ConfigError("--prompt_logprobs: prompt log-probabilities are printed in the --json output; "
                                "pass --json too.")
    template_kwargs = None
    if _CHAT_TEMPLATE_KWARGS.value is not None:
      try:
        template_kwargs = json.loads(_CHAT_TEMPLATE_KWARGS.value)
      except json.JSONDecodeError as e:
        raise qwenjax.InputError(f"--chat_template_kwargs is not JSON: {e.msg} at character {e.pos}.") from None
      if not isinstance(template_kwargs, dict) or _RAW.value:
        raise qwenjax.InputError("--chat_template_kwargs must be a JSON object, and goes without --raw.")
    lora = _common.lora_kwargs()  # a malformed --lora fails before the model loads
    speculative = _common.speculative_kwargs()
    _common.use_cpu_paths()
    _common.enable_compilation_cache()
    model = _common.MODEL.value
    serving = _common.serving(model, max_batch_size=1, max_seq_len=_common.MAX_SEQ_LEN.value,
                              explicit_sizes=_common.explicit("max_seq_len") | {"max_batch_size"})
    loaded = qwenjax.load(model, mesh=serving.mesh, **_common.load_kwargs())
    if _RAW.value:
      request = qwenjax.Request(prompt=_PROMPT.value, images=_IMAGE.value, videos=_VIDEO.value)
    else:
      messages = ([{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value is not None else [])
      content = _PROMPT.value
      if _IMAGE.value or _VIDEO.value:
        content = ([{"type": "image_url", "image_url": {"url": image}} for image in _IMAGE.value]
                   + [{"type": "video", "video": video} for video in _VIDEO.value]
                   + [{"type": "text", "text": _PROMPT.value}])
      messages.append({"role": "user", "content": content})
      request = qwenjax.Request(messages=messages, chat_template_kwargs=template_kwargs)
    request.sampling = dataclasses.replace(_common.sampling_params(), prompt_logprobs=_PROMPT_LOGPROBS.value)
    engine = qwenjax.Engine(loaded.model, loaded.tokenizer, max_batch_size=1, max_seq_len=serving.max_seq_len,
                            max_prefill_chunk=serving.max_prefill_chunk, decode_steps=_common.DECODE_STEPS.value,
                            image_processor=loaded.image_processor, mesh=serving.mesh, **serving.cache_kwargs(),
                            media_root=_MEDIA_ROOT.value, **lora, **speculative)
    names = list(lora["lora"] or ())
    request.lora = _USE_LORA.value or (names[0] if len(names) == 1 else None)
    [out] = engine.generate([request])
    _common.log_compilation_cache()
  except qwenjax.QwenJaxError as e:
    _cli.fail(e)
  # The text leaves out the end-of-sequence token, and a character that max_new_tokens cut in half (byte-level
  # BPE spreads some over several tokens) rather than show U+FFFD.
  # A model that thinks (--reasoning_content): --json adds reasoning_content and content; the plain output is the
  # content alone, the reasoning on stderr.
  thought, content = None, out.text
  split = not _RAW.value and _common.splits_reasoning(loaded.tokenizer)
  if split:
    from qwenjax.text import reasoning  # pylint: disable=g-import-not-at-top

    thought, content = reasoning.split(out.text)
  if _JSON.value:
    record = {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason, "usage": out.usage}
    if split:
      record.update(reasoning_content=thought, content=content)
    if out.prompt_logprobs is not None:
      record["prompt_logprobs"] = out.prompt_logprobs
    print(json.dumps(record, ensure_ascii=False))
  else:
    if thought is not None:
      print(f"[reasoning] {thought}", file=sys.stderr)
    print(content)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
