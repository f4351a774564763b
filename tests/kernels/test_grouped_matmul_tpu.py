"""The TPU grouped matmul kernel (Pallas TPU interpret mode: uninitialised VMEM and edge blocks' padding NaN-filled,
output blocks revisited out of order refused) against jax.lax.ragged_dot and a float64 loop over groups: float32
within 1e-5 and bfloat16 within 2e-2 of the output's scale. Cases (test_grouped_matmul's, and empty first and last
experts) at K = 200 and N = 160 in 128-wide blocks (two K blocks and two column blocks, each with an edge) and
8-row tiles (M not a multiple; a tile spanning 3 groups; groups spanning several tiles; tiles past the last group);
the default blocks (full K and N); unchosen experts' weights poisoned with NaN (never multiplied); two cores taking
the column blocks with no race; the visit list by hand and against a numpy enumeration; the dispatch; bad
arguments refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # the race detector's state
from jax.experimental.pallas import tpu as pltpu
from test_grouped_matmul import CASES, make_operands, numpy_grouped_matmul
from test_int8_matmul import assert_close

from qwenjax import ConfigError
from qwenjax.kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference
from qwenjax.kernels.grouped_matmul_tpu import _w_block, _x_block, grouped_matmul_tpu, tpu_block_sizes, visits

TOL = {np.float32: 1e-5, jnp.bfloat16: 2e-2}
TPU_INTERPRET = pltpu.InterpretParams()
K, N = 200, 160  # two 128-wide blocks each, the second partly past the end
BLOCKS = {"block_m": 8, "block_k": 128, "block_n": 128}
TPU_CASES = {**CASES, "empty_first_and_last": ([0, 0, 5, 0, 9, 3, 0, 0], 3)}

_visits = jax.jit(visits, static_argnums=(1, 2))


def check(sizes, extra, dtype, *, seed=0, **kwargs):
  """The kernel on make_operands(sizes, extra) at K x N in `dtype` against ragged_dot and float64 numpy; rows past
  the last group 0. kwargs go to grouped_matmul_tpu (TPU interpret mode unless given)."""
  x, w, group_sizes = make_operands(sizes, extra, k=K, n=N, dtype=dtype, seed=seed)
  got = grouped_matmul_tpu(x, w, group_sizes, **{"interpret": TPU_INTERPRET, **kwargs})
  assert got.dtype == kwargs.get("out_dtype", dtype)
  got = np.asarray(got.astype(jnp.float32))
  assert_close(got, grouped_matmul_reference(x, w, group_sizes, out_dtype=jnp.float32), TOL[dtype])
  assert_close(got, numpy_grouped_matmul(x, w, sizes), TOL[dtype])
  assert not got[sum(sizes):].any()  # rows in no group


@pytest.mark.parametrize("case", sorted(TPU_CASES))
def test_float32_within_1e5_of_ragged_dot_and_float64(case):
  check(*TPU_CASES[case], np.float32, **BLOCKS)


def test_bfloat16_within_2e2():
  check(*CASES["many_tiles"], jnp.bfloat16, seed=1, block_m=16, block_k=128, block_n=128, out_dtype=jnp.float32)
  check(*CASES["uneven"], jnp.bfloat16, seed=2)  # default blocks: bm = 48, full K and N


def test_default_blocks():
  assert tpu_block_sizes(34, K, N, jnp.float32) == (40, K, N)  # M up to the sublane tile, the full K and N
  assert tpu_block_sizes(34, K, N, jnp.bfloat16) == (48, K, N)
  assert tpu_block_sizes(1000, 1408, 768, jnp.bfloat16) == (128, 512, 384)  # 1408 = 11 x 128: a 384-wide edge
  assert tpu_block_sizes(3, 2048, 4096, jnp.float32) == (8, 512, 512)
  check(*TPU_CASES["empty_first_and_last"], np.float32)


def test_experts_no_row_chose_are_never_multiplied():
  """Unchosen experts' weights are NaN: were any tile of them in a product, even times zeroed rows, NaN would
  spread (0 * NaN = NaN)."""
  sizes = [0, 5, 0, 0, 9, 0]
  x, w, group_sizes = make_operands(sizes, 2, k=K, n=N)
  poisoned = w.at[jnp.asarray([0, 2, 3, 5])].set(jnp.nan)
  got = np.asarray(grouped_matmul_tpu(x, poisoned, group_sizes, interpret=TPU_INTERPRET, **BLOCKS))
  assert_close(got, numpy_grouped_matmul(x, w, sizes), TOL[np.float32])


def test_two_cores_without_races():
  """The interpreter's race detector with two cores splitting the "parallel" column blocks: each core's visits
  still run in order on their resident output blocks, and nothing is read while being written."""
  check(*CASES["uneven"], np.float32, block_m=8, block_k=128, block_n=128,
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2))
  assert not interpret_pallas_call.races.races_found


def test_visits_by_hand():
  """Groups [3, 0, 7, 1, 0, 12, 2, 5] in 8-row tiles of 34 rows: tile 1 holds rows of groups 2, 3 and 5; group 5
  spans tiles 1 and 2; tile 4 is past the last group (row 30); groups 1 and 4 are never visited."""
  offsets, groups, tiles, active = _visits(jnp.asarray([3, 0, 7, 1, 0, 12, 2, 5]), 34, 8)
  assert offsets.tolist() == [0, 3, 3, 10, 11, 11, 23, 25, 30]
  assert int(active[0]) == 9 and len(tiles) == 5 + 8 - 1
  assert list(zip(groups.tolist(), tiles.tolist()))[:9] == [(0, 0), (2, 0), (2, 1), (3, 1), (5, 1), (5, 2), (6, 2),
                                                            (6, 3), (7, 3)]
  assert tiles.tolist()[9:] == [4, 4, 4]  # the tile past the last group, then padding repeating it
  offsets, groups, tiles, active = _visits(jnp.asarray([0, 0, 0]), 5, 8)  # no rows chosen: one tile of zeros
  assert offsets.tolist() == [0, 0, 0, 0] and int(active[0]) == 0 and tiles.tolist() == [0, 0, 0]
  offsets, groups, tiles, active = _visits(jnp.asarray([4, 10]), 8, 8)  # sizes past M cut off at M
  assert offsets.tolist() == [0, 4, 8] and int(active[0]) == 2 and list(zip(groups.tolist(), tiles.tolist())) == [
      (0, 0), (1, 0)]


def copies(block, meta, grid):
  """The blocks the pipeline copies in, stepping the grid (j, v, s) in order: one whenever `block`'s index map
  gives an index other than the previous step's."""
  out, previous = [], None
  for j in range(grid[0]):
    for v in range(grid[1]):
      for s in range(grid[2]):
        index = tuple(int(i) for i in block(j, v, s, *meta, last_k=grid[2] - 1))
        if index != previous:
          out.append(index)
        previous = index
  return out


def test_copies_only_chosen_experts_weights_and_nothing_for_inactive_visits():
  """Experts 1 (rows 0-4) and 4 (rows 5-13) of 6 in 8-row tiles of 24 rows: visits (1, 0), (4, 0), (4, 1), then
  tile 2 past the last group and padding, which add nothing. Per column block, each K block of expert 1's weight
  is copied once and expert 4's once per tile it spans; x's tiles once per visit; nothing more."""
  meta = [np.asarray(a) for a in _visits(jnp.asarray([0, 5, 0, 0, 9, 0]), 24, 8)]
  assert meta[3].tolist() == [3] and meta[2].tolist() == [0, 0, 1, 2, 2, 2, 2, 2]
  grid = (2, len(meta[2]), 2)  # (N / bn, V, K / bk)
  assert copies(_w_block, meta, grid) == [(g, s, j) for j in range(2) for g in (1, 4, 4) for s in range(2)]
  assert copies(_x_block, meta, grid) == [(t, s) for _ in range(2) for t in (0, 0, 1) for s in range(2)]


def numpy_visits(sizes, m, bm):
  """The (group, tile) pairs holding rows of the group, in row order, and the tiles past the last group's end."""
  pairs, start = [], 0
  for g, size in enumerate(sizes):
    end = min(start + size, m)
    pairs += [(g, t) for t in range(start // bm, -(-end // bm)) if end > start]
    start = end
  return pairs, list(range(-(-start // bm), -(-m // bm)))


@pytest.mark.parametrize("g,m,bm", [(5, 37, 8), (3, 16, 16), (8, 5, 8)])
def test_visits_enumerate_each_group_in_each_tile_once(g, m, bm):
  rng = np.random.default_rng(g)
  for _ in range(30):
    sizes = rng.multinomial(rng.integers(0, m + 4), rng.dirichlet(np.full(g, 0.3)))  # often 0, sometimes > M
    offsets, groups, tiles, active = map(np.asarray, _visits(jnp.asarray(sizes, jnp.int32), m, bm))
    pairs, tail = numpy_visits(sizes, m, bm)
    a = int(active[0])
    assert len(tiles) == -(-m // bm) + g - 1 and len(pairs) + len(tail) <= len(tiles), sizes
    assert list(zip(groups[:a].tolist(), tiles[:a].tolist())) == pairs, sizes
    assert tiles[a:a + len(tail)].tolist() == tail and (tiles[a + len(tail):] == tiles[-1]).all(), sizes
    assert (np.diff(tiles) >= 0).all(), sizes  # each output tile's visits are consecutive grid steps
    np.testing.assert_array_equal(offsets, np.minimum(np.cumsum([0, *sizes]), m))


def _pallas_kernels(fn, *args) -> list[str]:
  """The names of the pallas_calls `fn(*args)` traces to, in nested jaxprs too."""

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        yield eqn.params["name"]
      for param in eqn.params.values():
        if isinstance(param, jax.extend.core.ClosedJaxpr):
          yield from walk(param.jaxpr)

  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_dispatch():
  """impl="pallas" runs the TPU kernel when interpret is an InterpretParams (or on TPU), the generic one else."""
  x, w, sizes = make_operands([2, 0, 3], 1)
  run = lambda **kwargs: _pallas_kernels(lambda *a: grouped_matmul(*a, **kwargs), x, w, sizes)
  assert run(impl="pallas", interpret=TPU_INTERPRET) == ["grouped_matmul_tpu"]
  assert run(impl="pallas", interpret=True) == ["grouped_matmul"]
  assert run(impl="xla") == []


def test_bad_operands_are_one_config_error():
  x, w, sizes = make_operands([2, 3], 0, k=K, n=N)
  with pytest.raises(ConfigError, match=r"x \(5, 10\), w \(2, 200, 160\) and group_sizes \(2,\) disagree"):
    grouped_matmul_tpu(x[:, :10], w, sizes)
  with pytest.raises(ConfigError, match=r"group_sizes \(3,\) disagree"):
    grouped_matmul_tpu(x, w, jnp.asarray([2, 3, 0]))
  with pytest.raises(ConfigError, match=r"got \(5, 200\), \(200, 160\) and \(2,\)"):
    grouped_matmul_tpu(x, w[0], sizes)
  with pytest.raises(ConfigError, match="expected integers"):
    grouped_matmul_tpu(x, w, sizes.astype(jnp.float32))
  with pytest.raises(ConfigError, match="block_k=100 must be a multiple of 128 or the full dim 200"):
    grouped_matmul_tpu(x, w, sizes, block_k=100)
  with pytest.raises(ConfigError, match="block_m=8 must be a positive multiple of 16"):
    grouped_matmul_tpu(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), sizes, block_m=8)
  with pytest.raises(ConfigError, match=r"\(8, 4096, 1024\) need ~\d+ MiB of VMEM"):
    grouped_matmul_tpu(x, w, sizes, block_k=4096, block_n=1024)
