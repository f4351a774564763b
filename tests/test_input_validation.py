"""Every bad input is one sentence naming the culprit: config fields of the wrong type, bad flags and paths given to
the launch scripts, images for a text model, malformed chat messages, and chat templates that would not end."""

import json
import pathlib
import subprocess
import sys

import pytest

from qwenjax import ConfigError, InputError, QwenConfig
from qwenjax.model.qwen2_vl import QwenVLConfig
from qwenjax.multimodal.processing import ImageProcessorConfig

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir

REPO = pathlib.Path(__file__).resolve().parents[1]

TEXT = {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
        "rope_theta": 1e4, "tie_word_embeddings": False, "eos_token_id": [300, 301]}
VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
          "fullatt_block_indexes": [1], "window_size": 56, "tokens_per_second": 2}
VL = {**TEXT, "model_type": "qwen2_5_vl", "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
      "vision_config": VISION}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny text-only Qwen2 checkpoint with the tiny Qwen2.5-style tokenizer beside it."""
  from qwenjax import Tokenizer

  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("tiny"))
  tok = Tokenizer.from_directory(d)
  build_tiny_qwen2(d, vocab_size=640, bos_token_id=tok.pad_token_id, eos_token_id=tok.token_to_id("<|im_end|>"))
  return d


@pytest.fixture(scope="module")
def engine(tiny):
  import qwenjax

  loaded = qwenjax.load(str(tiny))
  return qwenjax.Engine(loaded.model, loaded.tokenizer, max_batch_size=1, max_seq_len=256)


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600)


def _error_line(proc) -> str:
  """The one `error:` line of a failed run, which must show no traceback."""
  assert proc.returncode == 1 and proc.stdout == "", proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  return errors[0]


# --- 1. Config fields are type-checked, not coerced ---------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    ({"tie_word_embeddings": "false"}, 'tie_word_embeddings must be a boolean, got the string "false".'),
    ({"num_hidden_layers": "2"}, 'num_hidden_layers must be a positive integer, got the string "2".'),
    ({"hidden_size": 64.5}, "hidden_size must be a positive integer, got 64.5."),
    ({"hidden_size": 64.0}, "hidden_size must be a positive integer, got 64.0."),
    ({"vocab_size": True}, "vocab_size must be a positive integer, got true."),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0."),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0."),
    ({"head_dim": -8}, "head_dim must be a positive integer, got -8."),
    ({"rms_norm_eps": "1e-6"}, 'rms_norm_eps must be a positive number, got the string "1e-6".'),
    ({"rope_theta": 0}, "rope_theta must be a positive number, got 0."),
    ({"eos_token_id": [300, "301"]}, 'eos_token_id must be a list of integers, got [300, "301"].'),
    ({"eos_token_id": 3.0}, "eos_token_id must be an integer, got 3.0."),
    ({"use_sliding_window": 1}, "use_sliding_window must be a boolean, got 1."),
    ({"rope_scaling": {"type": "yarn", "factor": "4"}}, 'rope_scaling.factor must be a positive number, got the '
                                                        'string "4".'),
    ({"rope_scaling": "yarn"}, 'rope_scaling must be an object, got the string "yarn".'),
    ({"num_key_value_heads": 3}, "num_attention_heads (8) is not a multiple of num_key_value_heads (3)."),
])
def test_config_fields_of_the_wrong_type_name_the_field_and_the_file(tmp_path, bad, message):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**TEXT, **bad}))
  with pytest.raises(ConfigError) as e:
    QwenConfig.from_file(path)
  assert str(e.value) == f"{path}: {message}"


def test_well_typed_config_parses():
  cfg = QwenConfig.from_hf_config(TEXT)
  assert (cfg.num_layers, cfg.head_dim, cfg.tie_word_embeddings, cfg.eos_token_ids) == (2, 8, False, (300, 301))
  assert isinstance(cfg.rope_theta, float) and QwenConfig.from_hf_config({**TEXT, "rope_theta": 10000}) == cfg


@pytest.mark.parametrize("bad, message", [
    ({"vision_config": {**VISION, "depth": "2"}}, 'vision_config.depth must be a positive integer, got the string '
                                                  '"2".'),
    ({"vision_config": {**VISION, "fullatt_block_indexes": [1.0]}},
     "vision_config.fullatt_block_indexes must be a list of integers, got [1.0]."),
    ({"vision_config": {**VISION, "tokens_per_second": "2"}},
     'vision_config.tokens_per_second must be a positive number, got the string "2".'),
    ({"vision_config": "none"}, 'vision_config must be an object, got the string "none".'),
    ({"image_token_id": 290.0}, "image_token_id must be an integer, got 290.0."),
    ({"tie_word_embeddings": "true"}, 'tie_word_embeddings must be a boolean, got the string "true".'),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [2, "1", 1]}},
     'rope_scaling.mrope_section must be a list of positive integers, got [2, "1", 1].'),
])
def test_vl_config_fields_are_checked(tmp_path, bad, message):
  assert QwenVLConfig.from_hf_config(VL).vision.depth == 2
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**VL, **bad}))
  with pytest.raises(ConfigError) as e:
    QwenVLConfig.from_file(path)
  assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize("bad, message", [
    ({"min_pixels": 3136.0}, "min_pixels must be an integer, got 3136.0."),
    ({"size": {"shortest_edge": "100", "longest_edge": 200000}}, 'size.shortest_edge must be an integer, got the '
                                                                 'string "100".'),
    ({"image_mean": [0.5, "0.5", 0.5]}, 'image_mean must be a list of numbers, got [0.5, "0.5", 0.5].'),
    ({"rescale_factor": True}, "rescale_factor must be a number, got true."),
])
def test_preprocessor_config_fields_are_checked(tmp_path, bad, message):
  path = tmp_path / "preprocessor_config.json"
  path.write_text(json.dumps(bad))
  with pytest.raises(ConfigError) as e:
    ImageProcessorConfig.from_file(path)
  assert str(e.value) == f"{path}: {message}"


# --- 2. Flags: one error line, not absl's usage dump ---------------------------------------------------------


@pytest.mark.parametrize("module, args, line", [
    ("generate", ["--prompt=hi", "--max_new_tokens=0"], "error: --max_new_tokens: 0 is not a positive integer."),
    ("generate", ["--prompt=hi", "--max_seq_len=-5"], "error: --max_seq_len: -5 is not a positive integer."),
    ("generate", ["--prompt=hi", "--top_p=1.5"], "error: --top_p: top_p must be a number in (0, 1], got 1.5."),
    ("generate", ["--prompt=hi", "--top_k=-1"],
     "error: --top_k: top_k must be an integer >= 0 (0 disables it), got -1."),
    ("generate", ["--prompt=hi", "--top_k=many"],
     "error: --top_k: invalid literal for int() with base 10: 'many'."),
    ("generate", ["--prompt=hi", "--max_new_token=3"],
     "error: --max_new_token: unknown flag (did you mean --max_new_tokens?)."),
    ("generate", [], "error: --prompt: this flag is required."),
    ("generate", ["--prompt=hi", "there"], "error: unexpected argument 'there'; flags are given as --name=value."),
    ("convert", ["--source=default"], "error: --output: this flag is required."),
    ("benchmark", ["--batch_sizes=1,0"], "error: --batch_sizes: expected positive integers, e.g. 1,8,32."),
    ("benchmark", ["--compare_with=vllm"], "error: --compare_with: expected engines among transformers, llamacpp."),
])
def test_a_bad_flag_is_one_error_line(module, args, line):
  proc = _run(module, *args)
  assert _error_line(proc) == line
  assert proc.stderr == line + "\n"  # and nothing else: no usage text, no "FATAL Flags parsing error"


def test_help_still_works():
  proc = _run("generate", "--help")
  assert "--max_new_tokens" in proc.stdout and "error:" not in proc.stderr


# --- 3. Bad paths: no traceback ----------------------------------------------------------------------------


def test_bad_model_paths_are_one_error_line(tiny, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  assert _error_line(_run("generate", f"--model={empty}", "--prompt=hi")) == (
      f"error: {empty}: neither a .gguf file nor a directory with config.json.")
  broken = tmp_path / "broken"
  broken.mkdir()
  for f in tiny.iterdir():
    (broken / f.name).symlink_to(f)
  (broken / "config.json").unlink()
  (broken / "config.json").write_text(json.dumps({**json.loads((tiny / "config.json").read_text()),
                                                  "tie_word_embeddings": "false"}))
  assert _error_line(_run("generate", f"--model={broken}", "--prompt=hi")) == (
      f'error: {broken / "config.json"}: tie_word_embeddings must be a boolean, got the string "false".')


def test_convert_output_that_cannot_be_created_is_one_error_line(tiny, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  assert _error_line(_run("convert", f"--source={tiny}", f"--output={a_file}")) == (
      f"error: {a_file}: already exists and is not an empty directory; convert writes a new one.")
  assert _error_line(_run("convert", f"--source={tiny}", f"--output={a_file}/ckpt")) == (
      f"error: {a_file}/ckpt: cannot create the output directory (Not a directory).")
  assert _error_line(_run("convert", f"--source={tmp_path}/missing", f"--output={tmp_path}/out")) == (
      f"error: {tmp_path}/missing: no such file or directory (expected 'default', a .gguf file, a Hugging Face "
      "checkpoint directory or a qwenjax Orbax checkpoint directory).")


def test_benchmark_output_dir_that_is_a_file_is_one_error_line(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  assert _error_line(_run("benchmark", "--preset=tiny", f"--output_dir={a_file}")) == (
      f"error: --output_dir={a_file}: cannot create the directory (File exists).")


# --- 4. Images for a text-only model -----------------------------------------------------------------------


def test_image_for_a_text_model_is_one_error_line(tiny, tmp_path):
  proc = _run("generate", f"--model={tiny}", "--prompt=hi", f"--image={tmp_path}/x.png")
  assert _error_line(proc) == "error: this model (Qwen2) takes no images or videos."


@pytest.mark.parametrize("request_", [
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                               {"type": "text", "text": "hi"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "video", "video": ["a.png", "b.png"]}]}]},
    {"prompt": "<|vision_start|><|image_pad|><|vision_end|>hi", "images": ["x.png"]},
])
def test_images_for_a_text_model_are_refused_before_the_template(engine, request_):
  with pytest.raises(InputError, match=r"^this model \(Qwen2\) takes no images or videos\.$"):
    engine.prepare(request_)


def test_images_beside_messages_are_not_dropped(engine):
  with pytest.raises(InputError, match="'images' and 'videos' go with a raw 'prompt'"):
    engine.prepare({"messages": [{"role": "user", "content": "hi"}], "images": ["x.png"]})


# --- 5. Messages -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}, {"role": "narrator", "content": "Once"}],
     "message 1: unknown role 'narrator' (expected system, user, assistant or tool)."),
    ([{"role": 5, "content": "hi"}], "message 0: unknown role 5 (expected system, user, assistant or tool)."),
    ([{"content": "hi"}], "message 0: no role (expected system, user, assistant or tool)."),
    ([{"role": "user"}], "message 0: user messages need content (a string or a list of content parts)."),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
     "message 1: assistant messages need content (a string or a list of content parts) or tool_calls."),
    ([{"role": "user", "content": 42}], "message 0: content must be a string or a list of content parts, got int."),
    ([{"role": "user", "content": [{"type": "text", "text": 42}]}], "message 0: a text part needs {'text': string}."),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": "get_weather"}],
     "message 1: tool_calls must be a list, in an assistant message."),
])
def test_malformed_messages_name_the_message(engine, messages, message):
  with pytest.raises(InputError) as e:
    engine.prepare({"messages": messages})
  assert str(e.value) == message


def test_well_formed_messages_still_render(engine):
  tool_call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
  ids = engine.prepare({"messages": [
      {"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
      {"role": "assistant", "content": None, "tool_calls": [tool_call]}, {"role": "tool", "content": "12 C"}]})
  text = engine.tokenizer.decode(ids)
  assert "Be brief." in text and "Weather?" in text and "get_weather" in text and "12 C" in text


# --- 6. Chat templates that would not end ------------------------------------------------------------------

NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}{{ x }}{% endfor %}{% endfor %}"


@pytest.mark.parametrize("body", ["x", ""])  # with output, and looping without any
def test_a_template_that_never_ends_is_stopped(tmp_path, body):
  d = save_tiny_tokenizer_dir(tmp_path / "tok", chat_template=NESTED.replace("{{ x }}", body))
  code = ("import sys\nfrom qwenjax import Tokenizer\ntok = Tokenizer.from_directory(sys.argv[1])\n"
          "tok.render_seconds = 1\ntok.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n")
  proc = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"qwenjax._errors.ConfigError: The chat template of {d / 'tokenizer_config.json'} (chat_template) exceeded "
      "the render limit (10,000,000 characters / 1 s).")


@pytest.mark.parametrize("template", ["{% for i in range(3000) %}x{% endfor %}", "{{ 'x' * 3000 }}"])
def test_a_template_that_writes_too_much_is_stopped(tmp_path, template):
  from qwenjax import Tokenizer

  tok = Tokenizer.from_directory(save_tiny_tokenizer_dir(tmp_path / "tok", chat_template=template))
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "x" * 3000
  tok.render_max_chars = 2000
  with pytest.raises(ConfigError, match=r"exceeded the render limit \(2,000 characters / 10 s\)\.$"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bounded_range_behaves_like_range(tmp_path):
  from qwenjax import Tokenizer

  template = ("{{ range(5)|list }} {{ range(5)|length }} {{ range(5)|reverse|list }} {{ range(1, 9, 3)[1:]|list }}"
              " {% for i in range(3) %}{{ loop.revindex }}{% endfor %}")
  tok = Tokenizer.from_directory(save_tiny_tokenizer_dir(tmp_path / "tok", chat_template=template))
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
      "[0, 1, 2, 3, 4] 5 [4, 3, 2, 1, 0] [4, 7] 321")


@pytest.mark.parametrize("template", ["{{ 'x' * 10**10 }}", "{{ [1] * 10**9 }}", "{{ 2 ** 100000000 }}"])
def test_a_template_that_builds_a_huge_value_is_stopped(tmp_path, template):
  from qwenjax import Tokenizer

  tok = Tokenizer.from_directory(save_tiny_tokenizer_dir(tmp_path / "tok", chat_template=template))
  with pytest.raises(ConfigError, match=r"exceeded the render limit"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])
