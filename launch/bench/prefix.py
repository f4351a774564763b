"""Shared prefixes: a job whose requests share a long header, served with prefix caching on and off.

The requests: one system message of ~--prefix_tokens tokens (a code-review instruction and, as reference
material, the start of the perplexity corpus: CPython's Lib/textwrap.py), then a different coding question per
request (workload.QUESTIONS, cycled with a number), greedy, --prefix_new_tokens tokens each, end-of-sequence
ignored. Two paged engines over the same weights serve them, one after the other, each on a fresh page pool:
"shared" (prefix_caching=True, the default) and "unshared" (prefix_caching=False). Per engine: seconds (the
whole generate call, compiling included: both compile the same programs, plus copy_pages for "shared"),
computed_prompt_tokens (Engine.stats()["prompt_tokens"]: prompt tokens the prefill computed), cached_tokens (read
from shared pages). Ratios: unshared seconds over shared, computed tokens over the job's unique prompt tokens (the
header once plus every request's own tail), and whether every completion is identical.
"""

from __future__ import annotations

import time

from absl import logging

from launch.bench import perplexity, workload

INSTRUCTION = ("You review Python code. Answer the user's question about programming; when it helps, cite the "
               "reference module below.\n\nReference module:\n")


def requests(tokenizer, count: int, header_tokens: int) -> list[dict]:
  """`count` chat requests sharing a system message of about `header_tokens` tokens."""
  corpus = perplexity.CORPUS.read_text()
  ids = tokenizer.encode(corpus, add_special_tokens=False)
  room = max(header_tokens - len(tokenizer.encode(INSTRUCTION, add_special_tokens=False)), 1)
  header = INSTRUCTION + tokenizer.decode(ids[:room])
  questions = workload.QUESTIONS
  return [{"messages": [{"role": "system", "content": header},
                        {"role": "user", "content": f"Question {i}: {questions[i % len(questions)]}"}]}
          for i in range(count)]


def _unique_tokens(prompts: list[list[int]]) -> int:
  """Prompt tokens of the job counted once per distinct prefix: the nodes of the prompts' token trie."""
  root: dict = {}
  total = 0
  for p in prompts:
    node = root
    for t in p:
      if t not in node:
        node[t] = {}
        total += 1
      node = node[t]
  return total


def _common_prefix(prompts: list[list[int]]) -> int:
  first = prompts[0]
  n = min(len(p) for p in prompts)
  for p in prompts[1:]:
    n = next((i for i in range(n) if p[i] != first[i]), n)
  return n


def measure(model, tokenizer, *, count: int, header_tokens: int, new_tokens: int, max_batch_size: int) -> dict:
  """The report's "prefix" section."""
  import qwenjax  # pylint: disable=g-import-not-at-top

  job = requests(tokenizer, count, header_tokens)
  params = qwenjax.SamplingParams(max_tokens=new_tokens, ignore_eos=True)
  result, texts = {}, {}
  prompts = None
  for name, caching in (("shared", True), ("unshared", False)):
    engine = qwenjax.Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=4096, prefix_caching=caching)
    prompts = [engine.prepare(r) for r in job]
    logging.info("Shared prefixes: %d requests, %s.", count, name)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    texts[name] = [o.token_ids for o in outs]
    result[name] = {"seconds": seconds, "computed_prompt_tokens": engine.stats()["prompt_tokens"],
                    "cached_tokens": engine.stats()["cached_tokens"], "prefill_calls": engine.stats()["prefill_calls"]}
  unique = _unique_tokens(prompts)
  total = sum(len(p) for p in prompts)
  return {"requests": count, "shared_prefix_tokens": _common_prefix(prompts), "prompt_tokens": total,
          "unique_prompt_tokens": unique, "new_tokens": new_tokens, "max_batch_size": max_batch_size, **result,
          "identical_completions": texts["shared"] == texts["unshared"],
          "ratios": {"unshared_seconds_over_shared": result["unshared"]["seconds"] / result["shared"]["seconds"],
                     "shared_computed_over_unique": result["shared"]["computed_prompt_tokens"] / unique,
                     "unshared_computed_over_unique": result["unshared"]["computed_prompt_tokens"] / unique}}
