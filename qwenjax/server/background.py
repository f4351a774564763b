"""uvicorn serving an app on a loopback port in a thread of this process (benchmarks, tests, notebooks).

    with BackgroundServer(build_app(engine, ServerConfig("qwen"))) as server:
      client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
"""

from __future__ import annotations

import threading
import time


class BackgroundServer:
  """`app` on host:port (port 0: a free one, read back once listening) until the block ends."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
    import uvicorn  # pylint: disable=g-import-not-at-top

    self.app, self.host, self.start_timeout = app, host, start_timeout
    self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self) -> BackgroundServer:
    self.thread.start()
    deadline = time.monotonic() + self.start_timeout
    while not self.server.started:
      if not self.thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"the server did not start on {self.host} within {self.start_timeout:g} s")
      time.sleep(0.02)
    self.port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f"http://{self.host}:{self.port}"
    return self

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True
    self.thread.join(60)
