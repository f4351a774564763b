r"""Serves a model over the OpenAI HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

  python -m launch.serve                                    # the embedded model on http://127.0.0.1:8000/v1
  python -m launch.serve --model=/path/to/Qwen2.5-7B-Instruct --dtype=bfloat16 --port=8080 --api_key=sk-local
  python -m launch.serve --lora=sql=/path/to/adapter --served_model_name=qwen-coder   # "model": "sql" picks it
  python -m launch.serve --speculative_method=ngram --num_speculative_tokens=4

  curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
    -d '{"model": "qwen2.5-coder-0.5b-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Model, engine and sampling flags are batch_generate's (the sampling flags are the default a request's own fields
override). One engine serves every request: continuous batching across clients, streaming, tools, response
formats, LoRA adapters by model name. SIGTERM or SIGINT: stop accepting, let running requests finish for up to
--shutdown_grace seconds, abort the rest, exit 0. Single-process: a multi-host mesh is for batch_generate.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import tempfile

from absl import app, flags, logging

from launch import _cli, _common

_HOST = flags.DEFINE_string("host", "127.0.0.1", "The address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "The port to listen on (0: any free port, logged).", lower_bound=0,
                             upper_bound=65535)
_API_KEY = flags.DEFINE_string("api_key", None, "When set (or $QWENJAX_API_KEY), every endpoint but /health needs "
                               "\"Authorization: Bearer <key>\"; a missing or wrong key gets 401.")
_SERVED_MODEL_NAME = flags.DEFINE_string("served_model_name", None, "The model's name in /v1/models and requests' "
                                         "\"model\" (default: from --model, e.g. qwen2.5-coder-0.5b-instruct). "
                                         "--lora adapters are served under their own names.")
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 16, "Decode slots: sequences generated at once across "
                                       "all clients.", lower_bound=1)
_MAX_CONCURRENT_REQUESTS = flags.DEFINE_integer(
    "max_concurrent_requests", 256, "Requests in flight (decoding or queued in the engine); one more is refused "
    "with 429 and Retry-After, which the openai client retries by itself.", lower_bound=1)
_REQUEST_TIMEOUT = flags.DEFINE_float("request_timeout", None, "Seconds a request may take from arrival to its "
                                      "last token; past it, it is aborted and answered 408 (default: no limit).",
                                      lower_bound=0.001)
_MAX_REQUEST_BYTES = flags.DEFINE_integer("max_request_bytes", 32 << 20, "A request body over this many bytes is "
                                          "refused (413) before it is read whole.", lower_bound=1024)
_SHUTDOWN_GRACE = flags.DEFINE_float("shutdown_grace", 30.0, "Seconds running requests get to finish after "
                                     "SIGTERM; the rest are aborted.", lower_bound=0)
_WARM_UP = flags.DEFINE_bool("warm_up", True, "Compile the programs requests run (greedy, sampled, with penalties, "
                             "constrained) before listening; those of top_logprobs compile on first use.")
_MEDIA_ROOT = flags.DEFINE_string("media_root", None, "The directory whose files requests may name as images or "
                                  "videos (file paths, file:// URLs); default: none (data: URLs only).")


def _graceful_server(config):
  """A uvicorn.Server whose SIGTERM / SIGINT end in a graceful shutdown and then status 0: uvicorn raises the
  signal again once it has shut down (for the previous handler to act on), which here finds it ignored."""
  import uvicorn  # pylint: disable=g-import-not-at-top

  class Server(uvicorn.Server):

    @contextlib.contextmanager
    def capture_signals(self):
      previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
      try:
        with super().capture_signals():
          yield
      finally:
        for sig, handler in previous.items():
          signal.signal(sig, handler)

  return Server(config)


def served_name(model: str) -> str:
  """The name a model is served under by default: the embedded one's, or its file or directory name."""
  if model == "default":
    return "qwen2.5-coder-0.5b-instruct"
  base = os.path.basename(os.path.normpath(model))
  return base.removesuffix(".gguf") or model


def main(argv):
  del argv
  import uvicorn  # pylint: disable=g-import-not-at-top

  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.engine import Engine  # pylint: disable=g-import-not-at-top
  from qwenjax.server import ServerConfig, build_app  # pylint: disable=g-import-not-at-top

  try:
    if _common.COORDINATOR.value or (_common.NUM_PROCESSES.value or 1) > 1:
      raise qwenjax.ConfigError("launch.serve runs in one process; serve a multi-host model with batch_generate.")
    _common.use_cpu_paths()
    _common.enable_compilation_cache()
    model = _common.MODEL.value
    serving = _common.serving(model, max_batch_size=_MAX_BATCH_SIZE.value, max_seq_len=_common.MAX_SEQ_LEN.value,
                              explicit_sizes=_common.explicit("max_batch_size", "max_seq_len"))
    lora = _common.lora_kwargs()
    speculative = _common.speculative_kwargs()
    if _MEDIA_ROOT.value is not None and not os.path.isdir(_MEDIA_ROOT.value):
      raise qwenjax.InputError(f"--media_root={_MEDIA_ROOT.value}: not a directory.")
    default = _common.sampling_params()
    api_key = _API_KEY.value or os.environ.get("QWENJAX_API_KEY") or None
    # Without --media_root, local paths resolve inside an empty private directory: a client reads no file here.
    media_root = _MEDIA_ROOT.value
    if media_root is None:
      media_root = tempfile.mkdtemp(prefix="qwenjax-serve-no-media-")
      atexit.register(os.rmdir, media_root)  # empty by construction; every exit but a kill removes it
    engine = Engine.load(model, **_common.load_kwargs(), max_batch_size=serving.max_batch_size,
                         max_seq_len=serving.max_seq_len, max_prefill_chunk=serving.max_prefill_chunk,
                         decode_steps=_common.DECODE_STEPS.value, mesh=serving.mesh, media_root=media_root,
                         **serving.cache_kwargs(), **lora, **speculative)
    _cli.check_interrupted()
    if _WARM_UP.value:
      count = engine.warm_up(constrained=True, sampling=None)
      logging.info("Warm-up: %d programs compiled.", count)
      _cli.check_interrupted()
    name = _SERVED_MODEL_NAME.value or served_name(model)
    if name in engine.lora_names:
      raise qwenjax.ConfigError(f"--served_model_name={name} is also a --lora adapter's name; give them apart.")
    config = ServerConfig(served_model_name=name, api_key=api_key,
                          max_concurrent_requests=_MAX_CONCURRENT_REQUESTS.value,
                          request_timeout=_REQUEST_TIMEOUT.value, max_request_bytes=_MAX_REQUEST_BYTES.value,
                          default_sampling=default, reasoning_content=_common.REASONING_CONTENT.value)
  except qwenjax.QwenJaxError as e:
    _cli.fail(e)
  server = _graceful_server(uvicorn.Config(build_app(engine, config), host=_HOST.value, port=_PORT.value,
                                           timeout_graceful_shutdown=_SHUTDOWN_GRACE.value, log_level="info",
                                           access_log=False, lifespan="on"))
  logging.info("Serving %s%s on http://%s:%d/v1", name, f" and adapters {', '.join(engine.lora_names)}"
               if engine.lora_names else "", _HOST.value, _PORT.value)
  server.run()  # until SIGTERM / SIGINT: uvicorn stops accepting, waits for running requests, then returns
  if not server.started:
    _cli.fail(f"could not listen on {_HOST.value}:{_PORT.value} (see the log above)")
  logging.info("Stopped: %s", json.dumps(engine.stats()))


if __name__ == "__main__":
  app.run(_cli.interruptible(main, "the server stopped"), flags_parser=_cli.parse_flags)
