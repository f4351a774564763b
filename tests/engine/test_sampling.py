"""Sampling: parameter validation, packing, penalties, each filter against hand-computed distributions, PRNG.

Empirical checks draw N_DRAWS tokens (one per step, vmapped) and compare frequencies with the expected
probabilities to within FREQ_TOL, over 4 standard errors at N_DRAWS (sqrt(0.25 / 20000) = 0.0035); tokens that a
filter removes must never be drawn. Filters run twice: on the top-k fast path and with fast_k=1, which sends every
row through the bisection fallback.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax._errors import InputError
from qwenjax.engine import sampling
from qwenjax.engine.sampling import SamplingNeeds, SamplingParams

N_DRAWS = 20_000
DRAW_VOCAB = 8
ALL_STAGES = SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=True)
FREQ_TOL = 0.015
LN2 = np.log(2.0)
# Relative probabilities 1, 1/2, 1/4, 1/8, 1/8 (probabilities 1/2, 1/4, 1/8, 1/16, 1/16): float32 holds every
# partial sum exactly, so a top-p or min-p boundary can sit exactly on a token.
POW2_LOGITS = np.array([0, -1, -2, -3, -3], np.float32) * np.float32(LN2)
PATHS = pytest.mark.parametrize("fast_k", [256, 1], ids=["fast", "bisect"])


def _row(x, dtype=np.float32):
  return jnp.asarray(np.asarray(x, dtype)[None])


def _prompt_mask(token_ids_list, vocab: int, batch: int | None = None) -> np.ndarray:
  """[batch, vocab] bool: which tokens each slot's prompt holds (None: an idle slot), as the engine's programs
  build the mask its penalties read (`programs.first_token`, `programs.restore_slot`); an id outside the
  vocabulary is an InputError."""
  batch = len(token_ids_list) if batch is None else batch
  if len(token_ids_list) > batch:
    raise ValueError(f"{len(token_ids_list)} prompts do not fit in {batch} slots.")
  mask = np.zeros((batch, vocab), bool)
  for i, ids in enumerate(token_ids_list):
    if ids is None or len(ids) == 0:
      continue
    ids = np.asarray(ids, np.int64)
    if ids.min() < 0 or ids.max() >= vocab:
      raise InputError(f"prompt {i} holds token id {int(ids.max() if ids.max() >= vocab else ids.min())}, "
                       f"outside the vocabulary of {vocab}.")
    mask[i, ids] = True
  return mask


@functools.cache
def _draw_fn(needs: SamplingNeeds, fast_k: int):
  def one(step, logits, arrays, prompt_mask, counts):
    tokens, logprobs = sampling.sample(logits, arrays, step[None], prompt_mask, counts, needs, fast_k=fast_k)
    return tokens[0], logprobs[0]

  return jax.jit(jax.vmap(one, in_axes=(0, None, None, None, None)))


def draw(logits, params: SamplingParams, *, fast_k=256, prompt=(), counts=None, sample_index=0, needs=None):
  """N_DRAWS tokens for one request at steps 0, 1, ..., and their log-probabilities.

  To share one compilation, every stage is compiled in (needs=None; test_needs_only_skip_work checks that the
  stages a request does not use change nothing), and the vocabulary is padded to DRAW_VOCAB with -inf logits.
  """
  v = len(logits)
  logits = np.concatenate([np.asarray(logits, np.float32), np.full(DRAW_VOCAB - v, -np.inf, np.float32)])
  counts = np.zeros(DRAW_VOCAB, np.int32) if counts is None else np.pad(counts, (0, DRAW_VOCAB - v))
  arrays = sampling.pack([params], sample_indices=[sample_index])
  prompt_mask = jnp.asarray(_prompt_mask([list(prompt)], DRAW_VOCAB))
  fn = _draw_fn(needs or ALL_STAGES, fast_k)
  tokens, logprobs = fn(jnp.arange(N_DRAWS), _row(logits), arrays, prompt_mask, _row(counts, np.int32))
  assert np.all(tokens < v), "drew a padding token"
  return np.asarray(tokens), np.asarray(logprobs)


def assert_distribution(tokens, expected):
  expected = np.asarray(expected, np.float64)
  freq = np.bincount(tokens, minlength=len(expected)) / len(tokens)
  assert freq.shape == expected.shape, f"drew token {len(freq) - 1}, outside the vocabulary"
  assert np.all(freq[expected == 0] == 0), f"drew excluded tokens: {freq}"
  np.testing.assert_allclose(freq, expected, atol=FREQ_TOL)


# --- SamplingParams ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be a finite number >= 0, got -1."),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan."),
    (dict(temperature="1"), "temperature must be a finite number >= 0, got '1'."),
    (dict(top_p=0), "top_p must be a number in (0, 1], got 0."),
    (dict(top_p=1.5), "top_p must be a number in (0, 1], got 1.5."),
    (dict(min_p=2), "min_p must be a number in [0, 1], got 2."),
    (dict(n=0), "n must be an integer >= 1, got 0."),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0."),
    (dict(max_tokens=1.5), "max_tokens must be an integer >= 1, got 1.5."),
    (dict(max_tokens="3"), "max_tokens must be an integer >= 1, got '3'."),
    (dict(max_tokens=True), "max_tokens must be an integer >= 1, got True."),
    (dict(top_k=-1), "top_k must be an integer >= 0 (0 disables it), got -1."),
    (dict(top_k=2.0), "top_k must be an integer >= 0 (0 disables it), got 2.0."),
    (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0, got 0."),
    (dict(presence_penalty=2.5), "presence_penalty must be a number in [-2, 2], got 2.5."),
    (dict(frequency_penalty=-3), "frequency_penalty must be a number in [-2, 2], got -3."),
    (dict(stop=["a", ""]), "stop must not contain an empty string, got ['a', '']."),
    (dict(stop=""), "stop must not contain an empty string, got ''."),
    (dict(stop=[1]), "stop must be a string or a list of strings, got [1]."),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of integers >= 0, got [-1]."),
    (dict(ignore_eos=1), "ignore_eos must be true or false, got 1."),
    (dict(logprobs="yes"), "logprobs must be true or false, got 'yes'."),
    (dict(seed=-1), "seed must be null or an integer in [0, 2**32), got -1."),
    (dict(seed=2**32), "seed must be null or an integer in [0, 2**32), got 4294967296."),
])
def test_invalid_params_are_rejected_with_one_sentence(kwargs, message):
  with pytest.raises(InputError) as err:
    SamplingParams(**kwargs)
  assert str(err.value) == message


def test_params_normalise_and_keep_generation_field_names():
  p = SamplingParams(max_tokens=5, temperature=1, top_k=3, top_p=0.5, seed=7, ignore_eos=True, stop="END",
                     stop_token_ids=[3, 4])
  assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.ignore_eos) == (5, 1.0, 3, 0.5, 7, True)
  assert isinstance(p.temperature, float)
  assert p.stop == ("END",) and p.stop_token_ids == (3, 4)
  assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
  assert SamplingParams().greedy and SamplingParams(temperature=1e-6).greedy
  assert hash(p) == hash(SamplingParams(**{f: getattr(p, f) for f in p.__dataclass_fields__}))


def test_from_dict_overrides_base_and_names_bad_keys():
  base = SamplingParams(max_tokens=32, temperature=0.5, seed=3)
  p = SamplingParams.from_dict({"top_p": 0.9, "stop": "\n", "logprobs": True, "temperature": None}, base=base)
  assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.logprobs, p.seed) == (32, 0.5, 0.9, ("\n",), True, 3)
  assert SamplingParams.from_dict({"seed": None}, base=base).seed is None  # null seed: the engine draws one
  assert SamplingParams.from_dict({}) == SamplingParams()
  with pytest.raises(InputError, match=r"^unknown sampling parameter 'best_of'; expected one of max_tokens, "):
    SamplingParams.from_dict({"best_of": 2})
  with pytest.raises(InputError, match=r"^max_tokens must be an integer >= 1, got '3'\.$"):
    SamplingParams.from_dict({"max_tokens": "3"})
  with pytest.raises(InputError, match=r"^n must be an integer >= 1, got 1\.5\.$"):
    SamplingParams.from_dict({"n": 1.5})
  with pytest.raises(InputError, match=r"^sampling parameters must be a JSON object, got list\.$"):
    SamplingParams.from_dict([("n", 1)])


# --- pack, needs, masks, counts ---------------------------------------------------------------------------------


def test_pack_neutralises_idle_and_greedy_slots():
  arrays = sampling.pack([SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=11),
                          SamplingParams(top_k=5, top_p=0.5, repetition_penalty=1.3), None],
                         sample_indices=[2, 0, 0])
  np.testing.assert_array_equal(arrays.temperature, np.float32([0.7, 0, 0]))
  np.testing.assert_array_equal(arrays.top_k, [5, 0, 0])  # a greedy slot's filters do nothing
  np.testing.assert_array_equal(arrays.top_p, np.float32([0.9, 1, 1]))
  np.testing.assert_array_equal(arrays.repetition_penalty, np.float32([1, 1.3, 1]))  # greedy is penalised
  np.testing.assert_array_equal(arrays.seed, [11, 0, 0])
  np.testing.assert_array_equal(arrays.sample_index, [2, 0, 0])
  assert arrays.seed.dtype == np.uint32 and arrays.top_k.dtype == np.int32 and arrays.min_p.dtype == np.float32
  assert arrays.needs == SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=True)


def test_needs_and_seeds():
  assert sampling.pack([SamplingParams(top_k=3), None]).needs == SamplingNeeds()
  assert sampling.pack([SamplingParams(presence_penalty=0.5)]).needs == SamplingNeeds(penalties=True)
  assert sampling.pack([SamplingParams(temperature=1, top_p=0.9, seed=1)]).needs == SamplingNeeds(
      sampling=True, top_p=True)
  assert hash(SamplingNeeds()) == hash(SamplingNeeds())
  with pytest.raises(ValueError, match="slot 0 samples"):
    sampling.pack([SamplingParams(temperature=1.0)])
  arrays = sampling.pack([SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, seed=5)],
                         seeds=[9, None])
  np.testing.assert_array_equal(arrays.seed, [9, 5])
  leaves = jax.tree_util.tree_leaves(arrays)
  assert len(leaves) == 9 and all(leaf.shape == (2,) for leaf in leaves)


def test_prompt_mask_and_update_counts():
  mask = _prompt_mask([[1, 3, 3], None], vocab=5, batch=3)
  np.testing.assert_array_equal(mask, [[0, 1, 0, 1, 0], [0] * 5, [0] * 5])
  with pytest.raises(InputError, match=r"^prompt 0 holds token id 7, outside the vocabulary of 5\.$"):
    _prompt_mask([[7]], vocab=5)
  counts = jnp.zeros((3, 5), jnp.int32)
  counts = sampling.update_counts(counts, jnp.array([2, 4, 1]), jnp.array([True, False, True]))
  counts = sampling.update_counts(counts, jnp.array([2, 0, 0]), jnp.array([True, True, False]))
  np.testing.assert_array_equal(counts, [[0, 0, 2, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])


# --- Penalties and greedy ---------------------------------------------------------------------------------------


def test_penalties_match_hand_computed_logits():
  logits = jnp.array([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]])
  prompt = jnp.array([[1, 1, 0, 0, 0, 1]], bool)  # tokens 0, 1, 5 are in the prompt
  counts = jnp.array([[0, 0, 3, 1, 0, 0]], jnp.int32)  # 2 generated three times, 3 once
  out = sampling.apply_penalties(logits, prompt, counts, jnp.array([2.0]), jnp.array([0.5]), jnp.array([0.25]))
  # repetition (prompt or generated: 0, 1, 2, 3, 5): positive / 2, negative * 2; then presence 0.5 and
  # frequency 0.25 * count on the generated tokens 2 and 3 only.
  want = [2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 - 0.25 * 3, 3.0 / 2 - 0.5 - 0.25 * 1, -2.0, 0.0]
  np.testing.assert_allclose(out, [want], rtol=1e-6)
  neutral = sampling.apply_penalties(logits, prompt, counts, jnp.ones(1), jnp.zeros(1), jnp.zeros(1))
  np.testing.assert_array_equal(neutral, logits)


def test_greedy_is_argmax_of_penalised_logits_lowest_id_on_ties():
  logits = np.array([[1.0, 3.0, 2.9, 3.0, -1.0], [0.0, 0.0, -5.0, 0.0, -5.0]], np.float32)
  params = [SamplingParams(repetition_penalty=1.5), SamplingParams()]
  arrays = sampling.pack(params)
  prompt = jnp.asarray(_prompt_mask([[1, 3], [4]], vocab=5))
  tokens, logprobs = sampling.sample(jnp.asarray(logits), arrays, jnp.zeros(2, jnp.int32), prompt,
                                     jnp.zeros((2, 5), jnp.int32), arrays.needs)
  # Row 0: 3.0 / 1.5 = 2.0 for tokens 1 and 3, so 2 (2.9) wins. Row 1: a three-way tie goes to token 0.
  np.testing.assert_array_equal(tokens, [2, 0])
  log_softmax = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(logprobs, [log_softmax[0, 2], log_softmax[1, 0]], rtol=1e-6)
  no_penalty, _ = sampling.sample(jnp.asarray(logits), sampling.pack([SamplingParams()] * 2), 0, None, None,
                                  SamplingNeeds())
  np.testing.assert_array_equal(no_penalty, [1, 0])


def _primitives(jaxpr) -> set[str]:
  """Names of every primitive in a (closed) jaxpr, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          names |= _primitives(sub)
  return names


def test_needs_decide_what_is_traced():
  logits, step = jnp.zeros((2, 300)), jnp.zeros(2, jnp.int32)
  arrays = sampling.pack([SamplingParams(), None])

  def primitives(needs, *masks):
    return _primitives(jax.make_jaxpr(functools.partial(sampling.sample, needs=needs))(logits, arrays, step, *masks))

  greedy = primitives(SamplingNeeds(), None, None)  # the masks are not even needed
  assert not greedy & {"top_k", "sort", "cond", "scan", "cumsum", "random_bits", "random_fold_in"}
  full = primitives(SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=True),
                    jnp.zeros((2, 300), bool), jnp.zeros((2, 300), jnp.int32))
  assert {"top_k", "cond", "scan", "random_bits"} <= full and "sort" not in full  # nothing sorts V


@pytest.mark.parametrize("params", [  # temperature alone: see test_a_request_draws_the_same_tokens...[plain]
    SamplingParams(temperature=0.8, top_k=3, seed=1),
    SamplingParams(temperature=0.8, top_p=0.8, seed=1),
    SamplingParams(temperature=0.8, min_p=0.2, frequency_penalty=0.5, seed=1),
], ids=["top_k", "top_p", "min_p+penalty"])
def test_needs_only_skip_work(params):
  logits = [1.0, 0.2, -0.5, 0.9, 0.0, -2.0]
  counts = [1, 0, 0, 2, 0, 0]
  needs = sampling.pack([params]).needs
  assert needs != ALL_STAGES
  lean, _ = draw(logits, params, counts=counts, needs=needs)
  full, _ = draw(logits, params, counts=counts)
  np.testing.assert_array_equal(lean, full)


# --- Filters against hand-computed distributions -----------------------------------------------------------------


def test_temperature_scales_logits():
  logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
  tokens, _ = draw(logits, SamplingParams(temperature=2.0, seed=0))
  expected = np.sqrt([0.4, 0.3, 0.2, 0.1])  # p ** (1 / 2), renormalised
  assert_distribution(tokens, expected / expected.sum())
  tokens, _ = draw(logits, SamplingParams(temperature=1.0, seed=0))
  assert_distribution(tokens, [0.4, 0.3, 0.2, 0.1])


@PATHS
def test_top_k(fast_k):
  logits = np.array([3.0, 1.0, 2.0, 0.0, 2.5, -1.0], np.float32)
  tokens, _ = draw(logits, SamplingParams(temperature=1.0, top_k=3, seed=1), fast_k=fast_k)
  e = np.exp([3.0, 2.0, 2.5]) / np.exp([3.0, 2.0, 2.5]).sum()
  assert_distribution(tokens, [e[0], 0, e[1], 0, e[2], 0])  # tokens 0, 4, 2 survive


@PATHS
def test_top_k_keeps_every_token_tied_with_the_kth(fast_k):
  logits = np.array([2.0, 1.0, 1.0, 0.0], np.float32)
  tokens, _ = draw(logits, SamplingParams(temperature=1.0, top_k=2, seed=2), fast_k=fast_k)
  e = math.e
  assert_distribution(tokens, np.array([e, 1, 1, 0]) / (e + 2))  # like transformers' TopKLogitsWarper


@PATHS
def test_top_k_1_is_greedy(fast_k):
  logits = np.array([0.3, 2.0, 1.9, -4.0, 2.0], np.float32)
  tokens, _ = draw(logits, SamplingParams(temperature=5.0, top_k=1, seed=3), fast_k=fast_k)
  assert set(tokens) == {1, 4}  # the two tied maxima; every other token is never drawn
  tokens, _ = draw(logits[:4], SamplingParams(temperature=5.0, top_k=1, seed=3), fast_k=fast_k)
  assert set(tokens) == {1}


def test_pow2_logits_give_exact_probabilities():
  e = np.asarray(jnp.exp(jnp.asarray(POW2_LOGITS) - POW2_LOGITS.max()))
  np.testing.assert_array_equal(e, [1, 0.5, 0.25, 0.125, 0.125])  # the boundary tests below rely on this


@PATHS
@pytest.mark.parametrize("top_p, expected", [
    (0.5, [1, 0, 0, 0, 0]),  # 1/2 reaches 0.5 exactly: only the first token
    (0.75, [2 / 3, 1 / 3, 0, 0, 0]),  # 1/2 + 1/4 reaches 0.75 exactly: the third is not needed
    (0.76, [4 / 7, 2 / 7, 1 / 7, 0, 0]),
    (0.875, [4 / 7, 2 / 7, 1 / 7, 0, 0]),  # exactly at 1/2 + 1/4 + 1/8
    (0.9, [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 16]),  # needs one 1/16; its tie comes too
    (0.1, [1, 0, 0, 0, 0]),  # always at least one token
])
def test_top_p_boundaries(fast_k, top_p, expected):
  tokens, _ = draw(POW2_LOGITS, SamplingParams(temperature=1.0, top_p=top_p, seed=4), fast_k=fast_k)
  assert_distribution(tokens, expected)


@pytest.mark.parametrize("min_p, expected", [
    (0.25, [4 / 7, 2 / 7, 1 / 7, 0, 0]),  # relative probability 1/4 is kept (>=)
    (0.3, [2 / 3, 1 / 3, 0, 0, 0]),
    (1.0, [1, 0, 0, 0, 0]),
    (0.1, [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 16]),
])
def test_min_p(min_p, expected):
  tokens, _ = draw(POW2_LOGITS, SamplingParams(temperature=1.0, min_p=min_p, seed=5))
  assert_distribution(tokens, expected)


def test_min_p_is_relative_to_the_tempered_distribution():
  # At temperature 1/2 the relative probabilities square: 1, 1/4, 1/16, 1/64, 1/64. min_p 0.2 keeps 2.
  tokens, _ = draw(POW2_LOGITS, SamplingParams(temperature=0.5, min_p=0.2, seed=6))
  assert_distribution(tokens, [4 / 5, 1 / 5, 0, 0, 0])


@PATHS
def test_filters_apply_in_order_top_k_then_top_p_then_min_p(fast_k):
  # top_k=3 keeps masses 1, 1/2, 1/4 (total 7/4); top_p=0.8 renormalised needs 0.8 * 7/4 = 1.4: two tokens.
  # Over all five tokens top_p=0.8 would need three (1.5 < 0.8 * 2 = 1.6).
  tokens, _ = draw(POW2_LOGITS, SamplingParams(temperature=1.0, top_k=3, top_p=0.8, seed=7), fast_k=fast_k)
  assert_distribution(tokens, [2 / 3, 1 / 3, 0, 0, 0])
  tokens, _ = draw(POW2_LOGITS, SamplingParams(temperature=1.0, top_p=0.8, seed=7), fast_k=fast_k)
  assert_distribution(tokens, [4 / 7, 2 / 7, 1 / 7, 0, 0])
  tokens, _ = draw(POW2_LOGITS, SamplingParams(temperature=1.0, top_k=4, top_p=0.99, min_p=0.4, seed=7),
                   fast_k=fast_k)
  assert_distribution(tokens, [2 / 3, 1 / 3, 0, 0, 0])


@PATHS
def test_penalties_then_temperature_when_sampling(fast_k):
  logits = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
  counts = np.array([2, 0, 0, 1], np.int32)
  params = SamplingParams(temperature=0.5, top_k=3, repetition_penalty=2.0, presence_penalty=0.5,
                          frequency_penalty=0.25, seed=8)
  tokens, _ = draw(logits, params, fast_k=fast_k, prompt=[1], counts=counts)
  # penalised: 2/2 - 0.5 - 0.5 = 0; 1/2 = 0.5; 0; -1*2 - 0.5 - 0.25 = -2.75 -> top-3 drops token 3, tie 0/2 stays
  z = np.array([0.0, 0.5, 0.0]) / 0.5
  p = np.exp(z) / np.exp(z).sum()
  assert_distribution(tokens, [p[0], p[1], p[2], 0])


def test_logprobs_are_log_softmax_of_raw_logits():
  logits = np.array([1.5, -0.5, 0.25, 2.0, 0.0], np.float32)
  params = SamplingParams(temperature=0.7, top_k=3, repetition_penalty=1.7, seed=9, logprobs=True)
  tokens, logprobs = draw(logits, params, prompt=[3])
  want = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))[tokens]
  np.testing.assert_allclose(logprobs, want, atol=1e-6)
  assert len(set(tokens)) > 1


# --- Randomness -------------------------------------------------------------------------------------------------


BATCH, VOCAB = 4, 300  # the batch tests below share _decode_step's compilations at this shape


@functools.partial(jax.jit, static_argnames=("needs", "fast_k"))
def _decode_step(logits, arrays, step, counts, needs, fast_k=256):
  prompt_mask = jnp.zeros(logits.shape, bool)
  tokens, _ = sampling.sample(logits, arrays, step, prompt_mask, counts, needs, fast_k=fast_k)
  return tokens, sampling.update_counts(counts, tokens, jnp.ones(tokens.shape, bool))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, presence_penalty=0.3, seed=1234),
    SamplingParams(temperature=1.1, seed=77),  # alone it compiles no filter; its batch mates do
], ids=["filters", "plain"])
def test_a_request_draws_the_same_tokens_in_any_slot_and_any_batch(params):
  rng = np.random.default_rng(0)
  mine = rng.standard_normal(VOCAB).astype(np.float32) * 2
  mates = [SamplingParams(temperature=1.3, top_p=0.5, min_p=0.1, seed=1), SamplingParams(repetition_penalty=1.2),
           SamplingParams(temperature=0.4, top_k=2, frequency_penalty=1, seed=99)]
  # A mate whose k exceeds the 256 fast candidates sends the whole batch through the bisection.
  bisecting_mate = SamplingParams(temperature=1.0, top_k=280, top_p=0.95, seed=5)

  def run(slot, batch, mates, steps=25):
    logits = rng.standard_normal((batch, VOCAB)).astype(np.float32) * 3  # the other rows: fresh noise every run
    logits[slot] = mine
    slots = [mates[i % len(mates)] if mates else None for i in range(batch)]
    slots[slot] = params
    arrays = sampling.pack(slots, sample_indices=[3 if i == slot else 0 for i in range(batch)])
    counts = jnp.zeros((batch, VOCAB), jnp.int32)
    out = []
    for step in range(steps):
      tokens, counts = _decode_step(jnp.asarray(logits), arrays, jnp.full(batch, step, jnp.int32), counts,
                                    needs=arrays.needs)
      out.append(int(tokens[slot]))
    return out

  reference = run(slot=0, batch=1, mates=[])
  assert len(set(reference)) > 3
  assert run(slot=3, batch=BATCH, mates=mates) == reference
  assert run(slot=1, batch=BATCH, mates=mates + [bisecting_mate]) == reference


def test_fast_path_and_bisection_agree_on_random_batches():
  rng = np.random.default_rng(2)
  full = SamplingNeeds(sampling=True, top_k=True, top_p=True, min_p=True, penalties=True)
  counts = jnp.zeros((BATCH, VOCAB), jnp.int32)
  for trial in range(8):
    logits = jnp.asarray(rng.standard_normal((BATCH, VOCAB)).astype(np.float32) * rng.uniform(0.5, 4, (BATCH, 1)))
    arrays = sampling.pack([SamplingParams(
        temperature=float(rng.uniform(0.3, 1.5)), top_k=int(rng.choice([0, 5, 40, 280])),
        top_p=float(rng.choice([1.0, 0.3, 0.9, 0.99])), min_p=float(rng.choice([0, 0.05])), seed=trial * 10 + i,
    ) for i in range(BATCH)])
    step = jnp.full(BATCH, trial, jnp.int32)
    fast, _ = _decode_step(logits, arrays, step, counts, needs=full)
    exact, _ = _decode_step(logits, arrays, step, counts, needs=full, fast_k=3)  # every row bisects
    np.testing.assert_array_equal(fast, exact)


def test_sample_index_and_seed_select_independent_streams():
  logits = np.zeros(8, np.float32)  # uniform: each stream is a sequence of independent uniform draws

  def stream(seed, index):
    return draw(logits, SamplingParams(temperature=1.0, seed=seed), sample_index=index)[0][:400]

  base = stream(1, 0)
  np.testing.assert_array_equal(stream(1, 0), base)
  for other in (stream(1, 1), stream(2, 0)):
    assert np.mean(other == base) < 0.2  # independent streams agree on 1/8 of the steps


# --- Internals against plain references ---------------------------------------------------------------------------


def test_blocked_helpers_match_references():
  rng = np.random.default_rng(1)
  x = np.round(rng.standard_normal((3, 1000)) * 3).astype(np.float32)  # many ties
  np.testing.assert_array_equal(sampling._argmax(jnp.asarray(x)), np.argmax(x, axis=-1))
  np.testing.assert_array_equal(sampling._top_values(jnp.asarray(x), 5), -np.sort(-x, axis=-1)[:, :5])
  k = jnp.array([1, 7, 1000])
  np.testing.assert_array_equal(sampling._kth_largest(jnp.asarray(x), k), -np.sort(-x, axis=-1)[[0, 1, 2], k - 1])
  keys = sampling._sort_key(jnp.array([-np.inf, -2.0, -0.0, 0.0, 1e-30, 3.0, np.inf]))
  assert np.all(np.diff(np.asarray(keys)) > 0)


def test_full_vocabulary_smoke():
  v = 151_936
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((2, v)).astype(np.float32) * 2
  logits[0, :10] += 14  # a short head: row 0 fits the fast path, row 1 (flat) needs the bisection
  arrays = sampling.pack([SamplingParams(temperature=0.8, top_p=0.9, seed=1)] * 2)
  tokens, logprobs = jax.jit(sampling.sample, static_argnames="needs")(
      jnp.asarray(logits), arrays, jnp.zeros(2, jnp.int32), None, None, needs=arrays.needs)
  assert 0 <= tokens[0] < 10 and 0 <= tokens[1] < v
  np.testing.assert_allclose(logprobs, np.asarray(jax.nn.log_softmax(logits))[[0, 1], tokens], rtol=1e-5)


# --- Rejection sampling of a sampled draft's proposals ------------------------------------------------------------


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.8, top_k=4, top_p=0.9)], ids=["plain", "filtered"])
def test_rejection_sampling_of_drawn_proposals_gives_the_target_distribution(params):
  """20,000 slots, each a seed: a proposal drawn by `draft_sample` from the draft's logits is weighed by
  `speculative_sample` against the target's. The tokens that come out follow p, the target's distribution after
  the filters, computed here by hand in float64 (chi-square and every frequency within FREQ_TOL); a proposal is
  kept with probability sum_x min(p(x), q(x)); greedy slots in the same batch keep a proposal iff it is the
  target's argmax."""
  scipy_stats = pytest.importorskip("scipy.stats")
  target = np.array([2.0, 1.5, 0.3, -0.5, 1.0, -2.0, 0.8, 0.0], np.float32)
  draft = np.array([1.0, 2.0, 0.0, 0.5, 1.0, -1.0, -0.4, 0.2], np.float32)

  def dist(z):  # the module's stages 2-4 by hand: temperature, top-k (ties kept), top-p, in float64
    z = z.astype(np.float64) / params.temperature
    if params.top_k:
      z = np.where(z >= np.sort(z)[-params.top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
      order = np.argsort(-p, kind="stable")
      keep = order[:int(np.searchsorted(np.cumsum(p[order]), params.top_p) + 1)]
      p = np.where(np.isin(np.arange(p.size), keep), p, 0.0)
      p /= p.sum()
    return p

  p, q = dist(target), dist(draft)
  b = N_DRAWS
  arrays = sampling.pack([params] * b, seeds=list(range(b)))
  needs = arrays.needs
  step = jnp.full((b,), 5, jnp.int32)
  proposal, probs = jax.jit(sampling.draft_sample, static_argnames="needs")(
      jnp.asarray(np.tile(draft, (b, 1))), arrays, step, needs)
  np.testing.assert_allclose(np.asarray(probs[0]), q, atol=1e-6)
  tokens, logprobs, kept = jax.jit(sampling.speculative_sample, static_argnames="needs")(
      jnp.asarray(np.tile(target, (b, 1))), arrays, step, None, None, needs, proposal, probs, jnp.ones(b, bool))
  tokens, kept = np.asarray(tokens), np.asarray(kept)
  np.testing.assert_allclose(np.bincount(np.asarray(proposal), minlength=8) / b, q, atol=FREQ_TOL)  # drawn from q
  counts = np.bincount(tokens, minlength=8)
  np.testing.assert_allclose(counts / b, p, atol=FREQ_TOL)
  live = p > 0
  assert counts[~live].sum() == 0  # a token the filters drop never comes out
  assert scipy_stats.chisquare(counts[live], p[live] * b).pvalue > 1e-3
  accept = np.minimum(p, q).sum()
  assert abs(kept.sum() - b * accept) <= 4 * np.sqrt(b * accept * (1 - accept)), (kept.sum(), b * accept)
  np.testing.assert_allclose(np.asarray(logprobs), (target - np.log(np.exp(target).sum()))[tokens], atol=1e-5)
  # Not proposed: the position's plain sample, the very token `sample` draws with these seeds.
  plain, _ = sampling.sample(jnp.asarray(np.tile(target, (b, 1))), arrays, step, None, None, needs)
  unproposed, _, kept_none = sampling.speculative_sample(jnp.asarray(np.tile(target, (b, 1))), arrays, step, None,
                                                         None, needs, proposal, probs, jnp.zeros(b, bool))
  np.testing.assert_array_equal(np.asarray(unproposed), np.asarray(plain))
  assert not np.asarray(kept_none).any()
  # Greedy slots: the draft proposes its argmax, kept iff it is the target's argmax; the target's argmax comes out.
  greedy = sampling.pack([SamplingParams()] * 2)
  logits = jnp.asarray(np.stack([target, draft]))
  prop, gprobs = sampling.draft_sample(logits, greedy, jnp.zeros(2, jnp.int32), needs)
  np.testing.assert_array_equal(np.asarray(prop), [0, 1])
  out, _, gkept = sampling.speculative_sample(jnp.asarray(np.stack([target, target])), greedy, jnp.zeros(2, jnp.int32),
                                              None, None, needs, prop, gprobs, jnp.ones(2, bool))
  np.testing.assert_array_equal(np.asarray(out), [0, 0])
  np.testing.assert_array_equal(np.asarray(gkept), [True, False])
