"""Fine-tuning data: chat conversations -> token ids with a loss mask on the assistant turns -> packed rows.

    examples = [encode_chat(tokenizer, line["messages"]) for line in lines]   # (ids, mask) each
    rows = pack(examples, row_len=512)                                           # PackedRows, fixed shape

Conversations come in the format batch jobs read (`{"messages": [...]}` lines, assistant turns included), or as a
batch job's requests joined with its results by id (`conversations_from_job`): each request's messages plus the
generated reply as the assistant turn. The loss falls on the assistant turns only, each through its `<|im_end|>`
(what the model must learn to write and where to stop), never on the system, user or tool text or the template's
headers. Packing puts several conversations in one row of `row_len` tokens, each its own segment (attention stays
within it, positions restart), so every step has one shape and compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from qwenjax._errors import InputError
from qwenjax.engine import job_input, jobs
from qwenjax.text.tokenizer import Tokenizer


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], tools=None
                ) -> tuple[np.ndarray, np.ndarray]:
  """(ids [n] int32, mask [n] bool): the conversation rendered with the chat template, tokenized once; mask is
  True on the tokens of each assistant turn's reply, through its end-of-turn token (its trailing newline not).

  The reply of assistant message i spans the text between the rendering of messages[:i] with the generation
  prompt and that of messages[:i + 1]; InputError if the template does not render turns as prefixes."""
  if not any(m.get("role") == "assistant" for m in messages):
    raise InputError("the conversation has no assistant turn to learn from.")
  full = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=False)
  spans = []
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    head = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True) if i else ""
    turn = tokenizer.apply_chat_template(messages[:i + 1], tools=tools, add_generation_prompt=False)
    if not (full.startswith(turn) and turn.startswith(head)):
      raise InputError(f"message {i}: the chat template does not render the conversation's turns as prefixes of "
                       "one another, so the assistant's tokens cannot be told apart.")
    end = len(turn.rstrip())
    spans.append((len(head), end))
  encoding = tokenizer.backend.encode(full, add_special_tokens=False)
  ids = np.asarray(encoding.ids, np.int32)
  starts = np.asarray([s for s, _ in encoding.offsets], np.int64)
  mask = np.zeros(len(ids), bool)
  for lo, hi in spans:
    mask |= (starts >= lo) & (starts < hi)
  return ids, mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedRows:
  """N rows of T tokens. tokens [N, T] int32 (0 past the last segment); positions [N, T] int32, each token's
  position within its segment; targets [N, T] int32, the next token of its segment (-1: none); weights [N, T]
  float32, 1 where the target is an assistant token (the loss mask), else 0."""

  tokens: np.ndarray
  positions: np.ndarray
  targets: np.ndarray
  weights: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)

  def take(self, index: np.ndarray) -> PackedRows:
    return PackedRows(*(a[index] for a in dataclasses.astuple(self)))


def segment_tokens(positions, targets):
  """[..., T] bool (numpy or jax, as given): the tokens of segments, not a row's padding (which has position 0 and
  no target; a segment's first token has a target, its later ones a position > 0)."""
  return (targets >= 0) | (positions > 0)


def pack(examples: Iterable[tuple[np.ndarray, np.ndarray]], row_len: int) -> tuple[PackedRows, int]:
  """Packs (ids, mask) examples into rows of row_len tokens, in order, first fit (a row takes the next example
  while it fits; an example longer than a row is cut to its first row_len tokens). Returns the rows and how many
  examples were cut."""
  rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
  used, cut = 0, 0
  for ids, mask in examples:
    if len(ids) > row_len:
      ids, mask, cut = ids[:row_len], mask[:row_len], cut + 1
    if used + len(ids) > row_len:
      rows.append([])
      used = 0
    rows[-1].append((ids, mask))
    used += len(ids)
  rows = [r for r in rows if r]
  n = len(rows)
  tokens = np.zeros((n, row_len), np.int32)
  positions = np.zeros((n, row_len), np.int32)
  targets = np.full((n, row_len), -1, np.int32)
  weights = np.zeros((n, row_len), np.float32)
  for r, segments in enumerate(rows):
    at = 0
    for ids, mask in segments:
      k = len(ids)
      tokens[r, at:at + k] = ids
      positions[r, at:at + k] = np.arange(k)
      targets[r, at:at + k - 1] = ids[1:]
      weights[r, at:at + k - 1] = mask[1:]  # position t predicts token t + 1: weighted if that one is learned
      at += k
  return PackedRows(tokens, positions, targets, weights), cut


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One training example from a JSONL line: where it came from ("<path>:<line>"), its messages and tools, or
  `error` (messages None) saying why the line cannot be used: the caller reports it and goes on."""

  where: str
  messages: list[dict[str, Any]] | None
  tools: Any = None
  error: str | None = None


def _messages_of(line: job_input.InputLine) -> Conversation:
  """A parsed line's conversation: simple ({"messages": [...]}) or OpenAI Batch ({"body": {"messages": ...}})."""
  if line.error is not None:
    return Conversation(line.where, None, error=line.error)
  body = line.obj.get("body") if isinstance(line.obj.get("body"), dict) else line.obj
  messages = body.get("messages")
  if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
    return Conversation(line.where, None, error=f"{line.where}: needs 'messages', a list of {{'role': ..., "
                        "'content': ...}} objects.")
  return Conversation(line.where, messages, body.get("tools"))


def conversations(path: str) -> Iterator[Conversation]:
  """Each non-blank line of a chat JSONL file (`qwenjax.engine.job_input.read_input`: BOM, UTF-8 and JSON errors
  are that line's `error`): simple or OpenAI Batch request lines, assistant turns included."""
  for line in job_input.read_input(path):
    yield _messages_of(line)


@dataclasses.dataclass
class JoinCounts:
  """How a batch job's requests and results joined: matched (a conversation each), requests without a usable
  response (none, an error record, or a line in error), responses without a request, and replies cut by max_tokens
  (left out unless kept)."""

  matched: int = 0
  missing_responses: int = 0
  missing_requests: int = 0
  truncated: int = 0

  def __str__(self) -> str:
    return (f"{self.matched} matched, {_count(self.missing_responses, 'request')} without a usable response, "
            f"{_count(self.missing_requests, 'response')} without a request, {self.truncated} cut by max_tokens")


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _reply(line: job_input.InputLine) -> tuple[str | None, str | None, str | None]:
  """(reply text, finish_reason, None) of a result line; (None, None, None) for an error record; (None, None,
  what is wrong) for a line that is no result of either format."""
  obj, where = line.obj, line.where
  kind = job_input._json_type  # pylint: disable=protected-access  (how input errors name a JSON value's type)
  if "response" in obj:  # an OpenAI Batch output line
    response = obj["response"]
    if not isinstance(response, dict):
      return None, None, (f"{where}: 'response' must be an object (an OpenAI Batch output line), got "
                          f"{kind(response)}.")
    if response.get("status_code") != 200:
      return None, None, None
    body = response.get("body")
    choices = body.get("choices") if isinstance(body, dict) else None
    if not (isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices)):
      return None, None, f"{where}: response.body.choices must be a non-empty list of objects."
    choice = choices[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    if not isinstance(text, str):
      return None, None, f"{where}: response.body.choices[0] has no text (message.content or text)."
    return text, choice.get("finish_reason"), None
  if "text" in obj:  # a simple answer
    if not isinstance(obj["text"], str):
      return None, None, f"{where}: 'text' must be a string, got {kind(obj['text'])}."
    return obj["text"], obj.get("finish_reason"), None
  if isinstance(obj.get("error"), (str, dict)):  # a simple error record
    return None, None, None
  return None, None, f"{where}: not a batch_generate result (no 'text', 'response' or 'error')."


def conversations_from_job(requests: str, results: str, finished_only: bool = True) -> Iterator[Conversation]:
  """A batch job's requests (`batch_generate --input`) joined with its results (`--output`) by id: each request's
  messages with its reply appended as the assistant turn. Error records and requests without a result are left
  out, and with finished_only so are replies cut by max_tokens (finish_reason "length"). A result line of neither
  format, or a request line that cannot be used, is yielded as that line's `error`. The counts (`JoinCounts`) are
  logged at the end; InputError, with them, if no request has a usable reply."""
  replies, counts, cut = {}, JoinCounts(), set()
  for line in job_input.read_input(results):
    if line.error is not None:  # e.g. a torn record of a killed job (its request was redone under the same id)
      yield Conversation(line.where, None, error=line.error)
      continue
    text, finish_reason, problem = _reply(line)
    if problem is not None:
      yield Conversation(line.where, None, error=problem)
    elif text is not None:
      key = jobs.record_key(line.key)
      if finished_only and finish_reason == "length":
        cut.add(key)
        replies.pop(key, None)
      else:
        cut.discard(key)
        replies[key] = text
  request_keys = set()
  for line in job_input.read_input(requests):
    conversation = _messages_of(line)
    key = jobs.record_key(line.key)
    request_keys.add(key)
    if conversation.error is not None:
      yield conversation
    elif key in replies:
      counts.matched += 1
      yield dataclasses.replace(conversation,
                                messages=[*conversation.messages, {"role": "assistant", "content": replies[key]}])
    elif key in cut:
      counts.truncated += 1
    else:
      counts.missing_responses += 1
  counts.missing_requests = len((replies.keys() | cut) - request_keys)
  kept = " (--keep_truncated keeps those)" if counts.truncated and finished_only else ""
  logging.info("--requests=%s and --responses=%s: %s%s.", requests, results, counts, kept)
  if not counts.matched:
    raise InputError(f"--requests={requests} and --responses={results} have no usable conversation in common: "
                     f"{counts}.")


def split_rows(rows: PackedRows, eval_fraction: float, seed: int) -> tuple[PackedRows, PackedRows | None]:
  """(train, held-out) rows: a fixed random eval_fraction of the rows (at least one) held out, by seed."""
  if eval_fraction <= 0:
    return rows, None
  order = np.random.default_rng(seed).permutation(len(rows))
  n_eval = max(1, int(round(eval_fraction * len(rows))))
  if n_eval >= len(rows):
    raise InputError(f"{len(rows)} packed row(s) leave nothing to train on after holding out {n_eval} for "
                     "evaluation; lower --eval_fraction or add data.")
  return rows.take(np.sort(order[n_eval:])), rows.take(np.sort(order[:n_eval]))
