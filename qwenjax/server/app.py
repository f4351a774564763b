"""The OpenAI-compatible HTTP API over one engine (FastAPI; `launch.serve` runs it with uvicorn).

    app = build_app(engine, ServerConfig(served_model_name="qwen2.5-coder-0.5b-instruct", api_key="sk-..."))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/chat/completions, POST
/v1/completions (bodies as `qwenjax.engine.openai_batch` reads a batch line's, plus "stream" and
"stream_options"; streamed as server-sent events, `data: [DONE]` last).

Every request goes through one `EngineLoop`: a handler prepares its prompt off the loop's thread (tokenizing,
reading images), submits it, and awaits its outputs, so requests share the engine's batches and no handler blocks
another. A client that goes away has its request aborted at the next step. Errors are OpenAI's shape, {"error":
{"message", "type", "param", "code"}}, and never a traceback: 400 for a malformed body (code "invalid_json"), a bad
field (its name in "param"), an unknown model ("model_not_found") or an over-long prompt
("context_length_exceeded"); 401 for a missing or wrong API key; 413 for a body over `max_request_bytes` (refused
before it is parsed); 429 when `max_concurrent_requests` are in flight (refused rather than queued: the engine's
own queue holds what it admits, and a client told to retry later keeps latency bounded instead of piling up
work whose clients may have given up; the openai client retries 429s by itself); 408 past `request_timeout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import secrets
import time
from typing import Any

import fastapi
from absl import logging
from fastapi import responses
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qwenjax._errors import INVALID_REQUEST, InputError
from qwenjax.engine import openai_batch
from qwenjax.engine.constraints import GRAMMAR_ERROR
from qwenjax.engine.input_processor import prompt_ids
from qwenjax.engine.sampling_params import SamplingParams
from qwenjax.server.engine_loop import EngineLoop
from qwenjax.server.metrics import Metrics
from qwenjax.server.streaming import ResponseStream
from qwenjax.text import reasoning as reasoning_lib


@dataclasses.dataclass
class ServerConfig:
  served_model_name: str
  api_key: str | None = None  # every endpoint but /health then needs "Authorization: Bearer <api_key>"
  max_concurrent_requests: int = 256  # requests in flight; one more gets 429
  request_timeout: float | None = None  # seconds from arrival to the last token; None: no limit
  max_request_bytes: int = 32 << 20  # a body over this is refused unread (413)
  default_sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
  # Split chat replies' thinking blocks into reasoning_content, for a model whose chat template thinks (Qwen3).
  reasoning_content: bool = True
  disconnect_poll: float = 0.25  # seconds between checks that a non-streaming request's client is still there


class APIError(Exception):
  """An error response: status and OpenAI's error object."""

  def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
               kind: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers
    self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

  def response(self) -> responses.JSONResponse:
    return responses.JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_PARAM = re.compile(r"^body\.([A-Za-z_][A-Za-z_0-9]*)")


def _input_error(e: InputError) -> APIError:
  """A 400 from an InputError; its param is the body field the message names first ("body.temperature ...")."""
  message = str(e)
  match = _PARAM.match(message)
  return APIError(400, message, code=getattr(e, "code", INVALID_REQUEST), param=match.group(1) if match else None)


class _Stream(responses.StreamingResponse):
  """A StreamingResponse that settles its request however it ends: sent whole, its client gone (the stream task
  cancelled, maybe before its first event, when the generator's own `finally` would never run), or failed."""

  def __init__(self, content, settle, **kw):
    super().__init__(content, **kw)
    self._settle = settle

  async def __call__(self, scope, receive, send) -> None:
    try:
      await super().__call__(scope, receive, send)
    finally:
      self._settle()  # first: the await below may be cancelled again (a forced shutdown)
      await self.body_iterator.aclose()


def _opens_thinking(tokenizer, ids: list[int]) -> bool:
  """Whether a chat prompt ends inside a thinking block (a template that writes `<think>` for the model)."""
  tail = tokenizer.decode(ids[-8:]).rsplit("<|im_start|>", 1)[-1]
  return reasoning_lib.OPEN in tail and reasoning_lib.CLOSE not in tail


def build_app(engine, config: ServerConfig) -> fastapi.FastAPI:
  """The FastAPI app serving `engine`; its lifespan starts and stops the engine's stepping thread."""
  metrics = Metrics()
  loop = EngineLoop(engine, metrics)
  tokenizer = engine.tokenizer
  splits = config.reasoning_content and tokenizer is not None and reasoning_lib.thinks(tokenizer.chat_template)
  in_flight = 0

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    loop.start()
    try:
      yield
    finally:
      loop.stop()

  app = fastapi.FastAPI(title="qwenjax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
  app.state.engine_loop, app.state.metrics = loop, metrics

  @app.exception_handler(APIError)
  async def _api_error(_request, e: APIError):
    return e.response()

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return APIError(e.status_code, str(e.detail), code=code).response()

  @app.exception_handler(Exception)
  async def _unexpected(_request, e: Exception):  # logged here, never shown to the client
    logging.error("Unexpected error serving a request: %s", e, exc_info=e)
    return APIError(500, "The server failed to serve this request; it is logged.", code="internal_error").response()

  def authorize(request: fastapi.Request) -> None:
    if config.api_key is None:
      return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
      raise APIError(401, "Incorrect or missing API key: send \"Authorization: Bearer <key>\".",
                     code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

  @app.get("/health")
  async def health():
    if not loop.alive:
      raise APIError(503, "The engine is not running.", code="engine_stopped")
    return {"status": "ok"}

  @app.get("/metrics", dependencies=[fastapi.Depends(authorize)])
  async def prometheus_metrics():
    body, content_type = metrics.render()
    return fastapi.Response(body, media_type=content_type)

  def model_names() -> list[str]:
    return [config.served_model_name, *engine.lora_names]

  @app.get("/v1/models", dependencies=[fastapi.Depends(authorize)])
  async def models():
    created = int(time.time())
    base = [{"id": config.served_model_name, "object": "model", "created": created, "owned_by": "qwenjax",
             "root": config.served_model_name, "parent": None}]
    adapters = [{"id": name, "object": "model", "created": created, "owned_by": "qwenjax",
                 "root": name, "parent": config.served_model_name} for name in engine.lora_names]
    return {"object": "list", "data": base + adapters}

  async def read_body(request: fastapi.Request) -> dict[str, Any]:
    limit = config.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
      raise APIError(413, f"The request body has {int(declared):,} bytes; the limit is {limit:,}.",
                     code="request_too_large")
    chunks, size = [], 0
    try:
      async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
          raise APIError(413, f"The request body passes the limit of {limit:,} bytes.", code="request_too_large")
        chunks.append(chunk)
    except ClientDisconnect:
      raise APIError(499, "The client went away before its request body arrived.",
                     code="client_closed_request") from None
    try:
      body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
      raise APIError(400, f"The request body is not valid JSON{where}: {getattr(e, 'msg', e)}.",
                     code="invalid_json") from None
    if not isinstance(body, dict):
      raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}.", code="invalid_json")
    return body

  async def completions(request: fastapi.Request, url: str):
    nonlocal in_flight
    authorize(request)
    endpoint = url.rsplit("/", 1)[-1]
    if in_flight >= config.max_concurrent_requests:
      metrics.requests.labels(endpoint, "429").inc()
      raise APIError(429, f"The server has {config.max_concurrent_requests} requests in flight, its limit; retry "
                     "later.", code="too_many_requests", kind="rate_limit_error", headers={"Retry-After": "1"})
    in_flight += 1
    released = False

    def release() -> None:  # when the response is whole: returned, or (streamed) its last event sent
      nonlocal in_flight, released
      if not released:
        in_flight -= 1
        released = True

    try:
      response = await serve(request, url, release)
    except APIError as e:
      metrics.requests.labels(endpoint, str(e.status)).inc()
      release()
      raise
    except BaseException:
      release()
      raise
    if isinstance(response, responses.StreamingResponse):
      metrics.requests.labels(endpoint, "200").inc()
    else:
      metrics.requests.labels(endpoint, str(response.status_code)).inc()
      release()
    return response

  async def serve(request: fastapi.Request, url: str, release):
    arrived = time.monotonic()
    body = await read_body(request)
    model = body.get("model")
    if model is not None and model not in model_names():
      raise APIError(400, f"The model {model!r} is not served here (served: {', '.join(model_names())}).",
                     code="model_not_found", param="model")
    chat = url == openai_batch.CHAT_URL
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    try:
      req = openai_batch.body_request(url, body, config.default_sampling, engine.lora_names,
                                      request_id=response_id, online=True)
      prompt = await run_in_threadpool(engine.prepare, req)
    except InputError as e:
      raise _input_error(e) from None
    try:
      handle = await loop.submit(req, prompt, len(prompt_ids(prompt)), arrived)
    except RuntimeError as e:  # the engine loop is not running
      raise APIError(503, f"The engine is not running: {e}.", code="engine_stopped") from None
    metrics.prompt_tokens.inc(handle.prompt_tokens)
    name = model if isinstance(model, str) else config.served_model_name
    created = int(time.time())
    opened = splits and chat and _opens_thinking(tokenizer, prompt_ids(prompt))
    if body.get("stream"):
      stream = ResponseStream(url, body, response_id, model=name, tokenizer=tokenizer, created=created,
                              reasoning=splits, opened=opened)
      def settle() -> None:  # however the stream ends, even before its first event: the place and the request
        release()
        if not handle.finished:
          loop.abort(handle.request_id)

      return _Stream(_events(handle, stream), settle, media_type="text/event-stream",
                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    output = await _result(request, handle)
    broken = openai_batch.grammar_failure(output)
    if broken is not None:
      raise APIError(500, broken, code=GRAMMAR_ERROR)
    return responses.JSONResponse(openai_batch.response_body(url, body, output, model=name, tokenizer=tokenizer,
                                                             response_id=response_id, created=created,
                                                             reasoning=splits, opened=opened))

  def deadline_passed(handle) -> bool:
    return config.request_timeout is not None and time.monotonic() - handle.arrived > config.request_timeout

  def timed_out() -> APIError:
    return APIError(408, f"The request ran past the server's timeout of {config.request_timeout:g} s and was "
                    "stopped.", code="request_timeout")

  def finished(handle) -> None:
    now = time.monotonic()
    if handle.first_token_at is not None:
      metrics.time_to_first_token.observe(handle.first_token_at - handle.arrived)
    metrics.e2e_latency.observe(now - handle.arrived)

  async def next_output(handle, timeout: float):
    try:
      return await handle.next(timeout)
    except InputError as e:  # refused by the engine when it was added
      raise _input_error(e) from None
    except RuntimeError as e:  # the engine stopped
      raise APIError(503, str(e), code="engine_stopped") from None

  async def _result(request: fastapi.Request, handle):
    """Waits for a non-streamed request's last output; aborts it if its client goes away or its time runs out."""
    try:
      while True:
        output = await next_output(handle, config.disconnect_poll)
        if output is not None and output.finished:
          finished(handle)
          return output
        if output is None and await request.is_disconnected():
          raise APIError(499, "The client went away.", code="client_closed_request")
        if deadline_passed(handle):
          raise timed_out()
    finally:
      if not handle.finished:
        loop.abort(handle.request_id)

  async def _events(handle, stream: ResponseStream):
    """The server-sent events of a streamed request (its place and request are settled by `_Stream`, however it
    ends)."""
    def event(obj) -> str:
      return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    while True:
      try:
        output = await next_output(handle, 1.0)
      except APIError as e:
        yield event(e.body())
        return
      if (output is None or not output.finished) and deadline_passed(handle):
        yield event(timed_out().body())
        return
      if output is None:
        yield ": keep-alive\n\n"  # a comment: clients skip it; a connection that is gone shows itself
        continue
      for chunk in stream.update(output):
        yield event(chunk)
      if output.finished:
        finished(handle)
        broken = openai_batch.grammar_failure(output)
        if broken is not None:
          yield event(APIError(500, broken, code=GRAMMAR_ERROR).body())
          return
        if stream.include_usage:
          yield event(stream.usage_chunk(output))
        yield "data: [DONE]\n\n"
        return

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request):
    return await completions(request, openai_batch.CHAT_URL)

  @app.post("/v1/completions")
  async def text_completions(request: fastapi.Request):
    return await completions(request, openai_batch.COMPLETIONS_URL)

  return app
