"""`python -m launch.benchmark` end to end on a tiny random model and a tiny checkpoint (the batch job, the
concurrency at a long context), and the pieces its comparison rests on."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

import qwenjax
from launch.bench import adapters, concurrency, job, prefix, serve, workload
from launch.bench.report import compute_ratios

from conftest import build_tiny_qwen2, save_tiny_tokenizer_dir

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_end_to_end_report_plot_and_table(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.benchmark", "--preset=tiny", "--batch_sizes=1,2", "--prompt_tokens=16",
       "--new_tokens=8", "--compare", "--compare_with=transformers,llamacpp",
       "--quantize=none,int8", "--profile", f"--output_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())

  assert report["benchmark"]["batch_sizes"] == [1, 2]
  assert report["benchmark"]["params"] == workload.tiny_config().num_params()
  assert report["machine"]["cores"] >= 1 and report["machine"]["cpu_model"]
  assert report["versions"]["jax"] and report["versions"]["torch"] and report["versions"]["transformers"]
  used = report["device_limits"]["used"]
  assert used["peak_flops_per_s"] > 0 and used["memory_bandwidth_bytes_per_s"] > 0
  assert report["device_limits"]["h200"]["status"] == "not measured in this run"
  # llama.cpp runs a GGUF file; a random-weight preset has none, and the report says so.
  assert "gguf" in report["engines"]["llamacpp"]["skipped"]

  # The suite's recorded matmul paths ($QWENJAX_CPU_PATHS): each qwenjax engine also on XLA's default paths.
  assert set(report["engines"]) == {"qwenjax", "qwenjax-int8", "qwenjax-default-paths", "qwenjax-int8-default-paths",
                                    "transformers", "llamacpp"}
  assert "Xeon" in report["cpu_paths"]["processor"]
  assert any(line.startswith("shape") and "default" in line for line in report["cpu_paths"]["table"])
  assert any(line.startswith("w8a16: XLA:CPU configuration") for line in report["cpu_paths"]["chosen"])
  for name in ("qwenjax", "qwenjax-int8"):
    chosen_over_default = report["ratios"]["chosen_paths_over_default_paths"][name]
    assert [r["batch"] for r in chosen_over_default] == [1, 2]
    assert all(r["decode_tokens_per_s"] > 0 for r in chosen_over_default)
    # Both paths exact: the same greedy tokens.
    assert report["engines"][f"{name}-default-paths"]["runs"][0]["greedy_agreement_with_qwenjax"] == \
        report["engines"][name]["runs"][0]["greedy_agreement_with_qwenjax"]
  for name in ("qwenjax", "transformers"):
    runs = report["engines"][name]["runs"]
    assert [r["batch"] for r in runs] == [1, 2]
    for r in runs:
      for key in ("time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s", "throughput_tokens_per_s",
                  "prefill_flops_fraction", "decode_bandwidth_fraction"):
        assert r[key] > 0, (name, r["batch"], key)
      assert 0 <= r["greedy_agreement_with_qwenjax"] <= 1
  for r in report["engines"]["qwenjax"]["runs"]:
    assert r["compile_s"] >= 0 and sum(r["compilations"].values()) > 0
    assert r["compilations_after_warmup"] == 0  # the timed runs compile nothing
  assert report["engines"]["qwenjax"]["runs"][0]["greedy_agreement_with_qwenjax"] == 1

  ratios = report["ratios"]
  assert ratios["decode_batch_1"]["qwenjax_over_transformers"] > 0
  assert ratios["throughput_largest_batch"]["batch"] == 2
  assert ratios["throughput_largest_batch"]["qwenjax_over_transformers"] > 0
  assert ratios["decode_batch_1"]["qwenjax_over_llamacpp"] is None

  # --quantize=int8: one more engine over the same random weights in int8, side by side.
  q = report["engines"]["qwenjax-int8"]
  assert q["quantize"] == "int8" and [r["batch"] for r in q["runs"]] == [1, 2]
  assert all(r["compilations_after_warmup"] == 0 and r["decode_tokens_per_s"] > 0 for r in q["runs"])
  float_bytes = report["engines"]["qwenjax"]["weight_bytes"]
  assert float_bytes == 4 * workload.tiny_config().num_params()
  assert 0.25 < q["weight_bytes"] / float_bytes < 0.5  # int8 projections (+ scales); the float32 embedding
  quantized = ratios["quantized"]["qwenjax-int8"]
  assert quantized["over_float"] == pytest.approx(q["weight_bytes"] / float_bytes, rel=1e-3)
  assert quantized["over_bfloat16"] == pytest.approx(2 * quantized["over_float"], rel=1e-3)
  assert quantized["per_batch"][0]["decode_tokens_per_s_over_float"] == pytest.approx(
      q["runs"][0]["decode_tokens_per_s"] / report["engines"]["qwenjax"]["runs"][0]["decode_tokens_per_s"], rel=2e-3)
  assert "qwenjax-int8: weights" in proc.stdout

  # --profile: each engine's decode step by part; every projection found in the traced program, reading the weight
  # bytes the config says (float32, or int8 with a float32 scale per output channel; the tied float32 table as the
  # head), once per step.
  cfg = workload.tiny_config()
  d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  shapes = {"q": (d, n * h), "k": (d, k * h), "v": (d, k * h), "o": (n * h, d), "gate": (d, f), "up": (d, f),
            "down": (f, d)}
  for name, size in (("qwenjax", lambda i, o: 4 * i * o), ("qwenjax-int8", lambda i, o: i * o + 4 * o)):
    profile = report["decode_profile"][name]
    want = {part: cfg.num_layers * size(i, o) for part, (i, o) in shapes.items()}
    want["lm_head"] = 4 * cfg.vocab_size * d
    assert [b["batch"] for b in profile["batches"]] == [1, 2]
    for batch in profile["batches"]:
      parts = batch["parts"]
      # A projection is a part of its own, or joined with the one of its weight's size where XLA left a matmul
      # without its scope ("gate/up"): either way every weight is read, and counted, by the parts naming it.
      projections = {label: r for label, r in parts.items() if set(label.split("/")) <= set(want)}
      assert set(want) == {p for label in projections for p in label.split("/")}, (name, batch["batch"], parts)
      for label, r in projections.items():
        assert r["weight_mb"] * 1e6 == pytest.approx(sum(want[p] for p in label.split("/")), rel=1e-3), (name, label)
      assert {"attention", "norm", "sample"} <= set(parts)
      assert batch["steps_traced"] >= 7  # a step per generated token after the first, or more (whole blocks)
      assert sum(p["ms"] for p in parts.values()) == pytest.approx(batch["program_ms"], rel=0.01)
      assert batch["roofline_ms"] == pytest.approx(sum(want.values()) / profile["bandwidth_bytes_per_s"] * 1e3,
                                                   rel=0.01)
  assert "decode profile, qwenjax-int8:" in proc.stdout and "lm_head" in proc.stdout

  with Image.open(tmp_path / "tokens_per_s.png") as image:
    assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
  assert "qwenjax" in proc.stdout and "transformers" in proc.stdout and "skipped" in proc.stdout


def test_transformers_copy_of_random_weights_gives_the_same_logits():
  """The --preset comparison runs transformers on the same random weights; its logits match qwenjax's."""
  cfg = workload.tiny_config()
  for scan in (True, False):
    model = qwenjax.Qwen2(cfg, rngs=nnx.Rngs(3), scan_layers=scan)
    hf_model = adapters.transformers_from_qwenjax(model, "float32")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    graphdef, params = nnx.split(model)
    cache = qwenjax.KVCache.zeros(cfg, 2, 16)
    logits, _ = qwenjax.prefill(graphdef, params, cache, jnp.asarray(tokens), jnp.full((2,), 12, jnp.int32),
                                all_logits=True)
    with torch.no_grad():
      ref = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_chat_prompts_have_the_exact_length(tiny_tokenizer_dir):
  tok = qwenjax.Tokenizer.from_directory(tiny_tokenizer_dir)
  prompts = workload.chat_prompts(tok, 4, 80)
  assert [len(p) for p in prompts] == [80] * 4
  assert len({tuple(p) for p in prompts}) == 4  # different questions in each
  for p in prompts:
    text = tok.decode(p)
    assert text.startswith("<|im_start|>system\nYou are a helpful coding assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(Exception, match="too short for a chat prompt"):
    workload.chat_prompts(tok, 1, 10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = save_tiny_tokenizer_dir(tmp_path_factory.mktemp("bench_ckpt"))
  build_tiny_qwen2(d, vocab_size=640, num_key_value_heads=2)
  return d


def walls_of(section: dict) -> dict:
  return {n: e["wall_s"] for n, e in section["engines"].items() if "wall_s" in e}


@pytest.mark.slow
def test_batch_job_and_concurrency_end_to_end(checkpoint, tmp_path):
  """--job serves the mixed requests with batch_generate (float and int8 weights) and records llama.cpp as skipped
  for a checkpoint directory; --concurrency counts sequences; both land in report.json, the table and the plot."""
  memory = 0.01
  proc = subprocess.run(
      [sys.executable, "-m", "launch.benchmark", f"--model={checkpoint}", "--batch_sizes=1", "--prompt_tokens=64",
       "--new_tokens=4", "--job", "--job_requests=3", "--job_slots=2", "--concurrency", "--concurrency_seq_len=2048",
       "--concurrency_max_batch_size=4", "--concurrency_requests=3", f"--concurrency_kv_memory={memory}",
       "--quantize=none,int8", "--cpu_paths=default", f"--output_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  engines, ratios = report["engines"], report["ratios"]

  # The fixed-length job: qwenjax and qwenjax-int8, each compiling nothing once warm.
  assert set(engines) == {"qwenjax", "qwenjax-int8"}
  assert all(engines[n]["runs"][0]["compilations_after_warmup"] == 0 for n in engines)

  # The batch job: the same requests to every engine, each answered once, and the same greedy completions.
  section = report["job"]
  lines = [json.loads(line) for line in (tmp_path / "job.jsonl").read_text().splitlines()]
  assert lines == workload.job_requests(3)
  assert section["requests"] == 3 and section["slots"] == 2
  assert "gguf" in section["engines"]["llamacpp"]["skipped"]
  e = section["engines"]["qwenjax"]
  assert "failed" not in e, e
  records = job.read_results(tmp_path / "job_paged.jsonl")
  assert e["answered"] == len(records) == 3 and e["errors"] == 0
  assert e["generated_tokens"] == sum(r["usage"]["completion_tokens"] for r in records.values())
  assert 0 < e["generated_tokens"] <= section["max_tokens"]["total"] and e["wall_s"] > 0
  # Its greedy completions are transformers' on the same prompt ids (job_tokens.jsonl), to the engine's first
  # end-of-sequence token or max_tokens (the first three requests have no stop strings).
  loaded = qwenjax.load(str(checkpoint))
  eos = sorted(set(loaded.model.cfg.eos_token_ids) | set(loaded.tokenizer.eos_token_ids))
  hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
  for line in (tmp_path / "job_tokens.jsonl").read_text().splitlines():
    t = json.loads(line)
    assert not t["stop"]
    ids = t["prompt_ids"]
    with torch.no_grad():
      want = hf.generate(torch.tensor([ids]), max_new_tokens=t["max_tokens"], do_sample=False, eos_token_id=eos,
                         pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):]
    assert records[str(t["id"])]["token_ids"] == want.tolist(), t["id"]
  # --quantize=int8: one more batch_generate run with int8 weights; each run's own peak memory.
  q = section["engines"]["qwenjax-int8"]
  assert "--quantize=int8" in q["command"] and "failed" not in q, q
  assert q["answered"] == 3 and len(job.read_results(tmp_path / "job_paged_int8.jsonl")) == 3
  assert all(section["engines"][n]["peak_rss_gib"] > 0.1 for n in ("qwenjax", "qwenjax-int8"))
  assert ratios["job"]["int8_speedup_over_float"] == pytest.approx(walls_of(section)["qwenjax"] / q["wall_s"], rel=2e-3)
  assert set(section["identical_completions_with_qwenjax"]) == {"qwenjax-int8"}
  assert ratios["job"]["paged_speedup_over_llamacpp"] is None

  # Concurrency: one row per slot computed from the budget, paged measured (here every request decodes at once).
  c = report["concurrency"]
  assert c["contiguous_sequences"] == int(memory * 2**30 // c["contiguous_row_bytes"]) > 0
  assert c["paged"]["peak_sequences"] == 3 and c["paged"]["limited_by"] == "requests"
  assert c["paged"]["pool_holds_sequences_of_this_job"] >= 3
  assert ratios["concurrency"]["paged_over_contiguous"] == pytest.approx(3 / c["contiguous_sequences"], rel=2e-3)

  assert "batch job: 3 requests" in proc.stdout and "concurrency at 2048 positions" in proc.stdout
  assert "one row per slot" in proc.stdout and "qwenjax-int8" in proc.stdout
  with Image.open(tmp_path / "tokens_per_s.png") as image:
    assert image.format == "PNG" and image.size[0] > image.size[1]  # the job and concurrency panels beside


def test_job_and_concurrency_need_a_checkpoint(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.benchmark", "--preset=tiny", "--job",
                         f"--output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == ("error: --job serves chat requests with a checkpoint and its "
                                                  "tokenizer: pass --model, not --preset.")


def test_job_requests_are_deterministic_and_mixed():
  lines = workload.job_requests(64)
  assert lines == workload.job_requests(64) and workload.job_requests(8) == lines[:8]
  assert len({r["id"] for r in lines}) == 64
  max_tokens = [r["sampling"]["max_tokens"] for r in lines]
  assert all(16 <= m <= 256 for m in max_tokens) and len(set(max_tokens)) > 30
  assert [i for i, r in enumerate(lines) if "stop" in r["sampling"]] == list(range(3, 64, 4))
  assert not any(r["sampling"].get("ignore_eos") for r in lines)
  users = [r["messages"][1]["content"] for r in lines]
  assert len(set(users)) == 64 and min(map(len, users)) < 50 and max(map(len, users)) > 1200


@pytest.mark.real_model
def test_job_prompts_span_30_to_400_tokens_with_the_real_tokenizer(real_gguf_path):
  from qwenjax.checkpoints.gguf_file import GGUFCheckpoint

  tokenizer = GGUFCheckpoint(real_gguf_path).tokenizer()
  lengths = [len(tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True))
             for r in workload.job_requests(128)]
  assert min(lengths) <= 35 and 350 <= max(lengths) <= 420
  assert sum(100 <= n < 300 for n in lengths) > 50  # spread, not two clusters


def test_contiguous_row_is_one_slot_of_a_contiguous_kv_cache():
  cfg = workload.tiny_config()
  cache = qwenjax.KVCache.zeros(cfg, 1, 300 + 64)
  assert concurrency.contiguous_row_bytes(cfg, 4, 300, 64) == cache.k.nbytes + cache.v.nbytes


def test_ratios_come_from_the_figures():
  def runs(decode, job_tps):
    return {"runs": [{"batch": 1, "decode_tokens_per_s": decode, "throughput_tokens_per_s": job_tps,
                      "prefill_tokens_per_s": 100.0}]}

  engines = {"qwenjax": runs(12.0, 6.0), "transformers": runs(6.0, 3.0)}
  job_section = {"engines": {"qwenjax": {"wall_s": 50.0}, "qwenjax-int8": {"wall_s": 25.0},
                             "llamacpp": {"wall_s": 100.0}}}
  conc = {"contiguous_sequences": 5, "paged": {"peak_sequences": 128}}
  r = compute_ratios(engines, [1], job_section, conc)
  assert r["decode_batch_1"]["qwenjax_over_transformers"] == 2.0
  assert r["job"] == {"paged_speedup_over_llamacpp": 2.0, "int8_speedup_over_llamacpp": 4.0,
                      "int8_speedup_over_float": 2.0}
  assert r["concurrency"] == {"paged_over_contiguous": 128 / 5}
  # A skipped or failed engine, or a budget that holds no row of a slot, has no ratio.
  job_section["engines"]["llamacpp"] = {"skipped": "not installed"}
  job_section["engines"]["qwenjax-int8"]["failed"] = "exit status 1"
  r = compute_ratios({"qwenjax": runs(12.0, 6.0)}, [1], job_section, dict(conc, contiguous_sequences=0))
  assert r["job"] == {"paged_speedup_over_llamacpp": None}
  assert r["concurrency"]["paged_over_contiguous"] is None


def test_completions_agree_by_exact_text_and_stats_are_read_from_the_log():
  ref = {"a": {"text": "x"}, "b": {"text": "y"}, "c": {"error": "too long"}}
  assert job.identical_fraction({"a": {"text": "x"}, "b": {"text": "z"}}, ref) == 0.5
  assert job.identical_fraction({}, ref) == 0 and job.identical_fraction(ref, {}) is None
  log = "I1202 01:29:35.65 1 batch_generate.py:190] Engine stats: {\"peak_sequences\": 32, \"preemptions\": 0}\n"
  assert json.loads(job.STATS_LINE.findall(log)[-1]) == {"peak_sequences": 32, "preemptions": 0}


def test_llamacpp_is_skipped_with_the_reason(tmp_path, monkeypatch):
  assert "gguf" in job.llamacpp_unavailable(None) and "gguf" in job.llamacpp_unavailable(str(tmp_path))
  monkeypatch.setattr(job.importlib.util, "find_spec", lambda name: None)
  assert "llama-cpp-python is not installed" in job.llamacpp_unavailable(str(tmp_path / "model.gguf"))


def test_a_failed_engine_is_recorded_with_its_error_line(tmp_path):
  output, log = tmp_path / "out.jsonl", tmp_path / "run.log"
  output.write_text(json.dumps({"id": "stale", "text": "from an earlier run"}) + "\n")
  script = ("import json, sys; open(sys.argv[1], 'w').write(json.dumps({'id': 'a', 'text': 'x', 'finish_reason': "
            "'stop', 'usage': {'completion_tokens': 3}}) + '\\n'); print('error: the model ran out of memory.'); "
            "print('trailing noise'); sys.exit(1)")
  entry = job._run("engine", [sys.executable, "-c", script, str(output)], output, log, expected=2)
  assert entry["answered"] == 1 and entry["generated_tokens"] == 3  # the stale record was removed first
  assert entry["failed"].startswith("exit status 1, 1 of 2 requests answered")
  assert "error: the model ran out of memory." in entry["failed"]


@pytest.mark.real_model
def test_llamacpp_job_serves_the_prepared_tokens(real_gguf_path, tmp_path):
  """llama.cpp's side of the batch job on the embedded GGUF: the prompt tokens qwenjax made, a stop string cut."""
  pytest.importorskip("llama_cpp")
  source, tokenizer = job.model_tokenizer(str(real_gguf_path))
  requests = [dict(r, sampling={"max_tokens": 6, **({"stop": [" "]} if i else {})})
              for i, r in enumerate(workload.job_requests(2))]
  files = job.prepare(tmp_path, requests, tokenizer)
  output, log = tmp_path / "out.jsonl", tmp_path / "run.log"
  entry = job._run("llama.cpp", [sys.executable, "-m", "launch.bench.llamacpp_job", f"--model={source}",
                                 f"--input={files.tokens}", f"--output={output}", f"--n_ctx={files.max_seq_len}"],
                   output, log, expected=2)
  assert "failed" not in entry, entry
  records = job.read_results(output)
  first, second = records["job-0000"], records["job-0001"]
  assert first["usage"]["prompt_tokens"] == files.prompt_tokens[0] and first["usage"]["completion_tokens"] <= 6
  assert first["finish_reason"] in ("stop", "length") and first["text"]
  assert " " not in second["text"]  # cut at the stop string


def test_prefix_section_shares_the_header_and_changes_no_completion(checkpoint):
  """--prefix's job on a tiny checkpoint: with caching, the prefill computes about the unique prompt tokens
  (counted here as the distinct prefixes of the prompts), without it every prompt token; the same tokens."""
  loaded = qwenjax.load(str(checkpoint), dtype="float32")
  section = prefix.measure(loaded.model, loaded.tokenizer, count=6, header_tokens=300, new_tokens=3,
                           max_batch_size=4)
  prompts = [loaded.tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)
             for r in prefix.requests(loaded.tokenizer, 6, 300)]
  unique = len({tuple(p[:i]) for p in prompts for i in range(1, len(p) + 1)})
  assert section["unique_prompt_tokens"] == unique and section["prompt_tokens"] == sum(map(len, prompts))
  assert section["shared_prefix_tokens"] >= 250
  assert section["identical_completions"]
  assert section["unshared"]["computed_prompt_tokens"] == section["prompt_tokens"]
  assert section["shared"]["computed_prompt_tokens"] <= 1.1 * unique
  assert section["shared"]["cached_tokens"] + section["shared"]["computed_prompt_tokens"] == section["prompt_tokens"]


def test_serve_section_answers_every_request_as_the_batch_job_did(checkpoint):
  """--serve on a tiny checkpoint: every reply the server gave under load equals the batch job's (text, finish
  reason, usage; measure raises otherwise), and the figures are there and consistent."""
  loaded = qwenjax.load(str(checkpoint), dtype="float32")
  section = serve.measure(loaded.model, loaded.tokenizer, max_batch_size=4, load_requests=8, clients=3)
  load, batch = section["load"], section["batch_job"]
  assert load["all_valid"] and load["requests"] == batch["requests"] == 8 and load["clients"] == 3
  assert load["generated_tokens"] == batch["generated_tokens"] > 0
  assert section["sequential_vs_concurrent"]["requests"] == 8 and section["sequential_vs_concurrent"]["speedup"] > 0
  assert 0 < section["time_to_first_token_s"]["idle_median"] and section["time_to_first_token_s"]["streams_16_max"] > 0
  assert section["engine_stats"]["requests_running"] == 0
  assert "server (openai client over loopback)" in serve.format_table({"qwenjax": section})


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_a_draft_of_the_first_layers_is_transformers_model_cut_there(tmp_path, scan_layers):
  """`launch.bench.speculative.first_layers`, the benchmark's draft where no smaller checkpoint exists: the
  model's first 2 of 3 layers and its final norm and head give transformers' logits of the same checkpoint with
  its layers cut to 2 (prefill and decode, within 1e-4), and a draft engine on it keeps the target's greedy tokens."""
  from launch.bench.speculative import first_layers

  hf = build_tiny_qwen2(tmp_path)
  from qwenjax.checkpoints.hf import load_model
  model = load_model(tmp_path, scan_layers=scan_layers)
  draft = first_layers(model, 2)
  assert draft.cfg.num_layers == 2 and model.cfg.num_layers == 3
  ids = np.random.default_rng(0).integers(0, 300, size=(2, 24))
  cfg = {**hf.config.to_dict(), "num_hidden_layers": 2}
  cfg["layer_types"] = cfg["layer_types"][:2]
  cut = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
  missing, unexpected = cut.load_state_dict(hf.state_dict(), strict=False)
  assert not missing and unexpected and all(k.startswith("model.layers.2.") for k in unexpected)  # layer 2's only
  with torch.no_grad():
    ref = cut.eval()(torch.tensor(ids)).logits.numpy()
  from conftest import check_prefill_then_decode
  check_prefill_then_decode(draft, ids, ref)
  engine = qwenjax.Engine(model, None, eos_token_ids=(), max_batch_size=2, max_seq_len=128,
                          speculative=dict(method="draft", draft_model=draft, num_speculative_tokens=3))
  plain = qwenjax.Engine(model, None, eos_token_ids=(), max_batch_size=2, max_seq_len=128)
  prompts = [p.tolist() for p in ids]
  sampling = qwenjax.SamplingParams(max_tokens=16)
  assert [o.token_ids for o in engine.generate(prompts, sampling)] == [o.token_ids for o in plain.generate(prompts,
                                                                                                        sampling)]
  assert engine.stats()["spec_proposed_tokens"] > 0
  with pytest.raises(qwenjax.ConfigError, match=r"--draft_layers must be in \[1, 2\]"):
    first_layers(model, 3)
