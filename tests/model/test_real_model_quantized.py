"""The embedded Qwen2.5-Coder-0.5B-Instruct with int8 weights: perplexity on the shipped corpus against float32.

Lean: the first 512 tokens of tests/data/perplexity_corpus.txt in one window; the whole corpus and
the other variants are launch.bench.perplexity's table in the README (float32 5.8655, int8 5.8663, +0.013%).
"""

import pytest

import qwenjax
from launch.bench import perplexity as ppl

pytestmark = pytest.mark.real_model


def test_int8_and_w8a8_perplexity_stay_within_the_targets(real_float32):
  tokens = real_float32.tokenizer.encode(ppl.CORPUS.read_text(encoding="utf-8"))[:512]
  scores = {"float32": ppl.perplexity(real_float32, tokens, window=512)["ppl"]}
  for quantize in ("int8", "w8a8"):
    # Scanned: one scoring call per model, and a scanned model compiles one layer, not 24 (the math is the same).
    quantized = qwenjax.load("default", dtype="float32", quantize=quantize, scan_layers=True)
    assert quantized.model.quantize == quantize
    scores[quantize] = ppl.perplexity(quantized, tokens, window=512)["ppl"]
    del quantized
  assert 1 < scores["float32"] < 20, scores  # a model that reads Python, not noise
  assert abs(scores["int8"] / scores["float32"] - 1) < 0.01, scores
  assert abs(scores["w8a8"] / scores["float32"] - 1) < 0.02, scores
