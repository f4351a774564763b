"""The fine-tuning loss and its gradients against transformers + peft, and the packing and loss mask against
hand-derived expectations."""

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from qwenjax.checkpoints.hf import load_model
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
  examples = [data.encode_chat(tok, chat) for chat in CHATS]
  rows, _ = data.pack(examples, 256)
  assert len(rows) == 1
  trainer = LoraTrainer(load_model(d, quantize=quantize), TrainConfig(rank=4, alpha=8, steps=1, batch_size=1, seed=3))
  rng = np.random.default_rng(0)
  adapter = trainer.like
  adapter.weights = {t: (a, rng.normal(0, 0.2, b.shape).astype(np.float32)) for t, (a, b) in adapter.weights.items()}
  trainer = LoraTrainer(load_model(d, quantize=quantize), trainer.config, adapter=adapter)
  loss_sum, count, grads = _value_and_grad(trainer.lora, trainer.graphdef, trainer.base, rows.tokens,
                                           rows.positions, rows.targets, rows.weights, None)
  ours = float(loss_sum) / float(count)

  hf = transformers.Qwen2ForCausalLM.from_pretrained(d).eval()
  if quantize:
    hf = fake_quantized_reference(hf)
  ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
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
  (total / n).backward()
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
