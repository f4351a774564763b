"""Speculative decoding (n-gram prompt lookup) in the paged engine: greedy outputs equal transformers' for k = 1..8;
sampled outputs follow the exact distribution computed from transformers' logits (chi-square) and equal plain
decoding's, seed for seed; stops, logprobs, prefix caching, preemption, grammars, n > 1 and opt-outs hold; refused
positions leave no page behind; warm-up leaves nothing to compile."""

import numpy as np
import pytest
import scipy.stats
import torch

from qwenjax import ConfigError, Engine, Request, SamplingParams
from qwenjax.checkpoints.hf import load_model
from qwenjax.engine.pages import pages_needed
from qwenjax.engine.profiling import count_compilations
from qwenjax.engine.speculative import SpeculativeConfig, ngram_lookup

from conftest import build_tiny_qwen2

PAGE = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Head dim 16 (the Pallas kernel's minimum), 3 query heads per KV head."""
  d = tmp_path_factory.mktemp("spec")
  hf = build_tiny_qwen2(d, vocab_size=320, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
  return hf, load_model(d)


def _engine(model, spec=None, **kw):
  kw = {**dict(max_batch_size=3, max_seq_len=256, max_prefill_chunk=32, page_size=PAGE), **kw}
  return Engine(model, None, eos_token_ids=(), speculative=spec, **kw)


def _hf_greedy(hf, prompt, n):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


def _prompts(seed=0):
  """Prompts with repeats (what prompt lookup finds) and without, of mixed lengths."""
  rng = np.random.default_rng(seed)
  motif = rng.integers(0, 300, 9).tolist()
  return [motif * 5, rng.integers(0, 300, 37).tolist() + motif * 2, [7, 7, 7, 7], rng.integers(0, 300, 60).tolist(),
          (motif[:4] + [11]) * 8]


# ---- the proposer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("history,k,n_min,n_max,expected", [
    ([1, 2, 3, 9, 1, 2, 3], 2, 1, 3, [9, 1]),  # the 3-gram [1, 2, 3] occurred before: what followed it
    ([1, 2, 3, 9, 1, 2, 3], 8, 1, 3, [9, 1, 2, 3]),  # stops at the end of the history
    ([5, 1, 2, 6, 4, 2, 7, 1, 2], 3, 1, 2, [6, 4, 2]),  # [1, 2] beats the later 1-gram [2]
    ([5, 1, 2, 6, 4, 2, 7, 3, 2], 3, 1, 2, [7, 3, 2]),  # no 2-gram: the latest 1-gram [2] (at index 5)
    ([5, 1, 2, 6, 4, 2, 7, 3, 2], 3, 2, 2, []),  # n_min 2: nothing
    ([4, 4, 4], 3, 1, 3, [4]),  # [4, 4] at 0: followed by the last token only
    ([8], 3, 1, 3, []),
])
def test_ngram_lookup_proposes_what_followed_the_latest_match(history, k, n_min, n_max, expected):
  assert ngram_lookup(np.asarray(history), k, n_min, n_max) == expected


@pytest.mark.parametrize("spec,message", [
    (dict(method="eagle"), "speculative method 'eagle' is not one of ngram"),
    (dict(num_speculative_tokens=0), "num_speculative_tokens must be an integer in [1, 16], got 0"),
    (dict(prompt_lookup_min=3, prompt_lookup_max=2), "1 <= min <= max, got 3 and 2"),
    (dict(disable_batch_size=-1), "disable_batch_size must be an integer >= 0"),
    (dict(tokens=3), "unknown speculative setting 'tokens'"),
])
def test_bad_settings_are_one_line_config_errors(tiny, spec, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    _engine(tiny[1], spec)


def test_each_step_weighs_expected_tokens_against_measured_step_times():
  """Hand-derived: a plain step of 0.1 s gives 10 tokens/s per sequence. A sequence whose proposals were all kept
  (rate 1) expects 5 tokens from 4 proposals: 5 / 0.34 s = 14.7 tokens/s at width 5 beats it and widths 4 (4 /
  0.28 = 14.3) and 2 (2 / 0.15 = 13.3). One kept and three refused (rate 2/5) expects 1.65 at width 5 (4.9
  tokens/s), 1.62 at width 4 (5.8) and 1.4 at width 2 (9.3): a plain step."""
  from qwenjax.engine.speculative import Acceptance, Proposer  # pylint: disable=g-import-not-at-top

  proposer = Proposer(SpeculativeConfig(num_speculative_tokens=4))
  seq = lambda acceptance: type("Seq", (), {"speculation": acceptance})()
  good, poor = seq(Acceptance(accepted=8)), seq(Acceptance(accepted=1, refusals=3))
  assert proposer.choose_width([good], [[1, 2, 3, 4]]) == 5  # nothing timed: the proposals whole
  for width, seconds in ((1, 0.1), (2, 0.15), (4, 0.28), (5, 0.34)):
    for _ in range(3):  # the first of each is dropped
      proposer.note_seconds(width, seconds)
  assert good.speculation.expected_tokens(4) == 5 and abs(poor.speculation.expected_tokens(4) - 1.6496) < 1e-9
  assert proposer.choose_width([good], [[1, 2, 3, 4]]) == 5
  assert proposer.choose_width([poor], [[1, 2, 3, 4]]) == 0
  # Both: plain 2 / 0.1 = 20 tokens/s; width 5 (5 + 1.56) / 0.34 = 19.3, 4 (4 + 1.56) / 0.28 = 19.9, 2 (2 + 1.4) /
  # 0.15 = 22.7: the proposals cut to one token each.
  assert proposer.choose_width([good, poor], [[1, 2, 3, 4], [5, 6]]) == 2
  off = Proposer(SpeculativeConfig(num_speculative_tokens=4, adaptive=False))
  off.note_seconds(1, 0.1)
  assert off.choose_width([poor], [[1, 2]]) == 4


def test_verify_widths_are_few():
  assert SpeculativeConfig(num_speculative_tokens=1).widths == (2,)
  assert SpeculativeConfig(num_speculative_tokens=4).widths == (2, 4, 5)
  assert SpeculativeConfig(num_speculative_tokens=8).widths == (2, 4, 8, 9)
  assert SpeculativeConfig(num_speculative_tokens=8).width(3) == 4


# ---- greedy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,impl", [(1, "xla"), (2, "xla"), (4, "xla"), (8, "xla"), (4, "pallas")])
def test_greedy_equals_transformers(tiny, k, impl):
  """Three slots refilling over five prompts with mixed budgets; every step that proposes checks the pages."""
  hf, model = tiny
  prompts, budgets = _prompts(), [24, 17, 30, 9, 25]
  engine = _engine(model, dict(num_speculative_tokens=k, prompt_lookup_min=1), attention_impl=impl)
  outs = engine.generate([Request(prompt=p, sampling=SamplingParams(max_tokens=m)) for p, m in zip(prompts, budgets)])
  for p, m, out in zip(prompts, budgets, outs):
    assert out.token_ids == _hf_greedy(hf, p, m)
  stats = engine.stats()
  assert stats["spec_accepted_tokens"] > 0 and stats["verify_calls"] > 0, stats
  assert stats["spec_accepted_tokens"] <= stats["spec_proposed_tokens"]
  assert engine.pool.num_free == engine.pool.num_pages


def test_refused_positions_leave_no_page_behind(tiny):
  """After every step each running sequence holds exactly the pages of its context; positions past it are never
  attended, and the whole pool comes back at the end."""
  _, model = tiny
  engine = _engine(model, dict(num_speculative_tokens=8, prompt_lookup_min=1), max_batch_size=2)
  for p in _prompts()[:4]:
    engine.add_request(Request(prompt=p, sampling=SamplingParams(max_tokens=40)))
  steps = refused = 0
  while engine.has_unfinished():
    before = engine.stats()
    engine.step()
    after = engine.stats()
    refused += (after["spec_proposed_tokens"] - before["spec_proposed_tokens"]
                - after["spec_accepted_tokens"] + before["spec_accepted_tokens"])
    for seq in engine.scheduler.running:
      if seq.pages.length >= len(seq.prompt):  # prefilled
        assert seq.pages.length == len(seq.context)
        assert len(seq.pages.pages) == pages_needed(len(seq.context), PAGE)
    steps += 1
  assert refused > 0  # some proposals were refused, so pages were given back
  assert engine.pool.num_free == engine.pool.num_pages


def test_stop_ids_and_max_tokens_inside_an_accepted_run(tiny):
  """A stop token id that the proposals contain, and a budget that ends inside an accepted run: the output is
  plain decoding's, cut where it cuts."""
  hf, model = tiny
  prompts = _prompts()[:3]
  ref = [_hf_greedy(hf, p, 30) for p in prompts]
  stop = ref[0][len(ref[0]) // 2]  # a token of the first output's repeating tail
  params = SamplingParams(max_tokens=30, stop_token_ids=[stop])
  spec = _engine(model, dict(num_speculative_tokens=6, prompt_lookup_min=1)).generate(prompts, params)
  for r, out in zip(ref, spec):
    cut = r.index(stop) + 1 if stop in r else len(r)
    assert out.token_ids == r[:cut]
    assert out.finish_reason == ("stop" if stop in r else "length")
  for m in (1, 2, 5, 13):
    outs = _engine(model, dict(num_speculative_tokens=6, prompt_lookup_min=1)).generate(
        prompts, SamplingParams(max_tokens=m))
    assert [o.token_ids for o in outs] == [r[:m] for r in ref]


def test_preemption_under_a_small_pool_and_prefix_caching(tiny):
  """Six sequences sharing a long prefix (prefix pages and a partial-page copy) whose caches need more than the
  pool: speculation preempts and resumes, and every output equals transformers'."""
  hf, model = tiny
  rng = np.random.default_rng(5)
  shared = (rng.integers(0, 300, 7).tolist() * 6)[:38]
  prompts = [shared + rng.integers(0, 300, int(n)).tolist() for n in (0, 3, 9, 20, 1, 14)]
  engine = _engine(model, dict(num_speculative_tokens=5, prompt_lookup_min=1, disable_batch_size=0),
                   max_batch_size=6, kv_cache_memory=12 * PAGE * _page_bytes(model) / 2**30)
  outs = engine.generate(prompts, SamplingParams(max_tokens=36))
  stats = engine.stats()
  assert stats["preemptions"] > 0 and stats["cached_tokens"] > 0 and stats["spec_accepted_tokens"] > 0, stats
  for p, out in zip(prompts, outs):
    assert out.token_ids == _hf_greedy(hf, p, 36)
  assert engine.pool.num_free == engine.pool.num_pages


def _page_bytes(model):
  from qwenjax.model.kv_cache import page_bytes  # pylint: disable=g-import-not-at-top
  return page_bytes(model.cfg, 1, model.dtype, False)


# ---- sampling ----------------------------------------------------------------------------------------------


SAMPLED = [
    SamplingParams(max_tokens=20, temperature=0.8, seed=3, logprobs=True),
    SamplingParams(max_tokens=20, temperature=1.1, top_k=7, top_p=0.9, min_p=0.05, seed=4, n=2),
    SamplingParams(max_tokens=20, temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.2, seed=5, top_logprobs=3),
    SamplingParams(max_tokens=20, logprobs=True, top_logprobs=2),
]


def test_sampled_outputs_equal_plain_decoding_seed_for_seed(tiny):
  """A proposal is kept when it equals the token sampled at its position with that position's own random numbers,
  so every request (filters, penalties, n = 2, logprobs, a greedy one beside them) gets plain decoding's tokens."""
  _, model = tiny
  prompts = _prompts(2)
  requests = [Request(prompt=p, sampling=SAMPLED[i % len(SAMPLED)]) for i, p in enumerate(prompts)]
  plain = _engine(model).generate(requests)
  spec_engine = _engine(model, dict(num_speculative_tokens=4, prompt_lookup_min=1, adaptive=False))
  spec = spec_engine.generate(requests)
  for a, b in zip(plain, spec):
    for ca, cb in zip(a.outputs, b.outputs):
      assert ca.token_ids == cb.token_ids
      if ca.logprobs is not None:
        np.testing.assert_allclose(cb.logprobs, ca.logprobs, atol=1e-4)
      if ca.top_logprobs is not None:
        assert [[t for t, _ in row] for row in cb.top_logprobs] == [[t for t, _ in row] for row in ca.top_logprobs]
  stats = spec_engine.stats()
  assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"], stats


def _filtered(logits, temperature, top_k, top_p):
  """The distribution plain sampling draws from (temperature, top-k with ties kept, then top-p: the smallest set of
  most likely tokens whose mass reaches top_p), by hand in float64, over the last axis of logits [..., V]."""
  z = logits.astype(np.float64) / temperature
  if top_k:
    z = np.where(z >= np.take(np.sort(z, axis=-1), [-top_k], axis=-1), z, -np.inf)
  p = np.exp(z - z.max(axis=-1, keepdims=True))
  p /= p.sum(axis=-1, keepdims=True)
  if top_p < 1:
    order = np.argsort(-p, axis=-1, kind="stable")
    mass = np.cumsum(np.take_along_axis(p, order, -1), axis=-1)
    before = np.concatenate([np.zeros_like(mass[..., :1]), mass[..., :-1]], axis=-1)  # the mass of those above
    keep = np.zeros(p.shape, bool)
    np.put_along_axis(keep, order, before < top_p, -1)
    p = np.where(keep, p, 0.0)
    p /= p.sum(axis=-1, keepdims=True)
  return p


def _exact_second_token(hf, prompt, temperature, top_k, top_p):
  """The exact distribution of the first and second generated tokens under temperature, top-k and top-p, from
  transformers' float32 logits: p1 [V], p2 [V] = sum over t1 of p1(t1) p(t2 | prompt, t1), and the probability
  that the second token equals prompt lookup's proposal after the first: sum over t1 of p1(t1) p(d(t1) | prompt,
  t1)."""

  dist = lambda logits: _filtered(logits, temperature, top_k, top_p)
  v = hf.config.vocab_size
  with torch.no_grad():
    first = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    rows = torch.tensor([prompt + [t] for t in range(v)])
    second = hf(rows).logits[:, -1].numpy()  # [V, V]
  p1 = dist(first)
  p2 = sum(p1[t] * dist(second[t]) for t in range(v) if p1[t] > 0)
  proposal = [ngram_lookup(np.asarray(prompt + [t]), 1, 1, 4)[0] for t in range(v)]
  accept = sum(p1[t] * dist(second[t])[proposal[t]] for t in range(v) if p1[t] > 0)
  return p1, p2, accept


def _chi_square(counts, expected_p):
  """Chi-square p-value of counts against probabilities, bins with an expected count under 5 pooled."""
  n = counts.sum()
  expected = expected_p * n
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] < 5:  # too little pooled mass for a bin of its own: fold it into the largest
    obs, exp = obs[:-1], exp[:-1]
    obs[np.argmax(exp)] += counts[~big].sum()
    exp[np.argmax(exp)] += expected[~big].sum()
  return scipy.stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.3, 0, 1.0), (1.0, 5, 0.85)])
def test_sampled_tokens_follow_the_exact_distribution(tmp_path, temperature, top_k, top_p):
  """A 16-token vocabulary and a prompt that holds every token, so the second token is always verified against a
  proposal (prompt lookup of the first; groups of 8 requests prefill in one step and then only decode): over 2,400
  seeds, the first and second tokens pass a chi-square test against the distribution computed by hand from
  transformers' logits, with and without speculation, and proposals are kept as often as that distribution
  gives them."""
  v = 16
  hf = build_tiny_qwen2(tmp_path, vocab_size=v, seed=1)
  model = load_model(tmp_path)
  prompt = list(range(v)) + [3, 9]
  p1, p2, accept = _exact_second_token(hf, prompt, temperature, top_k, top_p)
  requests = [Request(prompt=prompt, sampling=SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k,
                                                             top_p=top_p, seed=s)) for s in range(2400)]
  kw = dict(max_batch_size=8, max_seq_len=256, max_prefill_chunk=256, prefix_caching=False)
  spec_engine = _engine(model, dict(num_speculative_tokens=2, prompt_lookup_min=1, adaptive=False), **kw)
  for engine in (_engine(model, **kw), spec_engine):
    outs = [out for i in range(0, len(requests), 8) for out in engine.generate(requests[i:i + 8])]
    first = np.bincount([o.token_ids[0] for o in outs], minlength=v)
    second = np.bincount([o.token_ids[1] for o in outs], minlength=v)
    assert _chi_square(first, p1) > 1e-3
    assert _chi_square(second, p2) > 1e-3
  stats = spec_engine.stats()
  # Every second token was verified against one proposal, kept as often as the exact distribution says.
  assert stats["spec_verify_rows"] == stats["spec_proposed_tokens"] == 2400, stats
  n, accepted = 2400, stats["spec_accepted_tokens"]
  assert abs(accepted - n * accept) <= 4 * np.sqrt(n * accept * (1 - accept)) + 1, (accepted, n * accept)


# ---- what else holds -----------------------------------------------------------------------------------------


def test_an_opted_out_request_proposes_nothing(tiny):
  """A request that opts out decodes one token per step beside a speculating one; both give plain decoding's
  outputs."""
  _, model = tiny
  prompts = _prompts()[:3]
  opt_out = SamplingParams(max_tokens=20, speculative=False)
  requests = [Request(prompt=prompts[0], sampling=opt_out),
              Request(prompt=prompts[1], sampling=SamplingParams(max_tokens=20))]
  plain = _engine(model).generate(requests)
  engine = _engine(model, dict(num_speculative_tokens=3, prompt_lookup_min=1))
  spec = engine.generate(requests)
  assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
  alone = _engine(model, dict(num_speculative_tokens=3, prompt_lookup_min=1))
  alone.generate([requests[0]])
  assert alone.stats()["spec_proposed_tokens"] == 0


def test_warm_up_leaves_nothing_to_compile(tiny):
  """warm_up compiles each verify width per sampling variant (and the one-step block), then a varied speculative
  workload (greedy, sampled, penalised; lengths 1..200; proposals of every length) compiles nothing."""
  _, model = tiny
  engine = _engine(model, dict(num_speculative_tokens=4, prompt_lookup_min=1), max_batch_size=4,
                   max_prefill_chunk=64)
  shapes = engine.program_shapes()
  assert shapes["verify"] == [2, 4, 5] and shapes["decode"] == [1, 4]
  engine.warm_up()
  rng = np.random.default_rng(1)
  motif = rng.integers(0, 300, 6).tolist()
  workload = [Request(prompt=(motif * 40)[:int(n)] if i % 2 else rng.integers(0, 300, int(n)).tolist(),
                      sampling=SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=[0.0, 0.9, 0.7][i % 3],
                                              seed=i, repetition_penalty=[1, 1, 1.3][i % 3]))
              for i, n in enumerate(rng.integers(1, 200, size=24))]
  with count_compilations() as compiled:
    outs = engine.generate(workload)
  assert sum(compiled.values()) == 0, compiled
  assert engine.stats()["spec_accepted_tokens"] > 0
  assert all(len(o.token_ids) == r.sampling.max_tokens for o, r in zip(outs, workload))


# ---- a draft model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafts(tiny, tmp_path_factory):
  """Two drafts for the tiny target, both with its vocabulary: "near", the target's weights with 5% noise (it
  proposes what the target would, mostly: acceptances and refusals), and "other", a smaller random model of its
  own (one layer, 4 heads: mostly refused)."""
  hf, _ = tiny
  d = tmp_path_factory.mktemp("drafts")
  gen = torch.Generator().manual_seed(0)
  near = type(hf)(hf.config).eval()
  near.load_state_dict(hf.state_dict())
  with torch.no_grad():
    for p in near.parameters():
      p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
  near.save_pretrained(d / "near")
  build_tiny_qwen2(d / "other", seed=7, vocab_size=320, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   num_hidden_layers=1)
  return {"near": load_model(d / "near"), "other": load_model(d / "other")}


@pytest.mark.parametrize("k,which,impl", [(1, "near", "xla"), (3, "near", "xla"), (8, "near", "xla"),
                                          (4, "other", "xla"), (4, "near", "pallas")])
def test_draft_model_greedy_equals_transformers(tiny, drafts, k, which, impl):
  """The draft's greedy proposals, verified by the target: every output is the target's greedy one; a near draft
  gets most of its proposals kept, another model few."""
  hf, model = tiny
  prompts, budgets = _prompts(), [24, 17, 30, 9, 25]
  engine = _engine(model, dict(method="draft", draft_model=drafts[which], num_speculative_tokens=k),
                   attention_impl=impl)
  outs = engine.generate([Request(prompt=p, sampling=SamplingParams(max_tokens=m)) for p, m in zip(prompts, budgets)])
  for p, m, out in zip(prompts, budgets, outs):
    assert out.token_ids == _hf_greedy(hf, p, m)
  stats = engine.stats()
  assert stats["verify_calls"] > 0 and stats["spec_proposed_tokens"] > 0, stats
  if which == "near":
    assert stats["spec_accepted_tokens"] > stats["spec_proposed_tokens"] / 4, stats
  assert engine.pool.num_free == engine.pool.num_pages


def test_draft_model_sampling_prefix_caching_and_preemption(tiny, drafts):
  """Seeded sampling with filters and penalties gives plain decoding's tokens; six sequences sharing a prefix
  (the draft's pages copied with the target's) in a pool that preempts give transformers' greedy tokens."""
  hf, model = tiny
  spec = dict(method="draft", draft_model=drafts["near"], num_speculative_tokens=4, disable_batch_size=0)
  requests = [Request(prompt=p, sampling=SAMPLED[i % len(SAMPLED)]) for i, p in enumerate(_prompts(2))]
  plain = _engine(model).generate(requests)
  engine = _engine(model, spec)
  assert [o.token_ids for o in engine.generate(requests)] == [o.token_ids for o in plain]
  assert engine.stats()["spec_accepted_tokens"] > 0
  rng = np.random.default_rng(5)
  shared = rng.integers(0, 300, 38).tolist()
  prompts = [shared + rng.integers(0, 300, int(n)).tolist() for n in (0, 3, 9, 20, 1, 14)]
  engine = _engine(model, spec, max_batch_size=6, kv_cache_memory=12 * PAGE * _page_bytes(model) / 2**30)
  outs = engine.generate(prompts, SamplingParams(max_tokens=36))
  stats = engine.stats()
  assert stats["preemptions"] > 0 and stats["cached_tokens"] > 0 and stats["spec_accepted_tokens"] > 0, stats
  for p, out in zip(prompts, outs):
    assert out.token_ids == _hf_greedy(hf, p, 36)


def test_a_sampled_draft_follows_the_exact_distribution(tmp_path):
  """A sampled draft (another random model of the target's 16-token vocabulary) proposes two tokens per request,
  each drawn from its own filtered distribution q; the target keeps a proposal with probability min(1, p/q) and
  else draws from max(p - q, 0). Over 2,400 seeds the first four tokens pass a chi-square test against the
  distributions computed by hand from transformers' logits of the target alone, and proposals are kept as often
  as p and q (the draft's, from transformers too) say."""
  v, temperature, top_k, top_p = 16, 1.2, 8, 0.95
  hf = build_tiny_qwen2(tmp_path / "target", vocab_size=v, seed=1)
  draft_hf = build_tiny_qwen2(tmp_path / "draft", vocab_size=v, seed=4, hidden_size=32, num_attention_heads=4,
                              num_key_value_heads=2, num_hidden_layers=1)
  prompt = list(range(v)) + [3, 9]
  dist = lambda logits: _filtered(logits, temperature, top_k, top_p)
  with torch.no_grad():
    p1 = dist(hf(torch.tensor([prompt])).logits[0, -1].numpy())  # [V]
    one = torch.tensor([prompt + [a] for a in range(v)])
    p2, q2 = dist(hf(one).logits[:, -1].numpy()), dist(draft_hf(one).logits[:, -1].numpy())  # [V, V]: (t2 | t1)
    two = torch.tensor([prompt + [a, b] for a in range(v) for b in range(v)])
    p3 = dist(hf(two).logits[:, -1].numpy()).reshape(v, v, v)  # p(t3 | t1, t2)
    q3 = dist(draft_hf(two).logits[:, -1].numpy()).reshape(v, v, v)
    three = torch.tensor([prompt + [a, b, c] for a in range(v) for b in range(v) for c in range(v)])
    p4 = dist(hf(three).logits[:, -1].numpy()).reshape(v, v, v, v)
  marginals = (p1, p1 @ p2, np.einsum("a,ab,abc->c", p1, p2, p3), np.einsum("a,ab,abc,abcd->d", p1, p2, p3, p4))
  # The proposals kept, in expectation, as the engine schedules them: after the first token, one step verifies two
  # proposals (four tokens leave room for them and the token after); where the first is refused, the token drawn
  # in its place is followed by a step with one proposal.
  kept2 = np.minimum(p2, q2)  # [V, V]: t2 = x proposed and kept, given t1
  kept3 = np.minimum(p3, q3).sum(axis=-1)  # [V, V]: P(the proposal after t1, t2 is kept)
  residual = np.maximum(p2 - q2, 0)
  residual /= np.maximum(residual.sum(axis=-1, keepdims=True), 1e-30)
  accept = float(p1 @ ((kept2 * (1 + kept3)).sum(-1) + (1 - kept2.sum(-1)) * (residual * kept3).sum(-1)))
  n = 2400
  requests = [Request(prompt=prompt, sampling=SamplingParams(max_tokens=4, temperature=temperature, top_k=top_k,
                                                             top_p=top_p, seed=s)) for s in range(n)]
  engine = _engine(load_model(tmp_path / "target"),
                   dict(method="draft", draft_model=load_model(tmp_path / "draft"), num_speculative_tokens=2,
                        adaptive=False, draft_sampling="sampled"),
                   max_batch_size=8, max_seq_len=256, max_prefill_chunk=256, prefix_caching=False)
  outs = [out for i in range(0, n, 8) for out in engine.generate(requests[i:i + 8])]
  for position, expected in enumerate(marginals):
    counts = np.bincount([o.token_ids[position] for o in outs], minlength=v)
    assert counts[expected == 0].sum() == 0, (position, counts)  # what the filters drop never comes out
    assert _chi_square(counts, expected) > 1e-3, (position, counts, expected * n)
  kept = engine.stats()["spec_accepted_tokens"]
  # Each request's proposals, kept or not, add a Bernoulli; their count is at most 3: a loose 4-sigma bound.
  assert abs(kept - accept * n) <= 4 * np.sqrt(n * 0.75) + 1, (kept, accept * n)


def test_a_draft_with_another_vocabulary_is_refused(tiny, tmp_path):
  build_tiny_qwen2(tmp_path, vocab_size=256)
  with pytest.raises(ConfigError, match=r"draft model .*: its vocabulary \(256 tokens, logits over 256\) is not the "
                                        r"target's \(320 tokens, logits over 320\)"):
    _engine(tiny[1], dict(method="draft", draft_model=load_model(tmp_path)))
  with pytest.raises(ConfigError, match="pass draft_model with method 'draft' and only then"):
    _engine(tiny[1], dict(method="draft"))


@pytest.mark.parametrize("draft_sampling", ["greedy", "sampled"])
def test_a_draft_engine_compiles_nothing_after_warm_up(tiny, drafts, draft_sampling):
  """Every program of a draft engine (steps, decode blocks and verify widths, each with the draft, proposing
  greedily or by sampling) is compiled by warm_up; a varied workload then compiles nothing."""
  _, model = tiny
  engine = _engine(model, dict(method="draft", draft_model=drafts["near"], num_speculative_tokens=3,
                               draft_sampling=draft_sampling), max_batch_size=3, max_prefill_chunk=32)
  engine.warm_up(sampling=[SamplingParams(), SamplingParams(temperature=0.8, seed=0)])
  rng = np.random.default_rng(2)
  workload = [Request(prompt=rng.integers(0, 300, int(n)).tolist(),
                      sampling=SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=[0.0, 0.8][i % 2],
                                              seed=i))
              for i, n in enumerate(rng.integers(1, 90, size=10))]
  with count_compilations() as compiled:
    engine.generate(workload)
  assert sum(compiled.values()) == 0, compiled
  assert engine.stats()["verify_calls"] > 0
