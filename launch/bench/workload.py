"""The job every engine runs: prompts of exactly the requested length, and the tiny random model of smoke tests.

  chat_prompts(tokenizer, count, length)     chat-formatted coding questions, the user message cut to fit
  random_prompts(vocab_size, count, length)  random token ids, for a random-weight --preset
"""

from __future__ import annotations

TINY = "tiny"  # --preset name of a few-layer random model for smoke tests (tests/launch/test_benchmark.py)

# The prompts' user messages: coding questions, combined and cut to the prompt length.
QUESTIONS = (
    "Write a Python function that checks whether a number is prime, and explain its complexity.",
    "How do I reverse a linked list in place in C? Show the code and walk through one example.",
    "What is the difference between a process and a thread? When would you use each in a web server?",
    "Implement binary search in Rust over a sorted slice and return the index or None.",
    "Explain Python's GIL and how it affects CPU-bound code that uses threads.",
    "Write a SQL query that returns the three highest-paid employees of every department.",
    "How does a hash map handle collisions? Compare chaining with open addressing.",
    "Write a JavaScript debounce function and show how to use it on a search box.",
    "Refactor this loop into a list comprehension: result = []; for x in xs: if x % 2: result.append(x * x)",
    "Explain the time complexity of quicksort in the best, average and worst cases, and how to avoid the worst.",
    "Write a bash one-liner that counts the lines of every .py file under a directory, sorted by count.",
    "How do I read a large CSV file in pandas in chunks and compute the mean of one column?",
)
SYSTEM_MESSAGE = "You are a helpful coding assistant."


def tiny_config():
  """The QwenConfig of --preset=tiny: two layers, 64 wide, a 512-token vocabulary."""
  from qwenjax import QwenConfig  # pylint: disable=g-import-not-at-top

  return QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, rope_theta=1e4, tie_word_embeddings=True,
                    max_position_embeddings=1024)


def chat_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
  """`count` different chat prompts of exactly `length` tokens: questions combined, the user message cut."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from qwenjax import InputError  # pylint: disable=g-import-not-at-top

  marker = "\x00QUESTION\x00"
  text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_MESSAGE},
                                        {"role": "user", "content": marker}])
  head, tail = (tokenizer.encode(s, add_special_tokens=False) for s in text.split(marker))
  room = length - len(head) - len(tail)
  if room < 1:
    raise InputError(f"--prompt_tokens={length} is too short for a chat prompt: the template alone takes "
                     f"{len(head) + len(tail)} tokens.")
  prompts = []
  for i in range(count):
    order = np.random.default_rng(i).permutation(len(QUESTIONS))
    body: list[int] = []
    while len(body) < room:
      body += tokenizer.encode(" ".join(QUESTIONS[j] for j in order), add_special_tokens=False)
    prompts.append(head + body[:room] + tail)
  return prompts


def random_prompts(vocab_size: int, count: int, length: int) -> list[list[int]]:
  """`count` prompts of `length` random token ids below `vocab_size` (seed 0, the same in every run)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  return [rng.integers(0, vocab_size, length).tolist() for _ in range(count)]
