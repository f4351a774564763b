"""Speculative decoding side by side: plain decoding against n-gram prompt lookup (and a draft model), in one
process, one run.

    python -m launch.bench.speculative --batch_sizes=1,8,32 --quantize=none,w8a8 --output_dir=/tmp/spec
    python -m launch.benchmark --speculative ...            # the same, as a section of the benchmark's report

Two workloads, chat-formatted, greedy, up to --speculative_new_tokens tokens each, ending at end-of-sequence:
  code  input-grounded: a function or two of CPython's textwrap.py (the perplexity corpus) and an edit to make
        (type hints, comments, a rename, a rewrite), the whole code asked back: what prompt lookup is for;
  chat  open-ended coding questions (workload.QUESTIONS): little to look up.
At each batch size b the engine has b decode slots and serves max(b, 4) requests (the prompts cycled);
every engine is warmed up first (`Engine.warm_up`), so nothing compiles in the timed run. Per engine and batch:
generated tokens, seconds, tokens/s, and for the speculative engine the acceptance (`Engine.stats`: proposed,
accepted, mean accepted length, verify calls) and whether every output equals plain decoding's. llama.cpp
(llama-cpp-python, installed apart) serves the first 4 code prompts one at a time on the same GGUF, greedy, the
same number of tokens each: the single stream the ratios are taken against. --draft_layers=N adds a draft
engine whose draft is the model's own first N layers (`first_layers`; the embedded model is its family's
smallest, so no smaller checkpoint can draft it here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys
import time

from absl import app, flags, logging

from launch.bench import perplexity, workload

EDITS = (
    "Add type hints to every parameter and return value of this code. Reply with the complete code only.",
    "Add a short comment above every loop and every branch of this code saying what it does. Reply with the "
    "complete code only.",
    "Rename the parameter `text` to `source` everywhere in this code (and `chunks` to `pieces`). Reply with the "
    "complete code only.",
    "Rewrite this code as standalone functions that take the wrapper's settings as keyword arguments instead of "
    "self. Reply with the complete code only.",
)
KINDS = ("code", "chat")
REQUESTS = 4  # requests served at batch sizes below it (one at a time at batch 1)


def code_snippets() -> list[str]:
  """Pieces of textwrap.py: its methods and functions, dedented, grouped in order into pieces of 25+ lines."""
  lines = perplexity.CORPUS.read_text().splitlines()
  starts = [i for i, line in enumerate(lines) if re.match(r"(    )?def ", line)]
  functions = []
  for a, b in zip(starts, starts[1:] + [len(lines)]):
    body = lines[a:b]
    while body and not body[-1].strip():
      body.pop()
    indent = len(body[0]) - len(body[0].lstrip())
    functions.append("\n".join(line[indent:] for line in body))
  pieces, current = [], []
  for f in functions:
    current.append(f)
    if sum(p.count("\n") + 1 for p in current) >= 25:
      pieces.append("\n\n".join(current))
      current = []
  if current:
    pieces.append("\n\n".join(current))
  return pieces


def requests(kind: str) -> list[dict]:
  """The workload's chat requests: every code piece with an edit (cycled), or the open-ended questions."""
  if kind == "code":
    return [{"messages": [{"role": "user", "content": f"{EDITS[i % len(EDITS)]}\n\n```python\n{code}\n```"}]}
            for i, code in enumerate(code_snippets())]
  return [{"messages": [{"role": "system", "content": workload.SYSTEM_MESSAGE},
                        {"role": "user", "content": q}]} for q in workload.QUESTIONS[:8]]


def _serve(engine, prompts: list[list[int]], new_tokens: int) -> dict:
  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.profiling import count_compilations  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.speculative import with_mean_length  # pylint: disable=g-import-not-at-top

  before = engine.stats()
  with count_compilations() as compiled:
    start = time.perf_counter()
    outs = engine.generate(prompts, qwenjax.SamplingParams(max_tokens=new_tokens))
    seconds = time.perf_counter() - start
  after = engine.stats()
  tokens = sum(len(o.token_ids) for o in outs)
  run = {"requests": len(prompts), "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
         "compilations": sum(compiled.values()), "_tokens": [o.token_ids for o in outs]}
  if engine.proposer is not None:
    spec = with_mean_length({k: after[k] - before[k] for k in ("spec_proposed_tokens", "spec_accepted_tokens",
                                                               "spec_verify_rows", "verify_calls", "decode_calls")})
    spec["acceptance_rate"] = spec["spec_accepted_tokens"] / max(spec["spec_proposed_tokens"], 1)
    run["speculation"] = spec
  return run


def measure(models: dict, tokenizer, *, batch_sizes: list[int], new_tokens: int, num_speculative_tokens: int,
            source: str | None, disable_batch_size: int | None = None, max_seq_len: int = 2048,
            draft_layers: int = 0) -> dict:
  """The section: for each model (name -> qwenjax model) and batch size, plain and n-gram engines on both
  workloads (and a draft engine, with draft_layers: the model's own first draft_layers layers as its draft,
  `first_layers`); then llama.cpp's single stream on the code prompts (when `source` is a GGUF it can read).
  disable_batch_size: the speculative engines' (`SpeculativeConfig`; None: its default; 0 speculates at every
  batch size, which measures the break-even)."""
  import qwenjax  # pylint: disable=g-import-not-at-top
  from qwenjax.engine.speculative import SpeculativeConfig  # pylint: disable=g-import-not-at-top

  prompts = {kind: [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)
                    for r in requests(kind)] for kind in KINDS}
  spec = SpeculativeConfig(num_speculative_tokens=num_speculative_tokens)
  if disable_batch_size is not None:
    spec = dataclasses.replace(spec, disable_batch_size=disable_batch_size)
  section = {"workloads": {k: {"requests": len(p), "prompt_tokens": [len(x) for x in p]} for k, p in prompts.items()},
             "new_tokens": new_tokens, "config": dataclasses.asdict(spec), "engines": {}}
  section["draft_layers"] = draft_layers
  for name, model in models.items():
    runs = []
    specs = {"plain": None, "ngram": spec}
    if draft_layers:
      specs["draft"] = dataclasses.replace(spec, method="draft", draft_model=first_layers(model, draft_layers))
    for b in batch_sizes:
      engines = {method: qwenjax.Engine(model, tokenizer, max_batch_size=b, max_seq_len=max_seq_len,
                                        prefix_caching=False, speculative=s) for method, s in specs.items()}
      for engine in engines.values():
        engine.warm_up(sampling=[qwenjax.SamplingParams()])
      for kind in KINDS:
        batch = [prompts[kind][i % len(prompts[kind])] for i in range(max(b, REQUESTS))]
        result = {"batch_size": b, "workload": kind}
        for method, engine in engines.items():
          logging.info("Speculative section: %s, batch %d, %s, %s.", name, b, kind, method)
          result[method] = _serve(engine, batch, new_tokens)
        plain = result["plain"].pop("_tokens")
        for method in specs:
          if method == "plain":
            continue
          tokens = result[method].pop("_tokens")
          prefix = "" if method == "ngram" else "draft_"
          result[prefix + "identical_outputs"] = plain == tokens
          result[prefix + "identical_requests"] = sum(a == b for a, b in zip(plain, tokens))
          # Where outputs part (rounding: see the README), the token index they part at.
          result[prefix + "first_difference"] = [
              next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(plain, tokens) if a != b]
          result[prefix + "speedup"] = result[method]["tokens_per_s"] / result["plain"]["tokens_per_s"]
        runs.append(result)
      del engines
    section["engines"][name] = runs
  section["llamacpp"] = _llamacpp(source, prompts["code"][:REQUESTS], new_tokens)
  single = section["llamacpp"].get("tokens_per_s")
  if single:
    for runs in section["engines"].values():
      for r in runs:
        for method in ("plain", "ngram", "draft"):
          if method in r:
            r[method]["vs_llamacpp_single_stream"] = r[method]["tokens_per_s"] / single
  return section


def _llamacpp(source: str | None, prompts: list[list[int]], new_tokens: int) -> dict:
  """llama.cpp, one code prompt after another, greedy, new_tokens each (it does not stop at end-of-sequence)."""
  if source is None or pathlib.Path(source).suffix != ".gguf":
    return {"skipped": "needs a .gguf model (llama.cpp runs the GGUF file itself)"}
  try:
    import llama_cpp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {"skipped": f"llama-cpp-python is not installed ({e})"}
  from launch.bench.adapters import llamacpp_generate_fn  # pylint: disable=g-import-not-at-top

  threads = len(os.sched_getaffinity(0))
  llm = llama_cpp.Llama(model_path=source, n_ctx=max(len(p) for p in prompts) + new_tokens + 8, n_batch=512,
                        n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, seed=0, verbose=False)
  generate = llamacpp_generate_fn(llm)
  generate([p[:16] for p in prompts[:1]], 2)  # warm-up
  start = time.perf_counter()
  outs, _ = generate(prompts, new_tokens)
  seconds = time.perf_counter() - start
  llm.close()
  tokens = sum(len(o) for o in outs)
  return {"requests": len(prompts), "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
          "threads": threads, "note": "single stream, prefill included, the GGUF's own quantized weights"}


def format_table(section: dict) -> str:
  """The section as markdown tables: per engine, batch and workload, plain and n-gram tokens/s, speed-up,
  acceptance, identical outputs and the ratio to llama.cpp's single stream; the same for the draft engine."""
  single = section.get("llamacpp", {}).get("tokens_per_s")
  lines = _method_table(section, "ngram", "", single)
  if any("draft" in r for runs in section["engines"].values() for r in runs):
    lines += ["", f"Draft: the model's own first {section['draft_layers']} layers.", "",
              *_method_table(section, "draft", "draft_", single)]
  if single:
    lines.append(f"\nllama.cpp single stream (code prompts): {single:.2f} tok/s")
  return "\n".join(lines)


def _method_table(section: dict, method: str, prefix: str, single: float | None) -> list[str]:
  """The markdown lines of one speculative method's runs against plain decoding (result keys under `prefix`)."""
  lines = [f"| engine | batch | workload | plain tok/s | {method} tok/s | speed-up | accepted / proposed | mean "
           f"accepted length | identical | {method} vs llama.cpp |", "|" + " --- |" * 10]
  for name, runs in section["engines"].items():
    for r in runs:
      if method not in r:
        continue
      s = r[method].get("speculation", {})
      vs = f"{r[method]['tokens_per_s'] / single:.2f}x" if single else "-"
      lines.append(f"| {name} | {r['batch_size']} | {r['workload']} | {r['plain']['tokens_per_s']:.2f} | "
                   f"{r[method]['tokens_per_s']:.2f} | {r[prefix + 'speedup']:.2f}x | "
                   f"{s.get('spec_accepted_tokens', 0)} / {s.get('spec_proposed_tokens', 0)} | "
                   f"{s.get('spec_mean_accepted_length', 0):.2f} | "
                   f"{'yes' if r[prefix + 'identical_outputs'] else 'NO'} | {vs} |")
  return lines


def first_layers(model, n: int):
  """A draft made of the target's own first n layers, then its final norm and head (weights shared, not copied):
  a smaller model with the target's tokenizer where no smaller checkpoint of its family is at hand (the
  embedded 0.5B is Qwen2.5's smallest), as layer-skipping self-speculation drafts. Its proposals are what the
  target's early layers predict, untrained for that: a floor on what a real draft would be kept."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from qwenjax import ConfigError  # pylint: disable=g-import-not-at-top
  from qwenjax.model.decoder import Qwen2  # pylint: disable=g-import-not-at-top

  cfg = model.cfg
  if not 0 < n < cfg.num_layers:
    raise ConfigError(f"--draft_layers must be in [1, {cfg.num_layers - 1}] for a model of {cfg.num_layers} "
                      f"layers, got {n}.")
  cfg = dataclasses.replace(cfg, num_layers=n, layer_types=None if cfg.layer_types is None else cfg.layer_types[:n],
                            mlp_only_layers=tuple(i for i in cfg.mlp_only_layers if i < n))
  draft = nnx.eval_shape(lambda: Qwen2(cfg, dtype=model.dtype, scan_layers=model.scan_layers,
                                       quantize=model.quantize, quantize_embeddings=model.quantize_embeddings,
                                       rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  if model.scan_layers:  # stacked [L, ...]: the first n
    state["layers"] = nnx.map_state(lambda _, x: x[:n], state["layers"])
  else:
    state["layers"] = nnx.State({i: state["layers"][i] for i in range(n)})
  nnx.update(draft, state)
  return draft


def load_models(model: str, quantize: list[str], embeddings: bool) -> tuple[dict, object, str]:
  """{mode name: qwenjax model} for each weight mode, the tokenizer and the source path."""
  import qwenjax  # pylint: disable=g-import-not-at-top

  models, tokenizer, source = {}, None, None
  for q in dict.fromkeys(quantize):
    loaded = qwenjax.load(model, quantize=None if q == "none" else q, quantize_embeddings=embeddings and q != "none")
    models["qwenjax" + ("" if q == "none" else f"-{q}")] = loaded.model
    tokenizer, source = loaded.tokenizer, loaded.source
  return models, tokenizer, source


def main() -> None:
  """`python -m launch.bench.speculative`: the section alone (its flags are defined here, not at import, since
  launch.benchmark imports this module beside flags of its own)."""
  model = flags.DEFINE_string("model", "default", "The model (see launch.generate).")
  batch_sizes = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Decode slots to measure.")
  quantize = flags.DEFINE_list("quantize", ["none"], "Weight modes: none, int8 (w8a16), w8a8.")
  embeddings = flags.DEFINE_bool("quantize_embeddings", False, "The quantized modes' embedding and head in int8 "
                                 "too.")
  new_tokens = flags.DEFINE_integer("speculative_new_tokens", 256, "Most tokens generated per request.",
                                    lower_bound=1)
  k = flags.DEFINE_integer("speculative_k", 4, "num_speculative_tokens of the n-gram engine.", lower_bound=1)
  disable = flags.DEFINE_integer("speculative_disable_batch_size", None, "The n-gram engine's disable_batch_size "
                                 "(default: SpeculativeConfig's; 0: speculate at every batch size).", lower_bound=0)
  output_dir = flags.DEFINE_string("output_dir", None, "Where speculative.json goes (default: printed only).")
  draft_layers = flags.DEFINE_integer("draft_layers", 0, "Also a draft engine whose draft is the model's own first "
                                      "this many layers (0: none).", lower_bound=0)

  def run(argv):
    del argv
    from launch import _cli  # pylint: disable=g-import-not-at-top
    from qwenjax.kernels import cpu_paths  # pylint: disable=g-import-not-at-top

    # Every mode's matmul paths; float32's XLA flags. A record named by $QWENJAX_CPU_PATHS, else this processor's.
    _cli.use_cpu_paths(os.environ.get(_cli.CPU_PATHS_ENV, "auto"), cpu_paths.float_mode("float32"))
    models, tokenizer, source = load_models(model.value, quantize.value, embeddings.value)
    section = measure(models, tokenizer, batch_sizes=sorted({int(b) for b in batch_sizes.value}),
                      new_tokens=new_tokens.value, num_speculative_tokens=k.value, source=source,
                      disable_batch_size=disable.value, draft_layers=draft_layers.value)
    if output_dir.value:
      out = pathlib.Path(output_dir.value)
      out.mkdir(parents=True, exist_ok=True)
      (out / "speculative.json").write_text(json.dumps(section, indent=2) + "\n")
    print(format_table(section))
    sys.stdout.flush()

  app.run(run)


if __name__ == "__main__":
  main()
