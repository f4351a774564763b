"""qwenjax.text.reasoning: Qwen3's thinking blocks split from replies, finished and while they stream."""

import pytest

from qwenjax.text import reasoning

CASES = [
    # (reply, opened by the prompt, reasoning_content, content)
    ("It is 3 m.", False, None, "It is 3 m."),  # no block
    ("<think>\n\n</think>\n\nHello", False, None, "Hello"),  # an empty block (enable_thinking: false renders one)
    ("<think>\nCheck the units.\n</think>\n\nIt is 3 m.", False, "Check the units.", "It is 3 m."),
    ("<think>\nFirst, the un", False, "First, the un", ""),  # cut by max_tokens inside the block: no answer yet
    ("<think>\nplan\n</think>\n\n<tool_call>\n{\"name\": \"f\"}\n</tool_call>", False, "plan",
     "<tool_call>\n{\"name\": \"f\"}\n</tool_call>"),  # tool calls after the block: they are in the content
    ("Plan it.\n</think>\n\nDone.", True, "Plan it.", "Done."),  # the template wrote <think> for the model
    ("Plan it", True, "Plan it", ""),  # ... and the reply was cut inside it
    ("Sure: <think>x</think> ok", False, "x", "Sure: ok"),  # text before a block stays in front
]


@pytest.mark.parametrize("reply, opened, thought, content", CASES)
def test_split(reply, opened, thought, content):
  assert reasoning.split(reply, opened) == (thought, content)


@pytest.mark.parametrize("reply, opened, thought, content", CASES)
def test_every_prefix_streams_a_prefix_of_the_finished_split(reply, opened, thought, content):
  """What a stream sends (split_partial of each prefix) only grows, and ends as the finished split."""
  sent_thought, sent_content = "", ""
  for i in range(len(reply) + 1):
    partial_thought, partial_content = reasoning.split_partial(reply[:i], opened)
    assert partial_thought.startswith(sent_thought) and partial_content.startswith(sent_content), reply[:i]
    assert (thought or "").startswith(partial_thought) and content.startswith(partial_content), reply[:i]
    sent_thought, sent_content = partial_thought, partial_content
  assert "<" not in sent_thought and "</think" not in sent_content


def test_which_templates_think(qwen_template):
  assert not reasoning.thinks(qwen_template) and not reasoning.thinks(None)  # Qwen2.5's
  assert reasoning.thinks(qwen_template + "{%- if enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}")
