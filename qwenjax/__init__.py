"""qwenjax: a compiled inference engine for the Qwen2.5 model family on JAX/XLA.

    import qwenjax
    loaded = qwenjax.load("default")            # or a .gguf file, or a Hugging Face checkpoint directory
    gen = qwenjax.Generator(loaded.model, loaded.tokenizer.eos_token_ids)
    [out] = gen.generate([loaded.tokenizer.encode("def fib(n):")], qwenjax.SamplingParams(max_tokens=64))
    print(loaded.tokenizer.decode(out.token_ids))
"""

from qwenjax._errors import CheckpointError, ConfigError, InputError, QwenJaxError
from qwenjax.config import PRESETS, QwenConfig
from qwenjax.generation import Completion, Generator, SamplingParams
from qwenjax.loader import LoadedModel, load
from qwenjax.model import KVCache, Qwen2
from qwenjax.steps import LengthBuckets, decode_step, extend, prefill
from qwenjax.tokenizer import Tokenizer

__all__ = [
    "CheckpointError", "Completion", "ConfigError", "Generator", "InputError", "KVCache", "LengthBuckets",
    "LoadedModel", "PRESETS", "Qwen2", "QwenConfig", "QwenJaxError", "SamplingParams", "Tokenizer",
    "decode_step", "extend", "load", "prefill",
]
