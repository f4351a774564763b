"""qwenjax: a compiled inference engine for the Qwen2.5 model family on JAX/XLA.

    import qwenjax
    engine = qwenjax.Engine.load("default", max_batch_size=8)   # or a .gguf file, or a checkpoint directory
    [out] = engine.generate([{"messages": [{"role": "user", "content": "Reverse a list in Python"}]}],
                            qwenjax.SamplingParams(max_tokens=128))
    print(out.text, out.finish_reason, out.usage)
"""

from qwenjax._errors import CheckpointError, ConfigError, InputError, QwenJaxError
from qwenjax.checkpoints.loader import LoadedModel, load
from qwenjax.config import PRESETS, QwenConfig
from qwenjax.engine.compilation_cache import enable as enable_compilation_cache
from qwenjax.engine.cpu_records import use_cpu_paths
from qwenjax.engine.engine import Engine
from qwenjax.engine.programs import decode_step, extend, prefill
from qwenjax.engine.requests import Completion, Request, RequestOutput, StreamEvent
from qwenjax.engine.sampling_params import SamplingParams
from qwenjax.kernels.buckets import LengthBuckets
from qwenjax.model.decoder import Qwen2, StepMetadata
from qwenjax.model.kv_cache import KVCache
from qwenjax.model.qwen2_vl import VL_PRESETS, Qwen2VL, QwenVLConfig
from qwenjax.multimodal.processing import ImageProcessorConfig
from qwenjax.text.tokenizer import Tokenizer

__all__ = [
    "CheckpointError", "Completion", "ConfigError", "Engine", "ImageProcessorConfig", "InputError", "KVCache",
    "LengthBuckets", "LoadedModel", "PRESETS", "Qwen2", "Qwen2VL", "QwenConfig", "QwenJaxError", "QwenVLConfig",
    "Request", "RequestOutput", "SamplingParams", "StepMetadata", "StreamEvent", "Tokenizer", "VL_PRESETS",
    "decode_step", "enable_compilation_cache", "extend", "load", "prefill", "use_cpu_paths",
]
