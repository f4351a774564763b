r"""Converts a model to a qwenjax Orbax checkpoint, which restores straight into a device mesh.

  python -m launch.convert --source=/ckpt/Qwen2.5-7B-Instruct --output=/ckpt/qwen2.5-7b-orbax --dtype=bfloat16
  python -m launch.convert --source=model.gguf --output=/ckpt/model-orbax
  python -m launch.convert --source=default --output=/ckpt/coder-0.5b-orbax
  python -m launch.convert --source=/ckpt/Qwen2.5-72B-Instruct --output=/ckpt/qwen72b-int8 --quantize=int8

The output directory (new, or empty) holds the weights under params/ (Orbax, stacked layers), config.json, the
tokenizer files, preprocessor_config.json for Qwen2.5-VL, and qwenjax_checkpoint.json (with --quantize, int8 values
and float32 scales per output channel, quantized one tensor at a time as the source loads); see
`qwenjax.checkpoints.orbax_store`. It is written as a temporary directory beside it, renamed at the end: a failed
(a full disk) or interrupted convert leaves nothing, and a second convert to the same output meanwhile is refused.
`--model=<output>` then loads it. Prints the output directory on stdout; logs go to
stderr.
"""

from __future__ import annotations

import time

from absl import app, flags, logging

from launch import _cli

_SOURCE = flags.DEFINE_string("source", None, "'default' (the embedded Qwen2.5-Coder-0.5B-Instruct), a .gguf file, "
                              "or a Hugging Face checkpoint directory.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The checkpoint directory to write; it must not exist or be empty.",
                              required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype the weights are stored in.")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8", "w8a8"], "Store int8 weights: int8 (w8a16) or "
                              "w8a8 (activations quantized per token at run time); norms and biases stay float.")
_QUANTIZE_EMBEDDINGS = flags.DEFINE_bool("quantize_embeddings", False, "With --quantize, the embedding and lm_head "
                                         "in int8 too.")


def main(argv):
  del argv
  from qwenjax import QwenJaxError  # pylint: disable=g-import-not-at-top  (--help stays fast)
  from qwenjax.checkpoints import loader, orbax_store  # pylint: disable=g-import-not-at-top  (--help stays fast)

  # Orbax logs its threads through absl, a failed write's traceback included: the failure is our one error line.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  orbax_store.quiet_failed_writes()
  start = time.perf_counter()
  try:
    output = loader.convert(_SOURCE.value, _OUTPUT.value, dtype=_DTYPE.value,
                            quantize=None if _QUANTIZE.value == "none" else _QUANTIZE.value,
                            quantize_embeddings=_QUANTIZE_EMBEDDINGS.value)
  except QwenJaxError as e:
    _cli.fail(e)
  logging.info("Wrote %s (%s, quantize=%s) in %.1f s.", output, _DTYPE.value, _QUANTIZE.value,
               time.perf_counter() - start)
  print(output)


if __name__ == "__main__":
  app.run(_cli.interruptible(main, "nothing was written; rerun the command"), flags_parser=_cli.parse_flags)
