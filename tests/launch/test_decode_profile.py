"""launch.bench.decode_profile's pieces (the whole profile runs in tests/launch/test_benchmark.py's end-to-end
benchmark, --profile): time shared among concurrent operations, and the parts read from an optimized HLO module."""

import jax
import jax.numpy as jnp

from launch.bench.decode_profile import attribute, parse_hlo


def test_concurrent_operations_share_the_time_they_overlap():
  # a alone 0-2, a and b together 2-4, b alone 4-5, a gap, c 7-8.
  events = [{"ts": 0, "dur": 4}, {"ts": 2, "dur": 3}, {"ts": 7, "dur": 1}]
  shares, covered = attribute(events)
  assert shares == [3.0, 2.0, 1.0] and covered == 6.0


def test_parts_are_the_innermost_named_scope():
  def f(x, w):
    with jax.named_scope("attention"):
      with jax.named_scope("q"):
        y = jnp.tanh(x @ w)
    with jax.named_scope("norm"):
      return y * jax.lax.rsqrt(jnp.mean(y * y))

  x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
  parts = {i["part"] for i in parse_hlo(jax.jit(f).lower(x, w).compile().as_text()).values()}
  assert {"q", "norm"} <= parts and "attention" not in parts
