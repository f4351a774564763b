"""The fine-tuning loss and its gradients against transformers + peft, and the packing and loss mask against
hand-derived expectations."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from qwenjax._errors import ConfigError
from qwenjax.checkpoints.hf import load_model
from qwenjax.model.decoder import StepMetadata
from qwenjax.model.lora import TARGETS
from qwenjax.training import data
from qwenjax.training.lora_trainer import LoraTrainer, TrainConfig, _value_and_grad

from conftest import build_tiny_qwen2, fake_quantized_reference, save_tiny_tokenizer_dir

CHATS = [
    [{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "hello again"}],
    [{"role": "user", "content": "count"}, {"role": "assistant", "content": "1 2 3"}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("trainer"))
  build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  from qwenjax.text.tokenizer import Tokenizer

  return d, Tokenizer.from_directory(d)


def test_the_loss_mask_covers_the_assistant_replies_and_their_end_of_turn(tiny):
  _, tok = tiny
  ids, mask = data.encode_chat(tok, CHATS[1])
  assert tok.decode(ids[mask]) == "hello<|im_end|>hello again<|im_end|>"
  assert tok.decode(ids) == tok.apply_chat_template(CHATS[1], add_generation_prompt=False)
  with pytest.raises(Exception, match="no assistant turn"):
    data.encode_chat(tok, CHATS[1][:3][:2])


def test_packing_restarts_positions_and_never_predicts_across_segments():
  examples = [(np.arange(1, 6), np.array([0, 0, 1, 1, 1], bool)), (np.arange(10, 13), np.ones(3, bool)),
              (np.arange(20, 29), np.ones(9, bool))]
  rows, cut = data.pack(examples, 8)
  assert cut == 1 and len(rows) == 2  # the 9-token example is cut to 8, alone in row 2
  np.testing.assert_array_equal(rows.tokens[0], [1, 2, 3, 4, 5, 10, 11, 12])
  np.testing.assert_array_equal(rows.positions[0], [0, 1, 2, 3, 4, 0, 1, 2])
  np.testing.assert_array_equal(rows.targets[0], [2, 3, 4, 5, -1, 11, 12, -1])
  np.testing.assert_array_equal(rows.weights[0], [0, 1, 1, 1, 0, 1, 1, 0])


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_loss_and_gradients_equal_transformers_and_peft(tiny, quantize):
  """Three chats packed into one row: qwenjax's masked mean loss and its gradients with respect to every A and B
  equal those of transformers + peft running each chat alone (random B, so that A's gradients are not zero).
  int8: a frozen int8 base (QLoRA-style), against transformers with its weights quantized and dequantized."""
  d, tok = tiny
  _check_against_peft(d, tok, transformers.Qwen2ForCausalLM, "all", quantize)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_qwen3_dense_and_moe_loss_and_gradients_equal_transformers_and_peft(tiny, family, tmp_path):
  """The same on a tiny Qwen3 dense (every projection, its q/k norms untouched) and a tiny Qwen3-MoE (attention
  projections: a MoE's adapters adapt attention only; the gradients flow through the routed experts)."""
  from conftest import build_tiny_qwen3, build_tiny_qwen3_moe

  _, tok = tiny
  d = save_tiny_tokenizer_dir(tmp_path / family)
  if family == "qwen3":
    build_tiny_qwen3(d, vocab_size=640, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    _check_against_peft(d, tok, transformers.Qwen3ForCausalLM, "all", None)
  else:
    build_tiny_qwen3_moe(d, vocab_size=640, norm_topk_prob=True)
    _check_against_peft(d, tok, transformers.Qwen3MoeForCausalLM, "q,k,v,o", None)


def _check_against_peft(d, tok, hf_class, targets, quantize, aux_coef=0.0):
  """aux_coef > 0 (a MoE): the objective also holds aux_coef times the router's load-balancing loss, which
  transformers computes over the three chats as one right-padded batch (its attention mask leaves the padding
  out), the set of tokens the packed row holds."""
  examples = [data.encode_chat(tok, chat) for chat in CHATS]
  rows, _ = data.pack(examples, 256)
  assert len(rows) == 1
  config = TrainConfig(rank=4, alpha=8, steps=1, batch_size=1, seed=3, targets=targets,
                       router_aux_loss_coef=aux_coef)
  trainer = LoraTrainer(load_model(d, quantize=quantize), config)
  rng = np.random.default_rng(0)
  adapter = trainer.like
  adapter.weights = {t: (a, rng.normal(0, 0.2, b.shape).astype(np.float32)) for t, (a, b) in adapter.weights.items()}
  trainer = LoraTrainer(load_model(d, quantize=quantize), trainer.config, adapter=adapter)
  n_target = float(rows.weights.sum())
  loss_sum, count, aux, grads = _value_and_grad(trainer.lora, trainer.graphdef, trainer.base, rows.tokens,
                                                rows.positions, rows.targets, rows.weights, None,
                                                aux_coef * n_target if aux_coef else None)
  ours = float(loss_sum) / float(count)

  hf = hf_class.from_pretrained(d).eval()
  if quantize:
    hf = fake_quantized_reference(hf)
  modules = [TARGETS[t][2].split(".")[-1] for t in adapter.weights]
  ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules))
  with torch.no_grad():
    for t, (a, b) in adapter.weights.items():
      for layer in range(a.shape[0]):
        module = ref.base_model.model.model.layers[layer].get_submodule(TARGETS[t][2])
        module.lora_A["default"].weight.copy_(torch.from_numpy(a[layer].T.copy()))
        module.lora_B["default"].weight.copy_(torch.from_numpy(b[layer].T.copy()))
  total, n = 0.0, 0
  for ids, mask in examples:
    logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
    picked = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    total = total - picked[torch.from_numpy(mask[1:])].sum()
    n += int(mask[1:].sum())
  objective = total / n
  if aux_coef:
    width = max(len(ids) for ids, _ in examples)
    padded = torch.tensor([np.pad(ids, (0, width - len(ids))) for ids, _ in examples])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples])
    out = ref(input_ids=padded, attention_mask=attention, output_router_logits=True)
    # The router logits the trainer's loss reads: each chat's tokens at its offset in the packed row.
    _, _, scores = trainer_model_router_logits(trainer, rows)  # [L', T_row, E]
    assert len(out.router_logits) == scores.shape[0]
    start = 0
    for b, (ids, _) in enumerate(examples):
      for layer, hf_layer in enumerate(out.router_logits):
        want = hf_layer.detach().reshape(len(examples), width, -1)[b, :len(ids)].numpy()
        np.testing.assert_allclose(scores[layer, start:start + len(ids)], want, atol=1e-5, rtol=0)
      start += len(ids)
    assert float(aux) == pytest.approx(float(out.aux_loss), abs=1e-6)
    objective = objective + aux_coef * out.aux_loss
  objective.backward()
  assert float(count) == n
  assert ours == pytest.approx(float(total / n), abs=1e-5)
  flat = {tuple(str(k) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(grads)}
  for t in adapter.weights:
    g_a = next(v for k, v in flat.items() if f"{t}_a" in "".join(k))[:, 0] / n  # [L, K, r]
    g_b = next(v for k, v in flat.items() if f"{t}_b" in "".join(k))[:, 0] / n
    for layer in range(g_a.shape[0]):
      module = ref.base_model.model.model.layers[layer].get_submodule(TARGETS[t][2])
      np.testing.assert_allclose(g_a[layer], module.lora_A["default"].weight.grad.numpy().T, atol=1e-5, rtol=1e-3)
      np.testing.assert_allclose(g_b[layer], module.lora_B["default"].weight.grad.numpy().T, atol=1e-5, rtol=1e-3)


def trainer_model_router_logits(trainer, rows):
  """The trainer's model (with its adapter) on packed rows [1, T]: (hidden, None, router logits [L', T, E])."""
  model = nnx.merge(trainer.graphdef, trainer.lora, trainer.base)
  meta = StepMetadata.packed_training(jnp.asarray(rows.positions), lora_index=jnp.zeros(1, jnp.int32))
  h, cache, scores = model(jnp.asarray(rows.tokens), None, meta, router_logits=True)
  return h, cache, np.asarray(scores)[:, 0]


def test_qwen3_moe_router_logits_and_load_balancing_loss_equal_transformers(tiny, tmp_path):
  """A tiny Qwen3-MoE with a dense first layer (`mlp_only_layers`, so unrolled) and router_aux_loss_coef: the
  model's router logits (every sparse layer, every token) equal transformers' `output_router_logits`, the
  load-balancing loss its `aux_loss`, and the gradients of loss + coef * aux those of transformers + peft; one
  trainer step reports that loss. A dense model with the coefficient is one ConfigError."""
  from conftest import build_tiny_qwen3_moe

  _, tok = tiny
  d = save_tiny_tokenizer_dir(tmp_path / "moe")
  build_tiny_qwen3_moe(d, vocab_size=640, norm_topk_prob=False, num_experts=12, num_experts_per_tok=3,
                       mlp_only_layers=[0])
  _check_against_peft(d, tok, transformers.Qwen3MoeForCausalLM, "q,k,v,o", None, aux_coef=0.5)

  examples = [data.encode_chat(tok, chat) for chat in CHATS]
  rows, _ = data.pack(examples, 256)
  trainer = LoraTrainer(load_model(d), TrainConfig(rank=4, steps=1, batch_size=1, targets="q,v",
                                                   router_aux_loss_coef=0.01))
  segment = data.segment_tokens(rows.positions, rows.targets)[0]  # [T]
  assert segment.sum() == sum(len(ids) for ids, _ in examples)
  scores = trainer_model_router_logits(trainer, rows)[2]  # B is zero: the base model's routing
  want = _hand_load_balancing(scores[:, segment], 3)
  metrics = trainer.train_step(rows)
  assert metrics["aux_loss"] == pytest.approx(want, rel=1e-5)
  with pytest.raises(ConfigError, match="router_aux_loss_coef=0.01: the model has no mixture-of-experts layer"):
    LoraTrainer(load_model(tiny[0]), TrainConfig(rank=4, router_aux_loss_coef=0.01))


def _hand_load_balancing(scores: np.ndarray, top_k: int) -> float:
  """Switch Transformer's loss written out in numpy: scores [L, N, E] -> E * sum_e f_e P_e, f_e the share of the
  L * N top-k choices that are e, P_e the mean softmax probability of e over the L * N rows."""
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  chosen = np.argsort(-probs, axis=-1)[..., :top_k]
  e = scores.shape[-1]
  f = np.bincount(chosen.reshape(-1), minlength=e) / (scores.shape[0] * scores.shape[1])
  return float(e * np.sum(f * probs.reshape(-1, e).mean(0)))


def test_gradient_accumulation_equals_one_larger_batch(tiny):
  """grad_accum=2 of 4 rows is the same optimizer step as 8 rows at once: the loss is the mean over every target
  token of the step, so the adapters after three steps agree to float32 rounding."""
  d, tok = tiny
  chats = [[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w * (1 + i % 3)}]
           for i, w in enumerate(["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"])]
  rows, _ = data.pack([data.encode_chat(tok, c) for c in chats], 48)
  assert len(rows) >= 8
  adapters = []
  for batch, accum in ((8, 1), (4, 2)):
    config = TrainConfig(rank=4, steps=3, batch_size=batch, grad_accum=accum, learning_rate=1e-2, warmup_steps=1)
    trainer = LoraTrainer(load_model(d), config)
    losses = [m["loss"] for m in trainer.fit(rows)]
    adapters.append((losses, trainer.adapter()))
  (l1, a1), (l2, a2) = adapters
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for t in a1.weights:
    for x, y in zip(a1.weights[t], a2.weights[t]):
      np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
  assert LoraTrainer(load_model(d), TrainConfig(batch_size=4, grad_accum=2)).rows_for_step(0, len(rows)).shape == (2, 4)


def test_bfloat16_compute_trains(tiny):
  """--dtype=bfloat16: the base in bfloat16, the adapter and AdamW's state in float32; the loss falls."""
  d, tok = tiny
  chats = [[{"role": "user", "content": "reverse abc"}, {"role": "assistant", "content": "cba"}]] * 16
  rows, _ = data.pack([data.encode_chat(tok, c) for c in chats], 64)
  import jax.numpy as jnp

  model = load_model(d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  trainer = LoraTrainer(model, TrainConfig(rank=8, steps=30, batch_size=4, learning_rate=1e-2, warmup_steps=2))
  losses = [m["loss"] for m in trainer.fit(rows)]
  assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses
  assert all(a.dtype == np.float32 for pair in trainer.adapter().weights.values() for a in pair)


# --- Resuming from a damaged checkpoint directory ------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tiny, tmp_path_factory):
  """One trainer (compiled once for every case below) run 4 steps with checkpoints at steps 2 and 4, its adapter
  after step 4, and its rows."""
  d, tok = tiny
  rows, _ = data.pack([data.encode_chat(tok, c) for c in CHATS] * 2, 32)
  trainer = LoraTrainer(load_model(d), TrainConfig(rank=2, steps=4, batch_size=2, learning_rate=1e-2,
                                                   warmup_steps=1))
  directory = tmp_path_factory.mktemp("saved") / "checkpoints"
  manager = trainer.resume(directory)
  list(trainer.fit(rows, manager=manager, save_every=2))
  manager.close()
  return trainer, rows, directory, trainer.adapter()


def _garbage(step_dir):
  for f in (step_dir / "default").rglob("d/*"):
    f.write_bytes(b"\0garbage" * 8)


def _truncate(step_dir, *names):
  for name in names:
    for f in step_dir.rglob(name):
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])


CORRUPTIONS = {
    "garbage data": lambda d: _garbage(d / "4"),
    "a truncated manifest": lambda d: _truncate(d / "4", "manifest.ocdbt"),
    "truncated metadata": lambda d: _truncate(d / "4", "_METADATA"),
    "an empty newer step directory": lambda d: (d / "6").mkdir(),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(saved_run, tmp_path, corruption, caplog):
  """The newest step unreadable: resume warns naming it, sets it aside (so that Orbax saves that step anew), resumes
  from the older intact step, and the run then ends with the adapter the undamaged run ended with, bit for bit."""
  import shutil

  trainer, rows, directory, want = saved_run
  copy = tmp_path / "checkpoints"
  shutil.copytree(directory, copy)
  CORRUPTIONS[corruption](copy)
  bad, intact = (6, 4) if corruption.startswith("an empty") else (4, 2)
  manager = trainer.resume(copy)
  assert trainer.step == intact
  assert f"checkpoint step {bad} in {copy} is unreadable" in caplog.text
  assert f"set it aside as {copy / f'{bad}.unreadable'}; trying step {intact}." in caplog.text
  assert (copy / f"{bad}.unreadable").is_dir() and not (copy / str(bad)).exists()
  list(trainer.fit(rows, manager=manager, save_every=2))
  manager.close()
  got = trainer.adapter()
  for t in want.weights:
    for x, y in zip(want.weights[t], got.weights[t]):
      np.testing.assert_array_equal(x, y)


def test_a_checkpoint_dir_that_is_a_file_is_one_error(saved_run, tmp_path):
  from qwenjax import InputError

  trainer = saved_run[0]
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(InputError, match=r"^checkpoints .*/checkpoints: exists and is not a directory\.$"):
    trainer.resume(tmp_path / "checkpoints")


# --- A batch job's requests joined with its results -------------------------------------------------------------


def _jsonl(path, lines):
  import json

  path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
  return str(path)


def _simple(i, text, finish="stop"):
  return {"id": f"r{i}", "text": text, "token_ids": [1], "finish_reason": finish, "usage": {}}


def test_results_of_the_wrong_shape_are_that_lines_error_and_the_counts_are_logged(tmp_path, caplog):
  """A result line whose "response" is not an object, or a line that is no result at all, is that line's error;
  the counts (matched, requests without a response, responses without a request, cut by max_tokens) are logged."""
  import logging

  chat = [{"role": "user", "content": "hi"}]
  requests = _jsonl(tmp_path / "req.jsonl", [{"id": f"r{i}", "messages": chat} for i in range(5)])
  results = _jsonl(tmp_path / "res.jsonl", [
      _simple(0, "hello"),
      {"id": "batch_req_1", "custom_id": "r1", "response": "oops", "error": None},
      {"id": "r2", "note": "not a result"},
      _simple(3, "cut", "length"),
      _simple(9, "orphan"),
      {"id": "batch_req_2", "custom_id": "r2x", "response": {"status_code": 200, "body": {"choices": "no"}},
       "error": None},
  ])
  caplog.set_level(logging.INFO)
  got = list(data.conversations_from_job(requests, results))
  errors = [c.error for c in got if c.error]
  assert errors == [f"{results}:2: 'response' must be an object (an OpenAI Batch output line), got a string.",
                    f"{results}:3: not a batch_generate result (no 'text', 'response' or 'error').",
                    f"{results}:6: response.body.choices must be a non-empty list of objects."]
  assert [c.messages[-1]["content"] for c in got if c.error is None] == ["hello"]
  assert ("1 matched, 3 requests without a usable response, 1 response without a request, 1 cut by max_tokens "
          "(--keep_truncated keeps those)") in caplog.text


def test_requests_and_results_that_share_no_id_are_refused_with_the_counts(tmp_path):
  from qwenjax import InputError

  chat = [{"role": "user", "content": "hi"}]
  requests = _jsonl(tmp_path / "req.jsonl", [{"id": f"q{i}", "messages": chat} for i in range(3)])
  results = _jsonl(tmp_path / "res.jsonl", [_simple(i, "x") for i in range(2)])
  with pytest.raises(InputError, match=r"^--requests=.*req.jsonl and --responses=.*res.jsonl have no usable "
                     r"conversation in common: 0 matched, 3 requests without a usable response, 2 responses without "
                     r"a request, 0 cut by max_tokens\.$"):
    list(data.conversations_from_job(requests, results))


def test_a_checkpoint_that_cannot_be_written_is_one_error(saved_run, tmp_path, monkeypatch):
  """A full disk while Orbax saves (tensorstore's error, as it raises it): one InputError naming the step."""
  from qwenjax import InputError

  trainer = saved_run[0]
  manager = trainer.resume(tmp_path / "checkpoints")

  def full(*args, **kwargs):
    raise ValueError('OUT_OF_RANGE: Error writing local file "x": File too large\nmore detail')

  monkeypatch.setattr(manager, "save", full)
  with pytest.raises(InputError, match=rf"^checkpoint step {trainer.step} in {tmp_path / 'checkpoints'}: saving "
                     r'failed \(OUT_OF_RANGE: Error writing local file "x": File too large\)\.$'):
    trainer.save(manager)
  manager.close()
