"""Power-of-two buckets: the few padded sizes that programs compile at.

Bucketing is a promise (a test counts the compilations): a long-running process compiles one program per bucket,
not one per prompt length, image size or number of stop ids. Every padded size in qwenjax comes from here.
"""

from __future__ import annotations

import bisect
import dataclasses


def next_power_of_two(n: int) -> int:
  """The smallest power of two that is at least `n` (1 for n <= 1)."""
  return 1 << max(0, (n - 1).bit_length())


def step_buckets(max_prefill_chunk: int, max_batch_size: int, max_seq_len: int) -> LengthBuckets:
  """An engine step's prefill buckets: blocks of min(16, ...) tokens, up to the token budget max_prefill_chunk, or
  the most a step can hold when that is less: every slot prefilling a whole max_seq_len prompt, block aligned. Not
  max_seq_len alone: 32 prompts of 64 tokens would then take 16 steps of 128 tokens instead of 4 of 512."""
  block = min(16, max_prefill_chunk, max_seq_len)
  return LengthBuckets(maximum=min(max_prefill_chunk, max_batch_size * -(-max_seq_len // block) * block),
                       minimum=block)


@dataclasses.dataclass(frozen=True)
class LengthBuckets:
  """The padded lengths prompts are compiled at: powers of two from `minimum`, capped at `maximum`."""

  maximum: int
  minimum: int = 16

  @property
  def sizes(self) -> tuple[int, ...]:
    sizes, s = [], self.minimum
    while s < self.maximum:
      sizes.append(s)
      s *= 2
    return tuple(sizes) + (self.maximum,)

  def bucket(self, length: int) -> int:
    """The smallest bucket that holds `length` tokens."""
    sizes = self.sizes
    i = bisect.bisect_left(sizes, length)
    if i == len(sizes):
      raise ValueError(f"{length} tokens exceed the largest bucket ({sizes[-1]}).")
    return sizes[i]
