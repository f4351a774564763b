"""Qwen3's thinking: a reply's `<think>...</think>` block as `reasoning_content` beside its `content`.

    reasoning.split("<think>\\nCheck the units.\\n</think>\\n\\nIt is 3 m.")   # ("Check the units.", "It is 3 m.")
    reasoning.split("It is 3 m.")                                             # (None, "It is 3 m.")
    reasoning.split("<think>\\nFirst, the units")                              # ("First, the units", "")
    reasoning.thinks(template_source)                                         # does this chat template think?

Qwen3 opens its block itself (`<think>`), or, where the chat template opened it (the thinking-only releases),
writes only its end: both read the same. A block cut short by max_tokens is all reasoning and no content (the
model never got to its answer). A block that holds nothing (what `enable_thinking: false` renders) is no
reasoning: None. The content is what follows the block, leading whitespace dropped, with any text before the
block kept in front; tool calls are read from the content alone.
"""

from __future__ import annotations

from qwenjax.text.tool_calls import partial_tag

OPEN, CLOSE = "<think>", "</think>"


def thinks(chat_template: str | None) -> bool:
  """Whether a chat template knows thinking blocks (Qwen3's do; Qwen2.5's do not): replies are then split."""
  return chat_template is not None and CLOSE in chat_template


def split(text: str, opened: bool = False) -> tuple[str | None, str]:
  """(reasoning, content) of a finished reply; reasoning None when there is no block or it is empty. opened: the
  prompt ended inside a block (its template wrote `<think>`), so the reply starts in one."""
  reasoning, content = _split(OPEN + text if opened else text, final=True)
  return reasoning, content


def split_partial(text: str, opened: bool = False) -> tuple[str, str]:
  """What of a reply still being generated is settled: (its reasoning so far, its content so far). A trailing
  part of a tag waits, as does whitespace at either end of the reasoning and at the start of the content; each is
  a prefix of what any longer text, and the finished reply (`split`), gives."""
  reasoning, content = _split(OPEN + text if opened else text, final=False)
  return reasoning or "", content


def _split(text: str, final: bool) -> tuple[str | None, str]:
  start = text.find(OPEN)
  end = text.find(CLOSE, 0 if start < 0 else start + len(OPEN))
  if start < 0 and end < 0:
    return None, text if final else text[:len(text) - partial_tag(text, (OPEN, CLOSE))]
  before = text[:start] if start >= 0 else ""
  inside = text[start + len(OPEN) if start >= 0 else 0:len(text) if end < 0 else end]
  if end < 0 and not final:
    inside = inside[:len(inside) - partial_tag(inside, (CLOSE,))]
  reasoning = inside.strip()
  if end < 0 and not final:  # whitespace at its end may be followed by more reasoning
    reasoning = inside.lstrip()[:len(reasoning)]
  content = before + (text[end + len(CLOSE):].lstrip() if end >= 0 else "")
  return (reasoning or None) if final else reasoning, content
