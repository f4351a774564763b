"""The server's Prometheus metrics (prometheus_client), in a registry of the server's own.

    metrics = Metrics()
    metrics.observe_engine(engine.stats())   # the stepping thread, after each step
    metrics.time_to_first_token.observe(s)   # handlers
    body, content_type = metrics.render()    # GET /metrics
"""

from __future__ import annotations

import prometheus_client as prom

# Seconds; the time to first token runs from a few milliseconds (a short prompt, idle) to minutes (a long queue).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class Metrics:
  """Gauges of the engine's state, counters of tokens and requests, and latency histograms."""

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests_running = prom.Gauge("qwenjax_requests_running", "Requests decoding or prefilling.", registry=r)
    self.requests_waiting = prom.Gauge("qwenjax_requests_waiting", "Requests queued for a decode slot.", registry=r)
    self.kv_pages_in_use = prom.Gauge("qwenjax_kv_pages_in_use", "KV cache pages held by sequences.", registry=r)
    self.kv_pages_total = prom.Gauge("qwenjax_kv_pages_total", "KV cache pages in the pool.", registry=r)
    self.prompt_tokens = prom.Counter("qwenjax_prompt_tokens", "Prompt tokens of the requests served (each once, "
                                      "however many samples).", registry=r)
    self.cached_tokens = prom.Counter("qwenjax_cached_prompt_tokens", "Prompt tokens read from shared prefix "
                                      "pages instead of computed.", registry=r)
    self.generation_tokens = prom.Counter("qwenjax_generation_tokens", "Tokens generated.", registry=r)
    self.requests = prom.Counter("qwenjax_requests", "Requests answered, by endpoint and HTTP status.",
                                 ["endpoint", "status"], registry=r)
    self.aborted = prom.Counter("qwenjax_requests_aborted", "Requests aborted before they finished (the client "
                                "went away, or the request timed out).", registry=r)
    self.time_to_first_token = prom.Histogram("qwenjax_time_to_first_token_seconds", "From a request's arrival "
                                              "to its first generated token.", buckets=_TTFT_BUCKETS, registry=r)
    self.e2e_latency = prom.Histogram("qwenjax_e2e_request_latency_seconds", "From a request's arrival to its "
                                      "last token.", buckets=_LATENCY_BUCKETS, registry=r)
    self._seen = {"generated_tokens": 0, "cached_tokens": 0}

  def observe_engine(self, stats: dict) -> None:
    """Engine.stats() after a step: the gauges, and the counters by what grew since the last call."""
    self.requests_running.set(stats["requests_running"])
    self.requests_waiting.set(stats["requests_waiting"])
    self.kv_pages_in_use.set(stats["kv_pages_in_use"])
    self.kv_pages_total.set(stats["kv_pages_total"])
    for key, counter in (("generated_tokens", self.generation_tokens), ("cached_tokens", self.cached_tokens)):
      grown = stats[key] - self._seen[key]
      if grown > 0:
        counter.inc(grown)
      self._seen[key] = stats[key]

  def render(self) -> tuple[bytes, str]:
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
