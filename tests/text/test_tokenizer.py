"""qwenjax.text.tokenizer against transformers on a tiny Qwen2-style tokenizer trained here.

Chat prompts must be byte-identical to `AutoTokenizer.apply_chat_template` with Qwen2.5's real chat
template (tests/data/qwen2_5_chat_template.jinja, taken from the embedded GGUF).
"""

import json
import shutil

import pytest

from qwenjax._errors import CheckpointError, ConfigError, InputError
from qwenjax.text.gguf_vocab import QWEN2_SPLIT_REGEX
from qwenjax.text.tokenizer import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich or 東京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web for <query> & return snippets.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}

CHATS = {
    "single_user": [{"role": "user", "content": "Write a haiku about JAX."}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    "multi_turn": [
        {"role": "system", "content": "You are a coding assistant."},
        {"role": "user", "content": "Reverse a list in Python?"},
        {"role": "assistant", "content": "Use `xs[::-1]` or `xs.reverse()`."},
        {"role": "user", "content": "And in place?\n\nThanks 🙏"},
    ],
    "tool_calls": [
        {"role": "user", "content": "Weather in Zürich and Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Paris", "unit": "celsius"}}},
        ]},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 3}"},
        {"role": "tool", "name": "get_weather", "content": "<b>12 °C</b> & sunny"},
        {"role": "assistant", "content": "Zürich 3 °C, Paris 12 °C."},
        {"role": "user", "content": "Thanks"},
    ],
    "text_and_bare_call": [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "東京の天気は？"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"name": "get_weather", "arguments": {"city": "東京"}}]},
        {"role": "tool", "content": "晴れ"},
    ],
}

TEXTS = [
    "",
    "hello world",
    "def f(x):\n\treturn x  *  2\n\n\n",
    "   leading and trailing   ",
    "你好，世界！ Café naïve 😀🇯🇵",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call><|endoftext|>",
    "<|fim_prefix|>def a():<|fim_suffix|>\n<|fim_middle|>",
]


def _copy_dir(src, dst, **files):
  """Copies a tokenizer directory, then writes (name=text) or deletes (name=None) files."""
  shutil.copytree(src, dst)
  for name, text in files.items():
    path = dst / name.replace("__", ".")
    if text is None:
      path.unlink()
    else:
      path.write_text(text, encoding="utf-8")
  return dst


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("chat", sorted(CHATS))
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, chat, with_tools, add_generation_prompt):
  tools = [WEATHER_TOOL, SEARCH_TOOL] if with_tools else None
  expected = hf_tokenizer.apply_chat_template(CHATS[chat], tools=tools, add_generation_prompt=add_generation_prompt,
                                        tokenize=False)
  got = tokenizer.apply_chat_template(CHATS[chat], tools=tools, add_generation_prompt=add_generation_prompt)
  assert got.encode("utf-8") == expected.encode("utf-8")


def test_chat_template_tokenized_matches_transformers(tokenizer, hf_tokenizer):
  messages = CHATS["tool_calls"]
  expected = hf_tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
  assert tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=True) == list(expected)


def test_template_variables_match_transformers(tiny_tokenizer_dir, tmp_path, hf_tokenizer):
  template = "[{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ flavour }}|{{ tools }}|" \
             "{{ documents }}]"
  directory = _copy_dir(tiny_tokenizer_dir, tmp_path / "t", chat_template__jinja=template)
  messages = [{"role": "user", "content": "x"}]
  expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, flavour="mint")
  assert Tokenizer.from_directory(directory).apply_chat_template(messages, flavour="mint") == expected


def test_encode_decode_match_transformers(tokenizer, hf_tokenizer):
  for text in TEXTS:
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text), text
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
  assert tokenizer.decode(tokenizer.encode("<tool_call><|im_end|>"), skip_special_tokens=True) == "<tool_call>"


def test_special_ids_and_vocab(tokenizer, hf_tokenizer):
  im_end, endoftext = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
  assert tokenizer.eos_token_ids == [im_end, endoftext]
  assert tokenizer.pad_token_id == endoftext == hf_tokenizer.pad_token_id
  assert tokenizer.vocab_size == len(hf_tokenizer)
  assert tokenizer.special_tokens["eos_token"] == "<|im_end|>" and tokenizer.special_tokens["bos_token"] is None
  for token in ("<|im_start|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|vision_start|>"):
    assert tokenizer.encode(token) == [tokenizer.token_to_id(token)]


def test_split_regex_is_qwen2s():
  from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

  assert QWEN2_SPLIT_REGEX == PRETOKENIZE_REGEX


def test_eos_ids_union_in_order(tiny_tokenizer_dir, tmp_path, tokenizer):
  im_end, endoftext, im_start = (tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>"))
  directory = _copy_dir(tiny_tokenizer_dir, tmp_path / "t",
                        generation_config__json=json.dumps({"eos_token_id": endoftext}),
                        config__json=json.dumps({"eos_token_id": [im_start, endoftext]}))
  assert Tokenizer.from_directory(directory).eos_token_ids == [endoftext, im_start, im_end]
  bare = _copy_dir(tiny_tokenizer_dir, tmp_path / "bare", generation_config__json=None, config__json=None)
  assert Tokenizer.from_directory(bare).eos_token_ids == [im_end]


def test_template_sources(tiny_tokenizer_dir, tmp_path, qwen_template):
  config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
  messages = [{"role": "user", "content": "hi"}]

  jinja = _copy_dir(tiny_tokenizer_dir, tmp_path / "jinja", chat_template__jinja="J{{ messages[0].content }}")
  assert Tokenizer.from_directory(jinja).apply_chat_template(messages) == "Jhi"

  named = dict(config, chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
               eos_token={"content": "<|im_end|>", "special": True}, pad_token={"content": "<|endoftext|>"})
  named_dir = _copy_dir(tiny_tokenizer_dir, tmp_path / "named", tokenizer_config__json=json.dumps(named))
  tok = Tokenizer.from_directory(named_dir)
  assert tok.apply_chat_template(messages) == "D"
  assert tok.special_tokens["pad_token"] == "<|endoftext|>"

  processor = {k: v for k, v in config.items() if k != "chat_template"}
  processor_dir = _copy_dir(tiny_tokenizer_dir, tmp_path / "processor", tokenizer_config__json=json.dumps(processor),
                            chat_template__json=json.dumps({"chat_template": qwen_template}))
  assert Tokenizer.from_directory(processor_dir).chat_template == qwen_template

  none_dir = _copy_dir(tiny_tokenizer_dir, tmp_path / "none", tokenizer_config__json=json.dumps(processor))
  with pytest.raises(ConfigError, match="has no chat template") as err:
    Tokenizer.from_directory(none_dir).apply_chat_template(messages)
  assert str(none_dir) in str(err.value)


@pytest.mark.parametrize("template, error, pattern", [
    ("{% if messages %}{{ messages[0].content }", ConfigError, r"syntax error at line 1"),
    ("{%- for m in messages %}\n{{ raise_exception('Only user turns, please!') }}\n{%- endfor %}", InputError,
     r"rejects these messages: Only user turns, please!"),
    ("{% set xs = [] %}\n{{ xs.append(1) }}", ConfigError, r"sandbox forbids at line 2"),
    ("{{ messages[0].content + 1 }}", InputError, r"failed on these messages at line 1 \(TypeError"),
])
def test_template_errors_are_one_line(tiny_tokenizer_dir, tmp_path, template, error, pattern):
  directory = _copy_dir(tiny_tokenizer_dir, tmp_path / "t", chat_template__jinja=template)
  with pytest.raises(error, match=pattern) as err:
    Tokenizer.from_directory(directory).apply_chat_template([{"role": "user", "content": "hi"}])
  message = str(err.value)
  assert "\n" not in message and str(directory / "chat_template.jinja") in message


def test_bad_messages_are_input_errors(tokenizer):
  with pytest.raises(InputError, match="list of dicts"):
    tokenizer.apply_chat_template("hello")
  with pytest.raises(InputError, match="empty"):
    tokenizer.apply_chat_template([])
  with pytest.raises(InputError, match=r"messages\[1\] is a str"):
    tokenizer.apply_chat_template([{"role": "user", "content": "a"}, "b"])
  with pytest.raises(InputError, match="UndefinedError") as err:  # Qwen's template concatenates content.
    tokenizer.apply_chat_template([{"role": "user"}])
  assert "\n" not in str(err.value)
  with pytest.raises(InputError, match="encode takes a str"):
    tokenizer.encode(b"bytes")
  with pytest.raises(InputError, match="decode got -1, which is not a token id"):
    tokenizer.decode([5, -1])
  assert tokenizer.decode([tokenizer.vocab_size + 10]) == ""  # Unknown ids decode to nothing, as in transformers.


def test_directory_errors_name_the_file(tiny_tokenizer_dir, tmp_path):
  missing = _copy_dir(tiny_tokenizer_dir, tmp_path / "missing", tokenizer__json=None)
  with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
    Tokenizer.from_directory(missing)
  broken = _copy_dir(tiny_tokenizer_dir, tmp_path / "broken", tokenizer__json='{"model": ')
  with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a valid tokenizers file") as err:
    Tokenizer.from_directory(broken)
  assert "\n" not in str(err.value)
  bad_config = _copy_dir(tiny_tokenizer_dir, tmp_path / "config", tokenizer_config__json="{\n  'eos_token': 1\n}")
  with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is not valid JSON \(line 2"):
    Tokenizer.from_directory(bad_config)
  with pytest.raises(CheckpointError, match="does not exist"):
    Tokenizer.from_directory(tmp_path / "nowhere")


def test_stream_decoder_never_splits_a_character(tokenizer):
  text = "naïve 😀 世界 🇯🇵 done 👩‍💻!"
  ids = tokenizer.encode(text)
  assert len(ids) > len(text)  # The tiny vocabulary spells most of these characters byte by byte.
  stream = tokenizer.stream()
  pieces = [stream.add(i) for i in ids]
  assert "".join(pieces) + stream.flush() == text
  assert not any("\ufffd" in piece for piece in pieces)
  assert "" in pieces  # Some characters were held back until their last byte arrived.
  # Every emitted piece ends on a character boundary: each prefix re-encodes to valid UTF-8 text.
  assert all(text.startswith("".join(pieces[:k])) for k in range(len(pieces) + 1))


def test_stream_decoder_flushes_incomplete_bytes_and_skips_specials(tokenizer):
  stream = tokenizer.stream()
  lead_byte = tokenizer.token_to_id("ð")  # Byte 0xF0 in the byte-level alphabet: starts a 4-byte character.
  assert stream.add(tokenizer.token_to_id("a")) == "a"
  assert stream.add(lead_byte) == ""
  assert stream.flush() == "\ufffd"
  quiet = tokenizer.stream(skip_special_tokens=True)
  ids = tokenizer.encode("<|im_start|>hi there<|im_end|>")
  assert "".join(quiet.add(i) for i in ids) + quiet.flush() == "hi there"
