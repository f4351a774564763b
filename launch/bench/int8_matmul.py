r"""XLA:CPU microbenchmark of the int8 matmul formulations, against the float32 matmul they replace.

  python -m launch.bench.int8_matmul                                  # Qwen2.5-0.5B's shapes, M = 1, 8, 32, 128
  python -m launch.bench.int8_matmul --rows=1,2,4 --modes=w8a16 --shapes=mlp_up,lm_head --repeats=30

Per shape (Qwen2.5-0.5B's: the MLP's gate/up [896, 4864] and down [4864, 896], q/o [896, 896], k/v [896, 128],
and the tied lm_head read as [151936, 896], transposed), mode and row count M, every formulation of
`qwenjax.kernels.int8_matmul.XLA_FORMULATIONS[mode]` (plus the candidates below that lost) is checked against
`int8_matmul_reference` (1e-4 of the output's scale) and timed,
and so is "float32": x @ w with the same weight stored as float32, the baseline to beat. A decode step reads
every weight once from memory, so each call gets the next of enough weight copies to cycle --rotate_mib of int8
bytes (4x that as float32): no weight is still in the 32 MiB L3 cache when it is read again. A timing is one
pass over the copies (the mean per call); the figure is the best of --repeats passes (other processes share the
machine's cores). Printed per call: microseconds, GB/s of weight bytes read (int8 bytes, or float32 bytes for the
baseline), speed-up over float32, and `*` on the formulation `int8_matmul(impl="xla")` runs at that M.

Candidates timed here that lost (checked against the reference before they are timed, like the kept ones):
  w8a16 int8_split  M <= 8: x split into 4 int8 pieces (each the row-wise int8 quantization of the residual of the
                    ones before: float32 accuracy), stacked as rows of one exact int8 x int8 dot, recombined
                    in float32; int8 bandwidth in principle, but no faster than column_blocks at M = 1 and 2x
                    slower at M = 8
  w8a16 row_blocks  a loop over ~1 MiB blocks of the weight's leading dim (rows of [K, N], accumulated): for
                    [896, 4864] that is 32-row blocks, short dots, slow past M = 8
  w8a16 mul_reduce  M = 1: sum over K of x[:, :, None] * w.astype(float32), one elementwise fusion that never
                    writes the converted weight out, but XLA:CPU's reduction loops run 10-100x slower
  w8a8 float32_dot  both int8 operands converted to float32 and dotted: the hoisted-convert problem of w8a16
  and, among the kept ones, w8a8 "int32_dot" (not padded) at M = 1 shows the matrix-vector cliff; at M >= 2 it
  is the same program as "int32_dot_2_rows", so their two figures show the noise between timings.

Measured on this project's 2-core AMD EPYC (Zen 4, 1 MiB L2 a core, 32 MiB L3) VM, jax 0.10.2, --repeats=10,
--rotate_mib=64, while other work loaded the cores (load average 1.5-5): microseconds per call (x float32 = the
speed-up over the float32 matmul; figures moved by up to ~2x between runs, the ratios less):
  shape      M  float32 | w8a16 column_blocks  (convert) | w8a8 int32_dot_2_rows
  mlp_up     1      566 |       764    0.74x      0.07x  |       223    2.54x
  mlp_up     8     1028 |       976    1.05x      0.11x  |       637    1.61x
  mlp_up    32     2105 |      2250    0.94x      0.22x  |       762    2.76x
  mlp_up   128     7286 |      7495    0.97x      0.54x  |      2565    2.84x
  mlp_down   1      464 |       477    0.97x      0.09x  |      1375    0.34x
  mlp_down   8      623 |      1176    0.53x      0.06x  |      1600    0.39x
  mlp_down  32     1109 |      2154    0.51x      0.20x  |      2511    0.44x
  mlp_down 128     3130 |      6906    0.45x      0.23x  |      6834    0.46x
  q_o        1      207 |       128    1.61x      0.14x  |        95    2.18x
  q_o        8      317 |       215    1.47x      0.16x  |       129    2.45x
  q_o       32      407 |       453    0.90x      0.22x  |       244    1.67x
  q_o      128     1144 |      1334    0.86x      0.41x  |       835    1.37x
  kv         1       21 |        18    1.19x      1.18x  |        16    1.29x
  kv         8       43 |        25    1.73x      1.77x  |        41    1.06x
  kv        32       68 |        59    1.16x      1.20x  |        81    0.85x
  kv       128      135 |       222    0.61x      1.14x  |       252    0.53x
  lm_head    1    14990 |     16768    0.89x      0.08x  |     10935    1.37x
  lm_head    8    32552 |     52661    0.62x      0.10x  |     15986    2.04x
  lm_head   32    44375 |     92191    0.48x      0.13x  |     39916    1.11x
  lm_head  128   140783 |    288766    0.49x      0.28x  |    205104    0.69x
Unpadded, w8a8's M = 1 int8 dot took 8350 us on mlp_up (0.07x) and 265131 us on lm_head (0.06x). Among the
w8a16 candidates column_blocks was the fastest or within the noise nearly everywhere (int8_split beat it on
mlp_up at M = 1, 571 us, and lost on the other shapes). w8a8 loses on mlp_down (K = 4864 long, N = 896 narrow)
in every run: XLA:CPU's int8 GEMM does not suit that shape (splitting K, or swapping the operands, was slower).
"""

from __future__ import annotations

import math

from absl import app, flags, logging

from launch import _cli
from launch.bench import measure

SHAPES = measure.MATMUL_SHAPES

_ROWS = flags.DEFINE_list("rows", ["1", "8", "32", "128"], "Row counts M (tokens) of x.")
_MODES = flags.DEFINE_list("modes", ["w8a16", "w8a8"], "Quantization modes to time.")
_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Weight shapes to time, among {', '.join(SHAPES)}.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed passes over the weight copies; the best is reported.",
                                lower_bound=1)

_ROTATE_MIB = flags.DEFINE_integer("rotate_mib", 64, "int8 weight bytes cycled through per pass (MiB), so that "
                                   "weights are read from memory, not cache.", lower_bound=0)



flags.register_validator("rows", measure.positive_integers, "expected positive integers, e.g. 1,8,32")
flags.register_validator("modes", lambda modes: bool(modes) and set(modes) <= {"w8a16", "w8a8"},
                         "expected modes among w8a16, w8a8")
flags.register_validator("shapes", lambda names: bool(names) and set(names) <= set(SHAPES),
                         f"expected shapes among {', '.join(SHAPES)}")


def _losing_candidates():
  """The formulations timed but not kept (module docstring): mode -> name -> (fn, largest M or None)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (--help stays fast)
  from jax import lax  # pylint: disable=g-import-not-at-top

  from qwenjax.kernels import int8_matmul as im  # pylint: disable=g-import-not-at-top

  def int8_split(x, values, scale, transpose_rhs, pieces=4):
    # x = sum_p q_p * s_p, piece p the row-wise int8 quantization of the residual of the pieces before (each
    # shrinks it ~254x: after 4, below max|x| * 2.4e-10); the pieces are stacked as rows of one exact int8 dot.
    residual, qs, ss = x.astype(jnp.float32), [], []
    for _ in range(pieces):
      q, s = im.quantize_activations(residual)
      residual = residual - q.astype(jnp.float32) * s[:, None]
      qs.append(q)
      ss.append(s)
    m = x.shape[0]
    acc = im._int32_dot(jnp.concatenate(qs), values, transpose_rhs, min_rows=2)  # [P * M, N]
    acc = acc.astype(jnp.float32).reshape(pieces, m, -1) * jnp.stack(ss)[:, :, None]
    return jnp.sum(acc, axis=0) * scale[None, :]

  def row_blocks(x, values, scale, transpose_rhs):
    # Blocks of the weight's leading (contiguous) dim under a loop: rows of [K, N] accumulated, rows of [N, K]
    # (output channels) concatenated; each ~1 MiB block converted to float32 in cache.
    rows, minor = values.shape
    block = max(b for b in range(1, min(rows, max(8, (1 << 20) // (4 * minor))) + 1) if rows % b == 0)
    blocks = values.reshape(rows // block, block, minor)
    if transpose_rhs:
      out = lax.map(lambda w: im._convert_dot(x, w, True), blocks)  # [B, M, block]
      return out.transpose(1, 0, 2).reshape(x.shape[0], rows) * scale[None, :]
    xs = x.reshape(x.shape[0], rows // block, block).transpose(1, 0, 2)  # [B, M, block]
    acc = lax.fori_loop(0, rows // block, lambda i, acc: acc + xs[i] @ blocks[i].astype(jnp.float32),
                        jnp.zeros((x.shape[0], minor), jnp.float32))
    return acc * scale[None, :]

  def mul_reduce(x, values, scale, transpose_rhs):
    w = values.astype(jnp.float32)
    if transpose_rhs:
      return jnp.sum(x[:, None, :] * w[None], axis=2) * scale[None, :]
    return jnp.sum(x[:, :, None] * w[None], axis=1) * scale[None, :]

  def float32_dot(x, values, scale, transpose_rhs):
    xq, xs = im.quantize_activations(x)
    acc = lax.dot_general(xq.astype(jnp.float32), values.astype(jnp.float32), im.dot_dims(transpose_rhs))
    return acc * xs[:, None] * scale[None, :]

  return {"w8a16": {"int8_split": (int8_split, 8), "row_blocks": (row_blocks, None), "mul_reduce": (mul_reduce, 1)},
          "w8a8": {"float32_dot": (float32_dot, None)}}


def time_shape(name: str, rows: list[int], modes: list[str], repeats: int, rotate_bytes: int) -> list[dict]:
  """One row per (mode, M, formulation) of one weight shape: microseconds per call, weight GB/s, x float32."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  from qwenjax.kernels import int8_matmul  # pylint: disable=g-import-not-at-top

  k, n, transpose_rhs = SHAPES[name]
  shape = (n, k) if transpose_rhs else (k, n)
  copies = max(1, math.ceil(rotate_bytes / (k * n)))
  rng = np.random.default_rng(0)
  int8_weights = [jnp.asarray(rng.integers(-127, 128, shape, dtype=np.int8)) for _ in range(copies)]
  scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (n,)), jnp.float32)
  losers = _losing_candidates()
  results = []

  float_weights = [w.astype(jnp.float32) for w in int8_weights]
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
  float32 = lambda x, w, s: lax.dot_general(x, w, dims)
  baselines = {}
  for m in rows:
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    baselines[m] = measure.best_seconds(float32, x, float_weights, scale, repeats)
    results.append(dict(shape=name, k=k, n=n, m=m, mode="-", formulation="float32", us=baselines[m] * 1e6,
                        gb_s=4 * k * n / baselines[m] / 1e9, speedup=1.0, chosen=False))
  del float_weights

  for mode in modes:
    candidates = {f: (fn, None) for f, fn in int8_matmul.XLA_FORMULATIONS[mode].items()} | losers[mode]
    for m in rows:
      x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
      chosen = int8_matmul.xla_formulation(mode, backend="cpu")
      want = np.asarray(int8_matmul.int8_matmul_reference(x, int8_weights[0], scale, mode=mode,
                                                          transpose_rhs=transpose_rhs))
      for formulation, (fn, max_rows) in candidates.items():
        if max_rows is not None and m > max_rows:
          continue
        got = np.asarray(jax.jit(fn, static_argnums=3)(x, int8_weights[0], scale, transpose_rhs))
        if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()):
          raise RuntimeError(f"{mode} {formulation} differs from int8_matmul_reference on {name} at M={m}.")
        seconds = measure.best_seconds(lambda x, w, s, fn=fn: fn(x, w, s, transpose_rhs), x, int8_weights, scale,
                                       repeats)
        results.append(dict(shape=name, k=k, n=n, m=m, mode=mode, formulation=formulation, us=seconds * 1e6,
                            gb_s=k * n / seconds / 1e9, speedup=baselines[m] / seconds,
                            chosen=formulation == chosen))
        logging.info("%s M=%d %s %s: %.1f us", name, m, mode, formulation, seconds * 1e6)
  return results


def format_table(results: list[dict]) -> str:
  lines = [f"{'shape':<9} {'K':>5} {'N':>6} {'M':>4} {'mode':<5} {'formulation':<19} {'us/call':>10} "
           f"{'weight GB/s':>11} {'x float32':>9}"]
  for r in results:
    mark = " *" if r["chosen"] else ""
    lines.append(f"{r['shape']:<9} {r['k']:>5} {r['n']:>6} {r['m']:>4} {r['mode']:<5} {r['formulation']:<19} "
                 f"{r['us']:>10.1f} {r['gb_s']:>11.2f} {r['speedup']:>9.2f}{mark}")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top

  if jax.default_backend() != "cpu":
    logging.warning("This benchmark chooses XLA:CPU's formulations; on %s the dispatch uses the reference's formula.",
                    jax.default_backend())
  rows = sorted({int(r) for r in _ROWS.value})
  results = []
  for name in _SHAPES.value:
    logging.info("Timing %s.", name)
    results += time_shape(name, rows, _MODES.value, _REPEATS.value, _ROTATE_MIB.value << 20)
  print(format_table(results))


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
