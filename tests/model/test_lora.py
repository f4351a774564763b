"""LoRA adapters against transformers + peft on a tiny Qwen2: PEFT adapters load, rows with different adapters
(and none) share a batch, merging equals serving unmerged, and ours save in a layout peft loads."""

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from qwenjax import CheckpointError, InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.checkpoints.peft import load_adapter, save_adapter
from qwenjax.engine.engine import Engine
from qwenjax.engine.requests import Request
from qwenjax.engine.sampling import SamplingParams
from qwenjax.model.decoder import StepMetadata
from qwenjax.model.kv_cache import KVCache
from qwenjax.model.lora import LoraBank, init_adapter, merge

from conftest import build_tiny_qwen2, peft_greedy, random_peft, save_tiny_tokenizer_dir

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny Qwen2, two PEFT adapters (all seven projections at rank 4; q/v at rank 2 with rsLoRA) and the
  reference PeftModel holding both."""
  root = tmp_path_factory.mktemp("lora")
  save_tiny_tokenizer_dir(root / "base")  # for launch.generate
  base = build_tiny_qwen2(root / "base", vocab_size=640, num_key_value_heads=2)
  base = random_peft(base, root / "a", 1, 4, 8, ALL)
  base = random_peft(base, root / "b", 2, 2, 6, ["q_proj", "v_proj"], use_rslora=True)
  ref = peft.PeftModel.from_pretrained(base, root / "a", adapter_name="a").eval()
  ref.load_adapter(root / "b", adapter_name="b")
  return root, ref


def _ref_logits(ref, name, ids):
  with torch.no_grad():
    if name is None:
      with ref.disable_adapter():
        return ref(torch.tensor([ids])).logits[0].numpy()
    ref.set_adapter(name)
    return ref(torch.tensor([ids])).logits[0].numpy()


def _logits(model, rows, index):
  """Prefill logits [B, T, V] of equal-length rows, row b under adapter index[b]."""
  tokens = jnp.asarray(rows, jnp.int32)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  meta = StepMetadata(positions, attend_to_cache=False,
                      lora_index=None if index is None else jnp.asarray(index, jnp.int32))
  h, _ = model(tokens, KVCache.zeros(model.cfg, b, t, model.dtype), meta)
  return np.asarray(model.logits(h))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_peft_adapters_match_transformers_in_one_batch(tiny, scan_layers):
  root, ref = tiny
  model = load_model(root / "base", scan_layers=scan_layers)
  model.lora = LoraBank.of(model.cfg, {n: load_adapter(root / n, model.cfg) for n in ("a", "b")})
  ids = [3, 17, 250, 9, 101, 77, 5, 300, 42, 8]
  names = ["a", None, "b", "a"]
  got = _logits(model, [ids] * len(names), [{"a": 0, "b": 1, None: -1}[n] for n in names])
  for row, name in zip(got, names):
    want = _ref_logits(ref, name, ids)
    np.testing.assert_allclose(row, want, atol=1e-4, rtol=0)
  # The adapters change the logits by far more than the tolerance: the comparison is not vacuous.
  assert np.abs(_ref_logits(ref, "a", ids) - _ref_logits(ref, None, ids)).max() > 0.1


def test_a_batch_mixing_two_adapters_and_the_base_gives_each_row_its_own_tokens(tiny):
  """One prompt under adapter a, b and none, and other prompts, interleaved through 4 slots (the same prompt
  under different adapters must not share prefix pages); each equals transformers + peft greedy, and the
  engine serving that request alone."""
  root, ref = tiny
  model = load_model(root / "base")
  lora = {"a": root / "a", "b": root / "b"}
  engine = Engine(model, None, max_batch_size=4, max_seq_len=128, eos_token_ids=(), lora=lora)
  rng = np.random.default_rng(0)
  shared = rng.integers(0, 390, 40).tolist()
  prompts = [shared, shared, shared] + [rng.integers(0, 390, int(rng.integers(5, 50))).tolist() for _ in range(5)]
  names = ["a", "b", None, "b", None, "a", "a", "b"]
  params = SamplingParams(max_tokens=10)
  outs = engine.generate([Request(prompt=p, lora=n, sampling=params) for p, n in zip(prompts, names)])
  for p, n, out in zip(prompts, names, outs):
    assert out.token_ids == peft_greedy(ref, n, p, 10), n
  assert len({tuple(o.token_ids) for o in outs[:3]}) == 3  # the three adapters disagree on the shared prompt
  alone = Engine(model, None, max_batch_size=1, max_seq_len=128, eos_token_ids=(), lora=lora)
  for p, n, out in zip(prompts[:4], names[:4], outs[:4]):
    assert alone.generate([Request(prompt=p, lora=n, sampling=params)])[0].token_ids == out.token_ids
  assert model.lora is None  # the engine's bank lives in its params; the model object is left as it came


def test_speculative_decoding_with_adapters_equals_transformers(tiny):
  """Prompt lookup proposes the same way whatever a row's adapter (it reads tokens only); each row's proposals are
  verified by its own adapter: repetitive prompts under a, b and none in one batch, each equal to transformers +
  peft greedy."""
  root, ref = tiny
  model = load_model(root / "base")
  engine = Engine(model, None, max_batch_size=3, max_seq_len=128, eos_token_ids=(),
                  lora={"a": root / "a", "b": root / "b"},
                  speculative=dict(num_speculative_tokens=4, prompt_lookup_min=1))
  rng = np.random.default_rng(3)
  motif = rng.integers(0, 390, 6).tolist()
  prompts = [motif * 5, motif * 4 + [9], rng.integers(0, 390, 20).tolist() + motif * 3]
  names = ["a", "b", None]
  outs = engine.generate([Request(prompt=p, lora=n, sampling=SamplingParams(max_tokens=20))
                          for p, n in zip(prompts, names)])
  for p, n, out in zip(prompts, names, outs):
    assert out.token_ids == peft_greedy(ref, n, p, 20), n
  assert engine.stats()["spec_accepted_tokens"] > 0


def test_merged_equals_unmerged(tiny):
  root, ref = tiny
  model = load_model(root / "base")
  adapter = load_adapter(root / "a", model.cfg)
  ids = [5, 80, 13, 200, 7, 99, 4]
  model.lora = LoraBank.of(model.cfg, {"a": adapter})
  unmerged = _logits(model, [ids], [0])[0]
  model.lora = None
  merge(model, adapter)
  merged = _logits(model, [ids], None)[0]
  np.testing.assert_allclose(merged, unmerged, atol=5e-5, rtol=0)  # W + sA B rounds once more in float32
  np.testing.assert_allclose(merged, _ref_logits(ref, "a", ids), atol=1e-4, rtol=0)
  base = load_model(root / "base")
  params = SamplingParams(max_tokens=12)
  served = Engine(base, None, max_seq_len=64, eos_token_ids=(), lora={"a": adapter})
  folded = Engine(load_model(root / "base"), None, max_seq_len=64, eos_token_ids=(), lora={"a": adapter},
                  merge_lora=True)
  for prompt in ([1, 2, 3], ids):
    want = served.generate([Request(prompt=prompt, lora="a", sampling=params)])[0].token_ids
    assert folded.generate([Request(prompt=prompt, lora="a", sampling=params)])[0].token_ids == want
    assert want == peft_greedy(ref, "a", prompt, 12)


def test_saved_adapters_load_in_peft(tiny, tmp_path):
  """An adapter of ours (random A and B, rsLoRA off, three targets) saved in PEFT's layout: peft loads it onto
  the transformers model and gives our logits; loading it back gives the same arrays."""
  root, _ = tiny
  model = load_model(root / "base")
  adapter = init_adapter(model.cfg, rank=3, alpha=5.0, targets="q,o,down", seed=4)
  rng = np.random.default_rng(1)
  adapter.weights = {t: (a, rng.normal(0, 0.3, b.shape).astype(np.float32)) for t, (a, b) in adapter.weights.items()}
  save_adapter(tmp_path / "ours", adapter, base_model=str(root / "base"))
  config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
  assert config["target_modules"] == ["q_proj", "o_proj", "down_proj"] and config["r"] == 3
  base = __import__("transformers").Qwen2ForCausalLM.from_pretrained(root / "base").eval()
  theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
  ids = [9, 8, 7, 300, 12, 44]
  model.lora = LoraBank.of(model.cfg, {"ours": adapter})
  with torch.no_grad():
    want = theirs(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(_logits(model, [ids], [0])[0], want, atol=1e-4, rtol=0)
  back = load_adapter(tmp_path / "ours", model.cfg)
  for t, (a, b) in adapter.weights.items():
    np.testing.assert_array_equal(back.weights[t][0], a)
    np.testing.assert_array_equal(back.weights[t][1], b)


def test_bad_adapters_and_names_are_one_line_errors(tiny, tmp_path):
  root, _ = tiny
  model = load_model(root / "base")
  with pytest.raises(CheckpointError, match="not a directory"):
    load_adapter(tmp_path / "nope", model.cfg)
  bad = tmp_path / "dora"
  bad.mkdir()
  config = json.loads((root / "a" / "adapter_config.json").read_text())
  (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
  with pytest.raises(CheckpointError, match="use_dora=True is not supported"):
    load_adapter(bad, model.cfg)
  (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 5}))
  (bad / "adapter_model.safetensors").write_bytes((root / "a" / "adapter_model.safetensors").read_bytes())
  with pytest.raises(CheckpointError, match=r"lora_A.weight. has shape \(4, \d+\); this model and r=5 need \(5, \d+\)"):
    load_adapter(bad, model.cfg)
  (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
  with pytest.raises(CheckpointError, match="adapter_model.safetensors: not a readable safetensors file"):
    load_adapter(bad, model.cfg)
  engine = Engine(model, None, max_seq_len=64, lora={"a": root / "a"})
  with pytest.raises(InputError, match=r"LoRA adapter 'c' is not loaded in this engine \(loaded: a\)"):
    engine.generate([Request(prompt=[1, 2], lora="c")])
  with pytest.raises(InputError, match="'lora' must be the name of a LoRA adapter"):
    engine.generate([{"prompt": [1, 2], "lora": 3}])


def _corrupt_copy(source, directory, config=None, tensors=None):
  """A copy of the PEFT adapter in `source` with its config's fields updated by `config` and tensors changed by
  `tensors(dict)` (written back with safetensors, as a tool other than ours would)."""
  import safetensors.numpy

  directory.mkdir()
  values = safetensors.numpy.load_file(source / "adapter_model.safetensors")
  if tensors is not None:
    tensors(values)
  safetensors.numpy.save_file(values, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
  fields = json.loads((source / "adapter_config.json").read_text())
  # NaN and Infinity as Python's json writes them (and reads them back).
  (directory / "adapter_config.json").write_text(json.dumps({**fields, **(config or {})}))
  return directory


def _poison(value):
  def change(values):
    key = sorted(k for k in values if "layers.1.mlp.down_proj.lora_B" in k)[0]
    values[key] = values[key].copy()
    values[key][0, 1] = value
  return change


@pytest.mark.parametrize("config, tensors, message", [
    ({"lora_alpha": float("nan")}, None, r"adapter_config.json: lora_alpha must be a number, got NaN\."),
    ({"lora_alpha": float("inf")}, None, r"adapter_config.json: lora_alpha must be a number, got Infinity\."),
    ({"lora_alpha": "8"}, None, r'adapter_config.json: lora_alpha must be a number, got the string "8"\.'),
    ({"lora_dropout": float("nan")}, None, r"adapter_config.json: lora_dropout must be a number, got NaN\."),
    ({"use_rslora": "no"}, None, r'adapter_config.json: use_rslora must be a boolean, got the string "no"\.'),
    ({"r": 2 ** 40}, None, r"adapter_model.safetensors: tensor 'base_model.model.model.layers.0.mlp.down_proj"
                           r".lora_A.weight' has shape \(4, 160\); this model and r=1099511627776 need "
                           r"\(1099511627776, 160\)\."),
    ({"lora_dropout": 1.0}, None, r"adapter_config.json: lora_dropout must be a number in \[0, 1\), got 1.0\."),
    ({"r": 0}, None, r"adapter_config.json: r must be a positive integer, got 0"),
    (None, _poison(float("nan")), r"adapter_model.safetensors: tensor 'base_model.model.model.layers.1.mlp.down_proj"
                                  r".lora_B.weight' holds NaN or infinite values"),
    (None, _poison(-float("inf")), r"adapter_model.safetensors: tensor 'base_model.model.model.layers.1.mlp."
                                   r"down_proj.lora_B.weight' holds NaN or infinite values"),
])
def test_non_finite_or_oversized_adapters_are_checkpoint_errors(tiny, tmp_path, config, tensors, message):
  """Issue 21, defect 6: an adapter whose alpha is NaN or infinite, whose r does not match its tensors (2^40: no
  allocation before the shapes are checked), or whose tensors hold NaN/inf is a CheckpointError naming the file and
  the field or tensor, as a model checkpoint's is; PEFT itself would serve NaN logits."""
  root, _ = tiny
  model = load_model(root / "base")
  bad = _corrupt_copy(root / "a", tmp_path / "bad", config, tensors)
  with pytest.raises(CheckpointError, match=message) as caught:
    load_adapter(bad, model.cfg)
  assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_launch_generate_with_a_nan_adapter_is_one_error_line(tiny, tmp_path):
  """Issue 21, defect 6: `launch.generate --lora=a=<NaN adapter>` ends with one `error:` line naming the field and
  the file, exit 1, no traceback."""
  import pathlib
  import subprocess
  import sys

  root, _ = tiny
  bad = _corrupt_copy(root / "a", tmp_path / "bad", {"lora_alpha": float("nan")})
  repo = pathlib.Path(__file__).resolve().parents[2]
  proc = subprocess.run([sys.executable, "-m", "launch.generate", f"--model={root / 'base'}", "--prompt=hi",
                         f"--lora=a={bad}", "--max_new_tokens=2"], cwd=repo, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: {bad / 'adapter_config.json'}: lora_alpha must be a number, got NaN."], \
      proc.stderr[-2000:]


def test_a_paged_engine_with_adapters_compiles_nothing_after_warm_up(tiny):
  from qwenjax.engine.profiling import count_compilations

  root, _ = tiny
  engine = Engine(load_model(root / "base"), None, max_batch_size=4, max_seq_len=128, eos_token_ids=(),
                  lora={"a": root / "a", "b": root / "b"})
  engine.warm_up()
  rng = np.random.default_rng(5)
  requests = [Request(prompt=rng.integers(0, 390, int(rng.integers(3, 90))).tolist(), lora=[None, "a", "b"][i % 3],
                      sampling=SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=[0.0, 0.9][i % 2],
                                              seed=i))
              for i in range(12)]
  with count_compilations() as compiled:
    engine.generate(requests)
  assert sum(compiled.values()) == 0, compiled
