"""Attention: the plain-JAX references and the one dispatch point the models call.

`attention` (the decoder's causal grouped-query attention, with sliding windows) and `vision_attention` (the
vision tower's non-causal attention within segments) route by `impl` to an implementation: "xla", the
`*_reference` functions below, or "pallas", a Pallas kernel tested against its reference (the vision tower's:
`qwenjax.kernels.segment_attention`; the decoder has none yet, and asking for it is an error). The models never
choose by backend themselves.

Einsum legend (decoder):
  B batch            T query tokens of this step     S key positions
  N query heads      K KV heads                      G query heads per KV head (N = K*G)
  H head dim
Einsum legend (vision tower):
  P patches          Q queries of one block          S keys one query block reads
  N heads            H head dim
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax._errors import ConfigError
from qwenjax.kernels.segment_attention import segment_attention

IMPLS = ("xla", "pallas")


def attention_reference(q: jax.Array, keys: jax.Array, values: jax.Array, q_positions: jax.Array,
                        key_positions: jax.Array, window, *, dtype=None) -> jax.Array:
  """Causal grouped-query attention within a sliding window, in plain JAX.

  q: [B, T, N, H]; keys, values: [B, K, S, H] (heads before positions, as the KV cache holds them).
  q_positions: [B, T] position of each query; key_positions: [B, S] or [1, S] position of each key.
  window: query at p attends to keys at p - window < position <= p (an int, or a traced scalar under scan).
  dtype: probabilities are cast to it before they weight the values (the model's compute dtype; None: values').
  Scores and the softmax are float32. Returns [B, T, N, H].
  """
  b, t, n, h = q.shape
  k = keys.shape[1]
  # [B, T, K, G, H]. With query heads split over tensor and KV heads whole (tensor > K), a device's heads are a
  # block of (K, G): it reads its own K's keys, all on device, and the math is that of one device.
  q = q.reshape(b, t, k, n // k, h)
  scores = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32) * (h ** -0.5)
  delta = q_positions[:, :, None] - key_positions[:, None, :]  # [B, T, S] query minus key position
  mask = (delta >= 0) & (delta < window)
  scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype if dtype is None else dtype)
  return jnp.einsum("bkgts,bksh->btkgh", probs, values).reshape(b, t, n, h)


def vision_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block_q: int,
                               kv_span: int | None = None) -> jax.Array:
  """Non-causal attention within segments, in plain JAX.

  q, k, v: [P, N, H]; segments: [P] int32. Query i attends to key j iff segments[i] == segments[j]; every token
  attends to itself, so no row is empty. Queries go `block_q` at a time (P a multiple of it), so scores take
  [N, Q, S] float32, never [N, P, P]: S = P, or with `kv_span` (every segment a contiguous run of at most
  `kv_span` tokens: windows) S = Q + 2 * kv_span keys around the block. Returns [P, N, H] in q's dtype.
  """
  p, _, h = q.shape
  assert p % block_q == 0, (p, block_q)
  span = p if kv_span is None else min(p, block_q + 2 * kv_span)

  def one_block(i):
    start = i * block_q
    qb = jax.lax.dynamic_slice_in_dim(q, start, block_q)  # [Q, N, H]
    q_seg = jax.lax.dynamic_slice_in_dim(segments, start, block_q)  # [Q]
    k_start = jnp.clip(start - (span - block_q) // 2, 0, p - span)
    kb, vb = (jax.lax.dynamic_slice_in_dim(a, k_start, span) for a in (k, v))  # [S, N, H]
    k_seg = jax.lax.dynamic_slice_in_dim(segments, k_start, span)  # [S]
    scores = jnp.einsum("qnh,snh->nqs", qb, kb, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where((q_seg[:, None] == k_seg[None, :])[None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("nqs,snh->qnh", probs, vb)

  return jax.lax.map(one_block, jnp.arange(p // block_q)).reshape(q.shape)


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ConfigError(f"attention impl {impl!r} is not one of {', '.join(IMPLS)}.")


def attention(q: jax.Array, keys: jax.Array, values: jax.Array, q_positions: jax.Array, key_positions: jax.Array,
              window, *, dtype=None, impl: str = "xla") -> jax.Array:
  """The decoder's attention by `impl` (arguments as `attention_reference`); "xla" is the reference."""
  _check_impl(impl)
  if impl == "pallas":
    raise ConfigError("attention impl 'pallas' has no kernel for the decoder's attention yet; use 'xla'.")
  return attention_reference(q, keys, values, q_positions, key_positions, window, dtype=dtype)


def vision_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block_q: int,
                     kv_span: int | None = None, impl: str = "xla") -> jax.Array:
  """The vision tower's attention by `impl` (arguments as `vision_attention_reference`); "xla" is the reference.

  "pallas" runs `segment_attention` (interpret mode on CPU) with its own blocks and block skipping: `block_q` and
  `kv_span` shape only the reference's schedule, never the result.
  """
  _check_impl(impl)
  if impl == "pallas":
    return segment_attention(q, k, v, segments)
  return vision_attention_reference(q, k, v, segments, block_q=block_q, kv_span=kv_span)
