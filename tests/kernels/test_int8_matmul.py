"""The int8 matmuls against numpy and against each other: quantization (per channel and per token) equal to a numpy
computation, round trip within half a step, zero channels and rows giving scale 0 and no NaN; the reference
equal to numpy's float64 / int64 evaluation of the formulas; every XLA formulation, the generic Pallas kernel
(interpret mode) and the TPU kernel (Pallas TPU interpret mode) against the reference: w8a16 within 1e-5 of the
output's scale in float32 (2e-2 in bfloat16), w8a8's int32 dot equal to numpy's int64 one exactly. Shapes: K =
896 (Qwen2.5-0.5B's hidden size) with N cut down and not a multiple of any block, K not a multiple of the block,
rows 1, 3, 33, a zero row, a zero weight channel, both weight layouts; the TPU block sizes of Qwen2.5's real
shapes, by hand; the dispatch per row count; bad arguments refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from qwenjax import ConfigError
from qwenjax.kernels import int8_matmul as im
from qwenjax.kernels.int8_matmul_tpu import int8_matmul_tpu, lane_block, tpu_block_sizes

from conftest import compile_as_users

TOL = {np.float32: 1e-5, jnp.bfloat16: 2e-2}
TPU_INTERPRET = pltpu.InterpretParams()
# The XLA formulation, the generic Pallas kernel (interpret mode) and the TPU kernel (TPU interpret mode).
EVERY_IMPL = ({"impl": "xla"}, {"impl": "pallas", "interpret": True}, {"impl": "pallas", "interpret": TPU_INTERPRET})
INV_127 = np.float32(1 / 127)  # scale = amax * float32(1 / 127), values = round(w * (1 / scale)), as the code says
ROUNDING = 1e-4  # |w - values * scale| <= scale / 2 up to float32 rounding of w / scale (|w / scale| <= 127)


# --- numpy, independently of the code under test ---

def np_quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8 per row of float32 x [M, K]: (int8 [M, K], float32 scale [M])."""
  x = np.asarray(x, np.float32)
  scale = np.abs(x).max(axis=-1) * INV_127
  inverse = np.float32(1) / np.where(scale == 0, np.float32(1), scale)
  return np.clip(np.round(x * inverse[:, None]), -127, 127).astype(np.int8), scale


def np_int_dot(xq: np.ndarray, values: np.ndarray, transpose_rhs: bool) -> np.ndarray:
  w = np.asarray(values, np.int64)
  return np.asarray(xq, np.int64) @ (w.T if transpose_rhs else w)  # exact


def np_matmul(x, values, scale, mode: str, transpose_rhs: bool) -> np.ndarray:
  """The formulas in float64 (w8a16) or int64 (w8a8's dot)."""
  x, scale = np.asarray(x, np.float32), np.asarray(scale, np.float64)
  if mode == "w8a16":
    w = np.asarray(values, np.float64)
    return (x.astype(np.float64) @ (w.T if transpose_rhs else w)) * scale[None, :]
  xq, xs = np_quantize_rows(x)
  return np_int_dot(xq, values, transpose_rhs) * xs.astype(np.float64)[:, None] * scale[None, :]


def make_case(m: int, k: int, n: int, *, transpose_rhs: bool, seed: int = 0, zero_row: int | None = None,
              zero_channel: int | None = None, dtype=np.float32):
  """x [m, k] (one row zeroed if asked) and a quantized random weight (one output channel zeroed if asked)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)).astype(np.float32)
  x[:, 7] *= 20.0  # an outlier feature, as LLM activations have
  if zero_row is not None:
    x[zero_row] = 0.0
  w = (0.02 * rng.standard_normal((n, k) if transpose_rhs else (k, n))).astype(np.float32)
  if zero_channel is not None:
    if transpose_rhs:
      w[zero_channel] = 0.0
    else:
      w[:, zero_channel] = 0.0
  values, scale = im.quantize_per_channel(jnp.asarray(w), 1 if transpose_rhs else 0)
  return jnp.asarray(x, dtype), values, scale


def assert_close(got, want, tol):
  """Elementwise within tol of the output's scale (max |want|), and finite."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert np.all(np.isfinite(got)), "NaN or inf in the output"
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1e-30))


# --- Quantization ---

def test_quantize_per_channel_matches_numpy_and_round_trips():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((896, 40)).astype(np.float32)
  w[:, 3] = 0.0  # a zero channel
  values, scale = im.quantize_per_channel(jnp.asarray(w), 0)
  assert values.dtype == jnp.int8 and values.shape == w.shape
  assert scale.dtype == jnp.float32 and scale.shape == (40,)
  want_scale = np.abs(w).max(axis=0) * INV_127
  np.testing.assert_array_equal(np.asarray(scale), want_scale)
  inverse = np.float32(1) / np.where(want_scale == 0, np.float32(1), want_scale)
  np.testing.assert_array_equal(np.asarray(values), np.clip(np.round(w * inverse), -127, 127).astype(np.int8))
  err = np.abs(w - np.asarray(values, np.float32) * np.asarray(scale))
  assert np.all(err <= np.asarray(scale) / 2 * (1 + ROUNDING))
  assert scale[3] == 0 and not np.any(np.asarray(values[:, 3]))
  assert np.abs(np.asarray(values)).max() == 127


@pytest.mark.parametrize("shape,axis,scale_shape", [
    ((14, 64, 896), (0, 1), (896,)),  # o_proj [N, H, D]: contract heads and head dim
    ((896, 2, 64), 0, (2, 64)),  # k_proj [D, K, H]
    ((300, 896), 1, (300,)),  # embedding table [V, D] read as the head
    ((300, 896), -1, (300,)),
])
def test_quantize_per_channel_axes(shape, axis, scale_shape):
  w = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
  values, scale = im.quantize_per_channel(jnp.asarray(w), axis)
  assert values.shape == shape and scale.shape == scale_shape
  axes = tuple(a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis))
  np.testing.assert_array_equal(np.asarray(scale), np.abs(w).max(axis=axes) * INV_127)
  err = np.abs(w - np.asarray(values, np.float32) * np.expand_dims(np.asarray(scale), axes))
  assert np.all(err <= np.expand_dims(np.asarray(scale), axes) / 2 * (1 + ROUNDING))


def test_quantize_activations_matches_numpy_zero_row_no_nan():
  x, _, _ = make_case(5, 896, 8, transpose_rhs=False, zero_row=2)
  values, scale = im.quantize_activations(x)
  want_values, want_scale = np_quantize_rows(np.asarray(x))
  np.testing.assert_array_equal(np.asarray(values), want_values)
  np.testing.assert_array_equal(np.asarray(scale), want_scale)
  assert scale[2] == 0 and not np.any(np.asarray(values[2]))
  lead_values, lead_scale = im.quantize_activations(x.reshape(1, 5, 896))  # [..., K]
  assert lead_values.shape == (1, 5, 896) and lead_scale.shape == (1, 5)


# --- The reference against numpy ---

@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("mode", im.MODES)
def test_reference_matches_numpy(mode, transpose_rhs):
  x, values, scale = make_case(33, 896, 200, transpose_rhs=transpose_rhs, zero_row=5, zero_channel=11)
  got = im.int8_matmul_reference(x, values, scale, mode=mode, transpose_rhs=transpose_rhs)
  assert got.dtype == jnp.float32 and got.shape == (33, 200)
  assert_close(got, np_matmul(x, values, scale, mode, transpose_rhs), TOL[np.float32])
  assert not np.any(np.asarray(got[5])) and not np.any(np.asarray(got[:, 11]))


def test_reference_out_dtype_and_leading_dims():
  x, values, scale = make_case(6, 896, 40, transpose_rhs=False)
  got = im.int8_matmul_reference(x.reshape(2, 3, 896), values, scale, mode="w8a16", out_dtype=jnp.bfloat16)
  assert got.shape == (2, 3, 40) and got.dtype == jnp.bfloat16


# --- XLA formulations ---

@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("mode,formulation", [(mode, f) for mode in im.MODES for f in im.XLA_FORMULATIONS[mode]])
def test_xla_formulations_match_reference(mode, formulation, transpose_rhs):
  """N = 600: two column blocks of 256 and a remainder of 88."""
  fn = jax.jit(lambda x, v, s: im.XLA_FORMULATIONS[mode][formulation](x, v, s, transpose_rhs))
  for m, zero_row in ((1, None), (3, 1), (33, 0)):
    x, values, scale = make_case(m, 896, 600, transpose_rhs=transpose_rhs, zero_row=zero_row, zero_channel=3, seed=m)
    want = im.int8_matmul_reference(x, values, scale, mode=mode, transpose_rhs=transpose_rhs)
    assert_close(fn(x, values, scale), want, TOL[np.float32])


def test_column_blocks_of_qwen_shapes():
  """~1 MiB float32 blocks, multiples of 128: [896, 4864] in 19 blocks of 256, [4864, 896] in 7 of 128."""
  assert im.column_block(896, 4864) == 256 and im.column_block(4864, 896) == 128
  assert im.column_block(896, 151936) == 256 and im.column_block(896, 128) == 128 and im.column_block(896, 40) == 40


def test_column_block_loops_of_many_layers_share_their_buffers():
  """w8a16's column-block loop in a program of L layers (up, then down, as a model's MLP chains them): its output
  buffers are reused from layer to layer, so the program's temporaries do not grow by a layer's activations per
  layer. With a constant start (lax.map's zeros) XLA created every loop's buffer up front: +4 MiB a layer here,
  and 617 MiB of temporaries for a 512-token prefill of the 0.5B model against w8a8's 42."""
  t, d, f = 256, 128, 4096  # [T, D] activations, [D, F] up and [F, D] down weights: 2 column blocks of 2048 for up
  rng = np.random.default_rng(0)
  up = jnp.asarray(rng.integers(-127, 128, (d, f)), jnp.int8)
  down = jnp.asarray(rng.integers(-127, 128, (f, d)), jnp.int8)
  s_up, s_down = jnp.full((f,), 1e-3, jnp.float32), jnp.full((d,), 1e-3, jnp.float32)
  blocks = im.XLA_FORMULATIONS["w8a16"]["column_blocks"]

  def temp_bytes(layers):
    def program(x, up, down):
      for _ in range(layers):
        x = x + blocks(jax.nn.silu(blocks(x, up, s_up, False)), down, s_down, False)
      return x
    compiled = compile_as_users(jax.jit(program).lower(jnp.ones((t, d), jnp.float32), up, down))
    return compiled.memory_analysis().temp_size_in_bytes

  activations = t * f * 4  # one layer's [T, F] float32
  assert im.column_block(d, f) == 2048 and temp_bytes(1) >= activations
  assert temp_bytes(6) - temp_bytes(1) < activations


def test_dispatch():
  from qwenjax.kernels import cpu_paths  # noqa: PLC0415

  with cpu_paths.using():  # no probe record: the formulations this module's docstring measured
    assert im.xla_formulation("w8a16", backend="cpu") == "column_blocks"
    assert im.xla_formulation("w8a8", backend="cpu") == "int32_dot_2_rows"  # XLA:CPU's int8 GEMM needs M >= 2
  for backend in ("gpu", "tpu"):
    assert im.xla_formulation("w8a16", backend=backend) == "convert"  # the reference's formula
    assert im.xla_formulation("w8a8", backend=backend) == "int32_dot"
  for m in (1, 2, 33):
    x, values, scale = make_case(m, 896, 136, transpose_rhs=False, seed=m)
    for mode in im.MODES:
      want = im.int8_matmul_reference(x, values, scale, mode=mode)
      assert_close(im.int8_matmul(x, values, scale, mode=mode), want, TOL[np.float32])


def test_leading_dims_and_bfloat16():
  x, values, scale = make_case(6, 896, 72, transpose_rhs=True, dtype=jnp.bfloat16)
  for mode in im.MODES:
    want = im.int8_matmul_reference(x, values, scale, mode=mode, transpose_rhs=True)
    for impl in im.IMPLS:
      got = im.int8_matmul(x.reshape(2, 3, 896), values, scale, mode=mode, impl=impl, transpose_rhs=True)
      assert got.shape == (2, 3, 72) and got.dtype == jnp.bfloat16
      assert_close(got.reshape(6, 72).astype(jnp.float32), want.astype(jnp.float32), TOL[jnp.bfloat16])


# --- int8 x int8 -> int32, exactly ---

@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 896, 200), (33, 896, 200), (3, 300, 136)])  # N, K off every block multiple
def test_int8_dot_int32_is_exact(m, k, n, transpose_rhs):
  x, values, _ = make_case(m, k, n, transpose_rhs=transpose_rhs, zero_row=m - 1, seed=m + k)
  xq, _ = im.quantize_activations(x)
  want = np_int_dot(np.asarray(xq), np.asarray(values), transpose_rhs)
  for kwargs in EVERY_IMPL:
    got = im.int8_dot_int32(xq, values, transpose_rhs=transpose_rhs, **kwargs)
    assert got.dtype == jnp.int32, kwargs
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(kwargs))


def test_int8_dot_int32_extremes_do_not_overflow():
  """All +-127 at Qwen2.5's largest K (29568): 477 million, inside int32."""
  k = 29568
  xq = jnp.full((2, k), 127, jnp.int8).at[1].set(-127)
  values = jnp.full((k, 16), -127, jnp.int8)
  want = np_int_dot(np.asarray(xq), np.asarray(values), False)
  np.testing.assert_array_equal(np.asarray(im.int8_dot_int32(xq, values)), want)
  np.testing.assert_array_equal(np.asarray(im.int8_dot_int32(xq, values, impl="pallas", interpret=True)), want)


# --- The Pallas kernels against the reference ---

# (m, k, n, transpose_rhs, zero_row): K = 896 real (the hidden size), N cut down and off every block multiple.
PALLAS_CASES = [
    (1, 896, 200, False, None),
    (3, 896, 264, True, 1),
    (33, 896, 136, False, 32),
    (17, 300, 72, True, 0),  # K not a multiple of the block
]


@pytest.mark.parametrize("m,k,n,transpose_rhs,zero_row", PALLAS_CASES)
def test_generic_pallas_matches_reference(m, k, n, transpose_rhs, zero_row):
  x, values, scale = make_case(m, k, n, transpose_rhs=transpose_rhs, zero_row=zero_row, zero_channel=5, seed=m)
  for mode in im.MODES:
    want = im.int8_matmul_reference(x, values, scale, mode=mode, transpose_rhs=transpose_rhs)
    got = im.int8_matmul(x, values, scale, mode=mode, impl="pallas", transpose_rhs=transpose_rhs, interpret=True)
    assert_close(got, want, TOL[np.float32])
    if zero_row is not None:
      assert not np.any(np.asarray(got[zero_row]))


def test_generic_pallas_block_sizes():
  x, values, scale = make_case(40, 896, 200, transpose_rhs=False, seed=3)
  want = im.int8_matmul_reference(x, values, scale, mode="w8a16")
  for bm, bn, bk in ((16, 16, 16), (32, 128, 256), (64, 256, 1024)):
    got = im.int8_matmul_pallas(x, values, scale, block_m=bm, block_n=bn, block_k=bk, interpret=True)
    assert_close(got, want, TOL[np.float32])


@pytest.mark.parametrize("m,k,n,transpose_rhs,zero_row", PALLAS_CASES)
def test_tpu_kernel_matches_reference(m, k, n, transpose_rhs, zero_row):
  x, values, scale = make_case(m, k, n, transpose_rhs=transpose_rhs, zero_row=zero_row, zero_channel=5, seed=m)
  for mode in im.MODES:
    want = im.int8_matmul_reference(x, values, scale, mode=mode, transpose_rhs=transpose_rhs)
    got = im.int8_matmul(x, values, scale, mode=mode, impl="pallas", transpose_rhs=transpose_rhs,
                         interpret=TPU_INTERPRET)
    assert_close(got, want, TOL[np.float32])


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_tpu_kernel_partial_edge_blocks(transpose_rhs):
  """K = 2100 and N = 1100 over 1024-wide blocks (what 4864, 11008 and 151936 get): the last K and N blocks lie
  partly past the arrays, whose out-of-bounds reads the interpreter fills with garbage; several K steps."""
  x, values, scale = make_case(3, 2100, 1100, transpose_rhs=transpose_rhs, zero_row=2, seed=7)
  assert tpu_block_sizes(3, 2100, 1100, jnp.float32) == (8, 1024, 1024)
  for mode in im.MODES:
    lhs, lhs_scale = im.quantize_activations(x) if mode == "w8a8" else (x, None)
    got = int8_matmul_tpu(lhs, values, scale, lhs_scale, transpose_rhs=transpose_rhs, interpret=True)
    want = im.int8_matmul_reference(x, values, scale, mode=mode, transpose_rhs=transpose_rhs)
    assert_close(got, want, TOL[np.float32])


def test_tpu_kernel_bfloat16_and_explicit_blocks():
  x, values, scale = make_case(20, 896, 384, transpose_rhs=False, dtype=jnp.bfloat16, seed=4)
  want = im.int8_matmul_reference(x, values, scale, mode="w8a16").astype(jnp.float32)
  for blocks in (None, (16, 128, 128), (32, 896, 384)):
    got = int8_matmul_tpu(x, values, scale, block_sizes=blocks, interpret=True)
    assert got.dtype == jnp.bfloat16
    assert_close(got.astype(jnp.float32), want, TOL[jnp.bfloat16])


def test_no_nan_from_zero_rows_or_zero_scales():
  """An all-zero x, and a weight whose every channel is zero (every scale 0), through every implementation."""
  x, values, scale = make_case(3, 896, 72, transpose_rhs=False)
  zeros_x, zero_scale = jnp.zeros_like(x), jnp.zeros_like(scale)
  for mode in im.MODES:
    for kwargs in EVERY_IMPL:
      for a, s in ((zeros_x, scale), (x, zero_scale)):
        got = np.asarray(im.int8_matmul(a, values, s, mode=mode, **kwargs))
        assert np.all(got == 0), (mode, kwargs)


# --- TPU block sizes for Qwen2.5's real shapes ---

def test_tpu_block_sizes_of_qwen_shapes():
  """Divisors (multiples of 128) where one >= 512 exists, the full dim up to 1024, else 1024 with a partial block."""
  want = {896: 896, 128: 128, 1536: 768, 2048: 1024, 3584: 896, 5120: 1024, 8192: 1024, 4864: 1024, 8960: 896,
          11008: 1024, 18944: 512, 27648: 1024, 29568: 896, 151936: 1024, 152064: 768}
  assert {dim: lane_block(dim) for dim in want} == want
  for dim, block in want.items():
    assert block <= 1024 and (dim % block == 0 or dim in (4864, 11008, 151936)), dim
  assert tpu_block_sizes(1, 896, 4864, jnp.float32) == (8, 896, 1024)
  assert tpu_block_sizes(1, 896, 4864, jnp.bfloat16) == (16, 896, 1024)
  assert tpu_block_sizes(1, 896, 4864, jnp.int8) == (32, 896, 1024)
  assert tpu_block_sizes(1000, 29568, 8192, jnp.bfloat16) == (256, 896, 1024)


# --- Bad arguments ---

def test_refuses_bad_arguments():
  x, values, scale = make_case(2, 896, 40, transpose_rhs=False)
  with pytest.raises(ConfigError, match="mode='w4a16'"):
    im.int8_matmul(x, values, scale, mode="w4a16")
  with pytest.raises(ConfigError, match="impl='triton'"):
    im.int8_matmul(x, values, scale, mode="w8a16", impl="triton")
  with pytest.raises(ConfigError, match="values are float32"):
    im.int8_matmul(x, values.astype(jnp.float32), scale, mode="w8a16")
  with pytest.raises(ConfigError, match=r"x has shape \(2, 896\); expected \[..., K=40\]"):
    im.int8_matmul(x, values, scale, mode="w8a16", transpose_rhs=True)
  with pytest.raises(ConfigError, match="scale has shape"):
    im.int8_matmul(x, values, scale[:-1], mode="w8a8")
  with pytest.raises(ConfigError, match="2D"):
    im.int8_matmul_reference(x, values[None], scale, mode="w8a16")
  with pytest.raises(ConfigError, match="expected int8"):
    im.int8_dot_int32(x, values)
  with pytest.raises(ConfigError, match="axis"):
    im.quantize_per_channel(jnp.ones((4, 4)), 2)
  with pytest.raises(ConfigError, match="block_n=48"):
    im.int8_matmul_pallas(x, values, scale, block_n=48, interpret=True)
  with pytest.raises(ConfigError, match="bm=12"):
    int8_matmul_tpu(x, values, scale, block_sizes=(12, 896, 40), interpret=True)
  with pytest.raises(ConfigError, match="bk=100"):
    int8_matmul_tpu(x, values, scale, block_sizes=(8, 100, 40), interpret=True)
