"""Exceptions that qwenjax raises for bad input: each message is one sentence naming the culprit."""


class QwenJaxError(Exception):
  """Base class of qwenjax's user-facing errors."""


class CheckpointError(QwenJaxError):
  """A checkpoint (safetensors, GGUF, Orbax) is missing, corrupt, or does not fit the model."""


class ConfigError(QwenJaxError):
  """A model config is malformed or asks for something qwenjax does not support."""


# The kinds of InputError, as batch jobs' error records name them (and OpenAI's error.code).
INVALID_REQUEST = "invalid_request"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # a prompt the context cannot hold with one generated token


class InputError(QwenJaxError):
  """A prompt, message list or request is invalid (too long, malformed, wrong type). code: its kind, set by the
  check that raises it (CONTEXT_LENGTH_EXCEEDED for a prompt too long; INVALID_REQUEST by default)."""

  def __init__(self, *args, code: str = INVALID_REQUEST):
    super().__init__(*args)
    self.code = code


def first_line(error: BaseException | str) -> str:
  """The first non-blank line of an error's text (or its type's name), to quote another library's error inside
  one of ours."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__
