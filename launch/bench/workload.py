"""The jobs every engine runs: prompts of exactly the requested length, a batch job of mixed requests, and the
tiny random model of smoke tests.

  chat_prompts(tokenizer, count, length)     chat-formatted coding questions, the user message cut to fit
  random_prompts(vocab_size, count, length)  random token ids, for a random-weight --preset
  job_requests(count)                        batch_generate input lines: chat requests of mixed prompt and output
                                             lengths, some with stop strings (the same lines in every run)
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

# The batch job's wording around the questions: a one-liner alone, or 1 to 12 questions (numbered when several)
# with an opener, a closer and, in some requests, one or two code snippets to work from. With the chat template
# (~25 tokens) Qwen's tokenizer makes the prompts 30 to ~400 tokens long.
SHORT_QUESTIONS = (
    "What is a closure?",
    "How do I reverse a string in Python?",
    "What does git rebase do?",
    "What is a race condition?",
    "Explain big-O notation briefly.",
    "What is the difference between == and is in Python?",
)
OPENERS = ("", "Hi!", "I'm preparing for a technical interview.", "I'm new to programming, so please keep it simple.",
           "Some questions from a code review at work.", "I have been stuck on this for a while.")
CLOSERS = ("", "Please be brief.", "Answer in a few sentences.", "Include a short code example.",
           "Explain it step by step.", "Thanks in advance!")
SNIPPETS = (
    "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n",
    "int find(const int *a, int n, int key) {\n  for (int i = 0; i < n; i++)\n    if (a[i] == key) return i;\n"
    "  return -1;\n}\n",
    "async function load(url) {\n  const r = await fetch(url);\n  if (!r.ok) throw new Error(r.status);\n"
    "  return r.json();\n}\n",
    "SELECT d.name, COUNT(*) FROM employees e JOIN departments d ON e.dept_id = d.id GROUP BY d.name;\n",
)
JOB_STOPS = (["\n\n"], ["```"], ["\n\n", "Example"])  # every fourth request stops at one of these
JOB_MAX_TOKENS = (16, 256)  # each request's max_tokens, drawn uniformly from this range (inclusive)


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


def job_requests(count: int) -> list[dict]:
  """`count` batch_generate input lines {"id", "messages", "sampling": {"max_tokens"[, "stop"]}}: chat requests of
  mixed lengths (see OPENERS), max_tokens drawn from JOB_MAX_TOKENS, every fourth with stop strings; end of sequence
  is not ignored. Request i depends on i alone (seeded by it): a longer job starts with the same requests."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  lines = []
  for i in range(count):
    rng = np.random.default_rng([11, i])
    k = int(rng.integers(1, len(QUESTIONS) + 1))
    pick = lambda options, rng=rng: options[int(rng.integers(len(options)))]
    if k == 1 and rng.random() < 0.5:  # a one-liner, nothing around it: the shortest prompts
      parts = [pick(SHORT_QUESTIONS)]
    else:
      questions = [QUESTIONS[j] for j in rng.permutation(len(QUESTIONS))[:k]]
      body = questions[0] if k == 1 else "\n".join(f"{n}. {q}" for n, q in enumerate(questions, 1))
      snippets = [f"```\n{SNIPPETS[j]}```" for j in rng.permutation(len(SNIPPETS))[:pick((0, 0, 0, 1, 1, 2))]]
      parts = [pick(OPENERS), *(["Here is the code I have so far:", *snippets] if snippets else []), body,
               pick(CLOSERS)]
    sampling = {"max_tokens": int(rng.integers(JOB_MAX_TOKENS[0], JOB_MAX_TOKENS[1] + 1))}
    if i % 4 == 3:
      sampling["stop"] = JOB_STOPS[(i // 4) % len(JOB_STOPS)]
    lines.append({"id": f"job-{i:04d}", "messages": [{"role": "system", "content": SYSTEM_MESSAGE},
                                                    {"role": "user", "content": "\n\n".join(p for p in parts if p)}],
                  "sampling": sampling})
  return lines
