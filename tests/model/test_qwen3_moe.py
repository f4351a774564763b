"""Qwen3-MoE against transformers' Qwen3MoeForCausalLM: config reading and parameter counts, logits within 1e-4 in
float32 (prefill and decode, scanned and unrolled), greedy tokens through the paged engine, int8 experts, a
checkpoint missing an expert, the dispatch against jax.lax.ragged_dot, and compile counts after warm-up."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from qwenjax import CheckpointError, Engine, SamplingParams
from qwenjax.checkpoints.hf import load_model
from qwenjax.config import QwenConfig
from qwenjax.engine.profiling import count_compilations
from qwenjax.model import registry
from qwenjax.model.moe import MoE, dispatch, dispatch_reference

from conftest import build_tiny_qwen3_moe, check_paged_greedy, check_prefill_then_decode, fake_quantized_reference

TOL = 1e-4

CONFIGS = {
    # 8 experts, top 2, renormalised; every layer sparse; head_dim 32 != 64 / 4; GQA 2; untied.
    "top2_norm": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    # 12 experts, top 2, not renormalised; layer 0 dense (mlp_only_layers) and only every second layer sparse
    # (decoder_sparse_step 2: layer 1 sparse, layer 2 dense); tied embeddings. (Top 3 of 12 not renormalised:
    # tests/training/test_lora_trainer.py's router logits.)
    "mixed_unnormalised": dict(num_experts=12, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2,
                               mlp_only_layers=[0], num_hidden_layers=4, tie_word_embeddings=True),
}


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def tiny(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(f"qwen3_moe_{request.param}")
  return d, build_tiny_qwen3_moe(d, **CONFIGS[request.param])


def test_config_reads_the_experts_and_counts_the_parameters(tiny):
  d, hf = tiny
  raw = json.loads((d / "config.json").read_text())
  assert registry.for_hf_config(raw).name == "qwen3_moe"
  cfg = QwenConfig.from_file(d / "config.json")
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (
      hf.config.num_experts, hf.config.num_experts_per_tok, hf.config.norm_topk_prob)
  assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
  sparse = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf.model.layers]
  assert list(cfg.sparse_layers()) == sparse and any(sparse)
  model = load_model(d, scan_layers=True)  # mixed dense and sparse layers unroll
  assert model.scan_layers == all(sparse)
  if not model.scan_layers:
    assert [isinstance(b.mlp, MoE) for b in model.layers] == sparse


@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_then_decode_logits_match_transformers(tiny, scan_layers):
  """Prefill (48 token-expert rows per expert count: sorted tiles of several rows) then decode (a tile per
  assignment), each within 1e-4 of transformers' logits."""
  d, hf = tiny
  model = load_model(d, scan_layers=scan_layers)
  ids = np.random.default_rng(0).integers(0, 300, size=(2, 24))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).logits.numpy()
  check_prefill_then_decode(model, ids, ref, tol=TOL)


def test_greedy_tokens_through_the_paged_engine_match_transformers(tiny):
  d, hf = tiny
  check_paged_greedy(load_model(d), hf)


def test_a_moe_engine_compiles_nothing_after_warm_up(tmp_path):
  d = tmp_path / "moe"
  build_tiny_qwen3_moe(d, **CONFIGS["top2_norm"])
  engine = Engine(load_model(d), None, eos_token_ids=(), max_batch_size=2, max_seq_len=64, page_size=16)
  programs = engine.warm_up()
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 300, size=int(n)).tolist() for n in rng.integers(1, 50, size=6)]
  with count_compilations() as compiled:
    engine.generate(prompts, SamplingParams(max_tokens=12))
  assert programs > 0 and sum(compiled.values()) == 0, compiled


def test_int8_experts_match_a_fake_quantized_reference(tiny):
  """--quantize int8 stores the experts as int8 values with a scale per expert and output channel (the router
  stays float); logits equal transformers' with the same weights quantized and dequantized, within 1e-4."""
  d, hf = tiny
  model = load_model(d, quantize="int8", scan_layers=False)
  moe = next(b.mlp for b in model.layers if isinstance(b.mlp, MoE))
  assert moe.gate.values[...].dtype == jnp.int8 and moe.gate.scale[...].shape == (hf.config.num_experts, 32)
  assert moe.router[...].dtype == jnp.float32
  ids = np.random.default_rng(4).integers(0, 300, size=(2, 20))
  with torch.no_grad():
    ref = fake_quantized_reference(hf)(torch.as_tensor(ids)).logits.numpy()
  check_prefill_then_decode(model, ids, ref, tol=TOL)


def test_a_missing_expert_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  d = tmp_path / "moe"
  build_tiny_qwen3_moe(d, **CONFIGS["top2_norm"])
  tensors = load_file(d / "model.safetensors")
  del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
  save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight'"):
    load_model(d)


# ---- the dispatch alone, against jax.lax.ragged_dot ----

def _experts(e, d, f, seed):
  rng = np.random.default_rng(seed)
  return tuple(nnx.Param(jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32))
               for shape in ((e, d, f), (e, d, f), (e, f, d)))


@pytest.mark.parametrize("case", ["uneven", "one_token", "all_on_one_expert", "many_rows"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_dispatch_matches_ragged_dot(case, impl):
  """Uneven groups with empty experts, one token (a tile per assignment), every token on the same experts, and
  more rows than experts times the tile (several tiles per expert): within 1e-5 of the ragged_dot reference."""
  e, d, f, k = 8, 32, 48, 2
  rng = np.random.default_rng(7)
  m = {"uneven": 6, "one_token": 1, "all_on_one_expert": 10, "many_rows": 300}[case]
  x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
  if case == "all_on_one_expert":
    experts = np.tile([3, 6], (m, 1))
  elif case == "uneven":
    experts = np.array([[0, 5], [5, 0], [5, 2], [0, 5], [5, 7], [2, 5]])  # experts 1, 3, 4, 6 chosen by none
  else:
    experts = np.stack([rng.choice(e, k, replace=False) for _ in range(m)])
  weights = jnp.asarray(rng.uniform(0.1, 1, size=(m, k)), jnp.float32)
  ffn = _experts(e, d, f, 8)
  want = dispatch_reference(x, jnp.asarray(experts, jnp.int32), weights, ffn, jnp.float32)
  got = jax.jit(lambda x, ex, w: dispatch(x, ex, w, ffn, jnp.float32, impl))(x, jnp.asarray(experts, jnp.int32),
                                                                             weights)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  # And against the definition, token by token: sum_j w_j * down(silu(gate(x)) * up(x)) of expert j.
  g, u, dn = (np.asarray(p[...], np.float64) for p in ffn)
  xs = np.asarray(x, np.float64)
  for i in range(min(m, 12)):
    rows = [weights[i, j] * (((lambda a: a / (1 + np.exp(-a)))(xs[i] @ g[ex]) * (xs[i] @ u[ex])) @ dn[ex])
            for j, ex in enumerate(experts[i])]
    np.testing.assert_allclose(np.asarray(got)[i], np.sum(rows, axis=0), atol=1e-4, rtol=1e-4)


def test_a_decode_step_computes_only_the_chosen_experts():
  """At one token the dispatch runs the k chosen experts, not all E: XLA's cost analysis of the compiled step counts
  about k / E of the floating-point work of the ragged_dot reference, which XLA lowers densely."""
  e, d, f, k = 16, 32, 48, 2
  ffn = _experts(e, d, f, 9)
  args = (jnp.ones((1, d)), jnp.asarray([[4, 9]], jnp.int32), jnp.asarray([[0.6, 0.4]]))
  flops = lambda fn: jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
  ours = flops(lambda x, ex, w: dispatch(x, ex, w, ffn, jnp.float32))
  dense = flops(lambda x, ex, w: dispatch_reference(x, ex, w, ffn, jnp.float32))
  chosen = k * 3 * 2 * d * f  # k experts' three matmuls of one row
  assert chosen <= ours < 2 * chosen and dense >= e * 3 * 2 * d * f, (ours, dense, chosen)


def test_attention_lora_on_a_moe_model_matches_peft_and_mlp_targets_are_refused(tmp_path):
  """A PEFT adapter on q and v of a tiny Qwen3-MoE serves unmerged with PEFT's greedy tokens; one that adapts an
  MLP projection is one ConfigError naming it (a per-layer adapter cannot hold each expert's)."""
  import peft

  from qwenjax import ConfigError
  from qwenjax.model.lora import Adapter

  from conftest import peft_greedy, random_peft

  d = tmp_path / "moe"
  hf = build_tiny_qwen3_moe(d, **CONFIGS["top2_norm"])
  base = random_peft(hf, tmp_path / "qv", seed=1, rank=4, alpha=8, targets=["q_proj", "v_proj"])
  ref = peft.PeftModel.from_pretrained(base, tmp_path / "qv", adapter_name="qv").eval()
  engine = Engine(load_model(d), None, eos_token_ids=(), max_batch_size=2, max_seq_len=128, page_size=16,
                  lora={"qv": tmp_path / "qv"})
  ids = np.random.default_rng(6).integers(0, 300, size=11).tolist()
  out = engine.generate([{"prompt": ids, "lora": "qv"}], SamplingParams(max_tokens=16))[0]
  assert out.token_ids == peft_greedy(ref, "qv", ids, 16)
  with pytest.raises(ConfigError, match=r"mlp\.up_proj, an MLP projection of a mixture-of-experts model"):
    Adapter(4, 8.0, {"up": (np.zeros((3, 64, 4)), np.zeros((3, 4, 96)))}).check(QwenConfig.from_file(d / "config.json"))


def test_batch_generate_serves_raw_and_chat_lines_on_a_moe_checkpoint(tmp_path, qwen3_template):
  """launch.batch_generate on a tiny Qwen3-MoE with a tokenizer: a raw prompt line and a chat line with
  chat_template_kwargs get transformers' greedy tokens for the prompt transformers renders; launch.generate with
  --chat_template_kwargs gives the chat line's reply."""
  import subprocess
  import sys

  from conftest import REPO, save_tiny_tokenizer_dir

  d = save_tiny_tokenizer_dir(tmp_path / "ckpt", chat_template=qwen3_template)
  hf = build_tiny_qwen3_moe(d, vocab_size=512, **CONFIGS["mixed_unnormalised"])
  tok = transformers.AutoTokenizer.from_pretrained(d)
  messages = [{"role": "user", "content": "Hi there"}]
  lines = [{"id": "chat", "messages": messages, "chat_template_kwargs": {"enable_thinking": False},
            "sampling": {"max_tokens": 8, "ignore_eos": True}},
           {"id": "raw", "prompt": "def add(a, b):", "sampling": {"max_tokens": 8, "ignore_eos": True}}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  proc = subprocess.run([sys.executable, "-m", "launch.batch_generate", f"--model={d}",
                         f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'out.jsonl'}", "--nowarm_up",
                         "--max_seq_len=256"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
  prompts = {"chat": list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False, enable_thinking=False)),
             "raw": tok("def add(a, b):")["input_ids"]}
  for key, ids in prompts.items():
    with torch.no_grad():
      want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    assert records[key]["text"] == tok.decode(want, skip_special_tokens=True).rstrip("\ufffd"), key
    assert records[key]["usage"]["prompt_tokens"] == len(ids)
  # launch.generate: the same chat with the same variables as a flag gives the same reply.
  gen = subprocess.run([sys.executable, "-m", "launch.generate", f"--model={d}", "--prompt=Hi there", "--json",
                        "--max_new_tokens=8", "--ignore_eos", "--chat_template_kwargs={\"enable_thinking\": false}"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert gen.returncode == 0, gen.stderr[-3000:]
  record = json.loads(gen.stdout)
  assert record["text"] == records["chat"]["text"] and record["usage"]["prompt_tokens"] == len(prompts["chat"])


@pytest.mark.parametrize("q8", [False, True], ids=["f32", "q8_0"])
def test_a_qwen3moe_gguf_loads_token_exact(tmp_path, qwen_template, q8):
  """A tiny Qwen3-MoE written as llama.cpp lays out a qwen3moe GGUF (gguf.GGUFWriter: ffn_gate_inp, one
  ffn_{gate,up,down}_exps tensor per projection, expert counts in the metadata): its config is transformers', each
  expert loads from its slice of the stacked tensor, and its logits are transformers' within 1e-4 (with Q8_0:
  transformers holding the same rounded weights; loaded with --quantize int8, the Q8_0 experts go straight to
  int8) and its greedy tokens identical."""
  from qwenjax import load
  from qwenjax.checkpoints.gguf_file import GGUFCheckpoint

  from conftest import save_tiny_tokenizer_dir, write_gguf_from_hf

  d = save_tiny_tokenizer_dir(tmp_path / "ckpt")
  hf = build_tiny_qwen3_moe(d, vocab_size=512, **CONFIGS["mixed_unnormalised"])
  path = tmp_path / "tiny-qwen3moe.gguf"
  rounded = write_gguf_from_hf(path, hf, d, qwen_template, arch="qwen3moe", q8=q8)
  with GGUFCheckpoint(path) as checkpoint:
    config = checkpoint.hf_config()
    assert checkpoint.tensor_shape("model.layers.1.mlp.experts.11.down_proj.weight") == (64, 32)
    rows = checkpoint.get_int8_rows("model.layers.3.mlp.experts.2.gate_proj.weight")  # one expert's Q8_0 rows
    assert (rows is not None and rows[0].shape == (32, 64)) == q8
  ours, theirs = QwenConfig.from_hf_config(config), QwenConfig.from_file(d / "config.json")
  assert (ours.num_experts, ours.num_experts_per_tok, ours.moe_intermediate_size, ours.norm_topk_prob) == (
      theirs.num_experts, theirs.num_experts_per_tok, theirs.moe_intermediate_size, theirs.norm_topk_prob)
  with torch.no_grad():
    for name, value in rounded.items():
      hf.get_parameter(name).copy_(value)
  ids = np.random.default_rng(3).integers(0, 500, size=(1, 20))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).logits.numpy()
  # GGUF metadata has no mlp_only_layers or decoder_sparse_step: the layers without a router are the dense ones.
  assert list(ours.sparse_layers()) == list(theirs.sparse_layers()) == [False, True, False, True]
  loaded = load(str(path))
  check_prefill_then_decode(loaded.model, ids, ref, tol=TOL)
  if q8:  # Q8_0 experts straight to int8: the same numbers as quantizing the dequantized tensor
    int8 = load(str(path), quantize="int8", scan_layers=False)
    with torch.no_grad():
      ref8 = fake_quantized_reference(hf)(torch.as_tensor(ids)).logits.numpy()  # hf holds the Q8_0 weights
    check_prefill_then_decode(int8.model, ids, ref8, tol=TOL)
