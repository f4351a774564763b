"""Exceptions that qwenjax raises for bad input: each message is one sentence naming the culprit."""


class QwenJaxError(Exception):
  """Base class of qwenjax's user-facing errors."""


class CheckpointError(QwenJaxError):
  """A checkpoint (safetensors, GGUF, Orbax) is missing, corrupt, or does not fit the model."""


class ConfigError(QwenJaxError):
  """A model config is malformed or asks for something qwenjax does not support."""


class InputError(QwenJaxError):
  """A prompt, message list or request is invalid (too long, malformed, wrong type)."""
