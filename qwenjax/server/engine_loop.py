"""One thread that owns the engine and steps it; asyncio handlers talk to it through queues.

    loop = EngineLoop(engine, metrics)
    loop.start()                                   # the stepping thread
    handle = await loop.submit(request, prompt)    # prompt: engine.prepare(request), made off this thread
    async for output in handle:                    # a RequestOutput per step the request advanced, the last finished
      ...
    loop.abort(handle.request_id)                  # a client gone: its pages go back at the next step
    loop.stop()

Only the stepping thread touches the engine's scheduler, pages and device state: `submit` and `abort` post commands
to an inbox the thread drains before each step, and outputs go back to the event loop with `call_soon_threadsafe`.
An HTTP handler therefore never blocks the loop, and every request in flight shares the engine's batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from typing import Any

from absl import logging

from qwenjax._errors import InputError
from qwenjax.engine.requests import Request, RequestOutput


@dataclasses.dataclass
class _Failure:
  """What a handle yields instead of an output when the engine refused or lost its request."""

  error: BaseException


class RequestHandle:
  """A submitted request: iterate it for its RequestOutputs (cumulative; the last has `finished`)."""

  def __init__(self, request_id: Any, prompt_tokens: int, arrived: float):
    self.request_id = request_id
    self.prompt_tokens = prompt_tokens
    self.arrived = arrived  # time.monotonic() when the server received it
    self.first_token_at: float | None = None
    self.finished = False
    self._queue: asyncio.Queue[RequestOutput | _Failure] = asyncio.Queue()

  async def next(self, timeout: float | None = None) -> RequestOutput | None:
    """The next output (None when `timeout` seconds pass first). Raises the engine's error for this request."""
    try:
      item = await asyncio.wait_for(self._queue.get(), timeout)
    except asyncio.TimeoutError:
      return None
    if isinstance(item, _Failure):
      self.finished = True
      raise item.error
    if item.finished:
      self.finished = True
    return item


class EngineLoop:
  """Steps `engine` on a thread of its own while any request is unfinished; see the module docstring.

  metrics: a `qwenjax.server.metrics.Metrics` (or None), updated from the stepping thread after each step.
  """

  def __init__(self, engine, metrics=None, *, idle_wait: float = 0.05):
    self.engine = engine
    self.metrics = metrics
    self._idle_wait = idle_wait
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._handles: dict[Any, tuple[RequestHandle, asyncio.AbstractEventLoop]] = {}
    self._stopping = threading.Event()
    self._thread: threading.Thread | None = None
    self.error: BaseException | None = None  # what stopped the thread, if anything did
    self._generated = 0

  def start(self) -> None:
    self._thread = threading.Thread(target=self._run, name="qwenjax-engine", daemon=True)
    self._thread.start()

  def stop(self, timeout: float | None = 30.0) -> None:
    """Stops stepping: requests still in flight are aborted and their handles fail."""
    self._stopping.set()
    if self._thread is not None:
      self._thread.join(timeout)

  @property
  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  async def submit(self, request: Request, prompt: Any, prompt_tokens: int, arrived: float) -> RequestHandle:
    """Queues a prepared request (its `id` set and unique); returns its handle."""
    if not self.alive:
      raise RuntimeError("the engine loop is not running")
    handle = RequestHandle(request.id, prompt_tokens, arrived)
    self._inbox.put(("add", request, prompt, handle, asyncio.get_running_loop()))
    return handle

  def abort(self, request_id: Any) -> None:
    """Aborts a request at the next step (a no-op for one already finished). Safe from any thread."""
    self._inbox.put(("abort", request_id))

  # ---- the stepping thread -----------------------------------------------------------------------------

  def _deliver(self, request_id: Any, item: RequestOutput | _Failure) -> None:
    entry = self._handles.get(request_id)
    if entry is None:
      return
    handle, loop = entry
    if isinstance(item, _Failure) or item.finished:
      del self._handles[request_id]
    try:
      loop.call_soon_threadsafe(handle._queue.put_nowait, item)  # noqa: SLF001 (the handle's own queue)
    except RuntimeError:  # its event loop is closed: nobody is waiting
      pass

  def _drain(self, block: bool) -> None:
    try:
      command = self._inbox.get(timeout=self._idle_wait) if block else self._inbox.get_nowait()
    except queue.Empty:
      return
    while True:
      if command[0] == "add":
        _, request, prompt, handle, loop = command
        self._handles[request.id] = (handle, loop)
        try:
          self.engine.add_request(request, prompt=prompt)
        except Exception as e:  # noqa: BLE001 (that request's failure, not the loop's: InputError -> 400, else 500)
          if not isinstance(e, InputError):
            logging.exception("Adding request %s failed.", request.id)
          self._deliver(request.id, _Failure(e))
      else:
        request_id = command[1]
        if self.engine.abort(request_id) and self.metrics is not None:
          self.metrics.aborted.inc()
        self._handles.pop(request_id, None)
      try:
        command = self._inbox.get_nowait()
      except queue.Empty:
        return

  def _run(self) -> None:
    try:
      while not self._stopping.is_set():
        self._drain(block=not self.engine.has_unfinished())
        if not self.engine.has_unfinished():
          self._observe()
          continue
        try:
          outputs = self.engine.step()
        except InputError as e:  # nothing the engine checks at step time should get here; fail all, go on
          logging.exception("A step failed; failing the requests in flight.")
          self._fail_all(e)
          continue
        now = time.monotonic()
        for out in outputs:
          entry = self._handles.get(out.id)
          if entry is not None and entry[0].first_token_at is None and any(c.token_ids for c in out.outputs):
            entry[0].first_token_at = now
          self._deliver(out.id, out)
        self._observe()
    except BaseException as e:  # noqa: BLE001 (a dead engine must fail every waiting client, not hang them)
      logging.exception("The engine loop stopped.")
      self.error = e
    finally:
      self._fail_all(RuntimeError("the server is shutting down" if self.error is None else
                                  f"the engine stopped: {type(self.error).__name__}: {self.error}"))

  def _fail_all(self, error: BaseException) -> None:
    for request_id in list(self._handles):
      self.engine.abort(request_id)
      self._deliver(request_id, _Failure(error))

  def _observe(self) -> None:
    if self.metrics is not None:
      self.metrics.observe_engine(self.engine.stats())
