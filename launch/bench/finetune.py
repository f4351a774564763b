r"""LoRA fine-tuning throughput, qwenjax against transformers + peft, on the same model, data and adapter.

  python -m launch.bench.finetune                        # the embedded 0.5B, rank 16 on all projections
  python -m launch.bench.finetune --rows=2 --row_len=256 --steps=3

Both train the same packed rows (chats of the perplexity corpus' source lines, assistant turns as targets) with
AdamW at batch --rows x --row_len tokens, float32: qwenjax through `LoraTrainer` (one jitted step, segments
attending within themselves), transformers + peft with torch autograd over the same token rows (one causal
sequence per row: the same matmul work, its attention spanning segments). After one untimed step each (qwenjax
compiles there), --steps steps are timed; printed: seconds per step and tokens/s of each, and their ratio.
"""

from __future__ import annotations

import json
import time

from absl import app, flags, logging

from launch import _cli

_MODEL = flags.DEFINE_string("model", "default", "The base model (as launch.finetune's --model).")
_ROWS = flags.DEFINE_integer("rows", 2, "Packed rows per step.", lower_bound=1)
_ROW_LEN = flags.DEFINE_integer("row_len", 256, "Tokens per row.", lower_bound=16)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per engine.", lower_bound=1)
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank (all seven projections).", lower_bound=1)


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  import qwenjax  # pylint: disable=g-import-not-at-top
  from launch.bench.perplexity import CORPUS, load_transformers  # pylint: disable=g-import-not-at-top
  from qwenjax.training import data  # pylint: disable=g-import-not-at-top
  from qwenjax.training.lora_trainer import LoraTrainer, TrainConfig  # pylint: disable=g-import-not-at-top

  loaded = qwenjax.load(_MODEL.value, dtype="float32")
  lines = CORPUS.read_text().splitlines()
  chats, i = [], 0
  while len(chats) < 4 * _ROWS.value * (_STEPS.value + 1):
    chunk = "\n".join(lines[i % len(lines):i % len(lines) + 12])
    chats.append([{"role": "user", "content": f"Continue this code:\n{chunk[:200]}"},
                  {"role": "assistant", "content": chunk[200:]}])
    i += 12
  rows, _ = data.pack([data.encode_chat(loaded.tokenizer, c) for c in chats], _ROW_LEN.value)
  steps = _STEPS.value + 1
  config = TrainConfig(rank=_RANK.value, alpha=2 * _RANK.value, steps=steps, batch_size=_ROWS.value,
                       warmup_steps=0)
  trainer = LoraTrainer(loaded.model, config)
  times = []
  for metrics in trainer.fit(rows):
    times.append(metrics["seconds"])
  tokens = _ROWS.value * _ROW_LEN.value
  ours = float(np.mean(times[1:]))

  import peft  # pylint: disable=g-import-not-at-top

  hf = load_transformers(loaded.source)
  model = peft.get_peft_model(hf, peft.LoraConfig(r=_RANK.value, lora_alpha=2 * _RANK.value,
                                                  target_modules="all-linear"))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
  theirs = []
  for s in range(steps):
    index = trainer.rows_for_step(s, len(rows))[0]
    tok = torch.from_numpy(rows.tokens[index].astype(np.int64))
    tgt = torch.from_numpy(rows.targets[index].astype(np.int64))
    w = torch.from_numpy(rows.weights[index])
    start = time.perf_counter()
    logits = model(input_ids=tok).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.clamp(min=0).flatten(), reduction="none")
    loss = (nll * w.flatten()).sum() / w.sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    theirs.append(time.perf_counter() - start)
  ref = float(np.mean(theirs[1:]))
  report = {"rows": _ROWS.value, "row_len": _ROW_LEN.value, "rank": _RANK.value,
            "qwenjax_s_per_step": ours, "qwenjax_tokens_per_s": tokens / ours,
            "transformers_peft_s_per_step": ref, "transformers_peft_tokens_per_s": tokens / ref,
            "ratio": ref / ours}
  logging.info("qwenjax %.2f s/step (%.0f tokens/s), transformers+peft %.2f s/step (%.0f tokens/s): %.2fx",
               ours, tokens / ours, ref, tokens / ref, ref / ours)
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
