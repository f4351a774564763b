"""Qwen2.5-VL against transformers: config parsing, presets, 3D positions, and full multimodal logits and tokens."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

from qwenjax import ConfigError, InputError
from qwenjax.checkpoints.hf import load_model
from qwenjax.model.qwen2_vl import VL_PRESETS, Qwen2VL, QwenVLConfig
from qwenjax.multimodal.positions import mrope_positions, vl_prompt
from qwenjax.multimodal.processing import VisualInput

from conftest import (  # noqa: F401
  END,
  IMAGE,
  PROCESSOR,
  START,
  VIDEO,
  VL_TEMPLATE,
  VOCAB,
  build_tiny_vl,
  hf_vl_chat_greedy,
  save_png,
)


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_vl")
  return d, build_tiny_vl(d)


def _visual(rng, grid, video_seconds=None):
  t, h, w = grid
  return VisualInput(rng.standard_normal((t * h * w, 1176)).astype(np.float32), grid, video_seconds,
                     "image" if video_seconds is None else "video")


def _hf_inputs(prompt, visuals):
  """transformers' inputs for a prompt: ids, mm_token_type_ids (without them it silently uses 1D positions),
  pixel values and grids of images and videos."""
  ids = torch.tensor([prompt.ids])
  kinds = torch.zeros_like(ids)
  kinds[ids == IMAGE], kinds[ids == VIDEO] = 1, 2
  out = {"input_ids": ids, "mm_token_type_ids": kinds}
  images = [v for v in visuals if v.kind == "image"]
  videos = [v for v in visuals if v.kind == "video"]
  if images:
    out["pixel_values"] = torch.from_numpy(np.concatenate([v.patches for v in images]))
    out["image_grid_thw"] = torch.tensor([v.grid_thw for v in images])
  if videos:
    out["pixel_values_videos"] = torch.from_numpy(np.concatenate([v.patches for v in videos]))
    out["video_grid_thw"] = torch.tensor([v.grid_thw for v in videos])
    out["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in videos])
  return out


def test_released_config_flat_and_nested(tiny_vl):
  released = {  # Qwen2.5-VL-7B-Instruct's config.json as Qwen ships it (flat)
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "bos_token_id": 151643, "eos_token_id": 151645,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
      "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
      "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
      "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
      "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
      "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152064,
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                        "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
  cfg = QwenVLConfig.from_hf_config(released)
  preset = VL_PRESETS["qwen2.5-vl-7b"]
  # Fields that do not shape the model (eos ids, max_window_layers without sliding windows) may differ.
  assert cfg.text == dataclasses.replace(preset.text, eos_token_ids=(151645,), max_window_layers=28)
  assert dataclasses.replace(cfg, text=preset.text) == preset
  # transformers 5's nested form, as save_pretrained wrote it for the tiny model.
  saved = json.loads((tiny_vl[0] / "config.json").read_text())
  assert "text_config" in saved
  tiny = QwenVLConfig.from_hf_config(saved)
  assert tiny.text.mrope_section == (2, 3, 3) and tiny.text.num_layers == 2 and tiny.vision.depth == 3
  assert (tiny.image_token_id, tiny.video_token_id, tiny.tokens_per_second) == (IMAGE, VIDEO, 2.0)
  with pytest.raises(ConfigError, match="mrope_section"):
    QwenVLConfig.from_hf_config(dict(released, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 20]}))
  with pytest.raises(ConfigError, match="vision_config"):
    QwenVLConfig.from_hf_config({k: v for k, v in released.items() if k != "vision_config"})


# Published sizes (model cards): 3.75B, 8.29B, 33.5B, 73.4B parameters.
@pytest.mark.parametrize("name,published", [("qwen2.5-vl-3b", 3.75e9), ("qwen2.5-vl-7b", 8.29e9),
                                            ("qwen2.5-vl-32b", 33.5e9), ("qwen2.5-vl-72b", 73.4e9)])
def test_preset_param_counts(name, published):
  from flax import nnx

  cfg = VL_PRESETS[name]
  abstract = nnx.eval_shape(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(0)))
  counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert counted == cfg.num_params()
  assert abs(counted - published) / published < 0.002, (name, counted)


def test_positions_match_transformers_for_images(tiny_vl):
  """For images (and text), transformers' get_rope_index follows Qwen's definition: compare with it."""
  rng = np.random.default_rng(0)
  cfg = tiny_vl[1].config
  ours_cfg = QwenVLConfig.from_hf_config(json.loads((tiny_vl[0] / "config.json").read_text()))
  visuals = [_visual(rng, (1, 4, 6)), _visual(rng, (1, 8, 2))]
  prompt = vl_prompt([5, 6, START, IMAGE, END, 7, START, IMAGE, END, 8, 9], visuals, ours_cfg)
  inputs = _hf_inputs(prompt, visuals)
  hf_pos, hf_delta = tiny_vl[1].model.get_rope_index(
      inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
  del cfg
  np.testing.assert_array_equal(prompt.positions, hf_pos[:, 0].numpy())
  assert prompt.rope_offset == int(hf_delta[0, 0])


def test_video_positions_follow_qwen_by_hand():
  """A video of 3 temporal patches at 0.5 s each and tokens_per_second 2: t = 0, 1, 2; a long video then text.

  Derived by hand from Qwen's definition: text 0..1; vision_start 2; video at S = 3: t = 3 + floor(k * 0.5 * 2),
  h = 3 + row, w = 3 + col over a 1 x 2 merged grid; text after the video continues at max + 1."""
  cfg = VL_PRESETS["qwen2.5-vl-7b"]
  v = VisualInput(np.zeros((3 * 2 * 4, 1176), np.float32), (3, 2, 4), 0.5, "video")
  ids = [1, 2, cfg.vision_start_token_id] + [cfg.video_token_id] * 6 + [cfg.vision_end_token_id, 4]
  positions, offset, starts = mrope_positions(ids, [v], cfg)
  t = [3, 3, 4, 4, 5, 5]
  h = [3, 3, 3, 3, 3, 3]
  w = [3, 4, 3, 4, 3, 4]
  expected = np.array([[0, 1, 2] + t + [6, 7], [0, 1, 2] + h + [6, 7], [0, 1, 2] + w + [6, 7]])
  np.testing.assert_array_equal(positions, expected)
  assert offset == 8 - len(ids) and starts == [3]
  # fps 4 (second_per_grid_t 0.5) versus 1 fps (2.0): time stretches; 4.55's int cast would have collapsed it.
  slow = VisualInput(v.patches, v.grid_thw, 2.0, "video")
  positions, _, _ = mrope_positions(ids, [slow], cfg)
  np.testing.assert_array_equal(positions[0, 3:9], [3, 3, 7, 7, 11, 11])
  assert positions[0, 9] == 12  # text after: max over the axes + 1, not S + max(h, w)


def test_pad_count_errors():
  cfg = VL_PRESETS["qwen2.5-vl-7b"]
  img = VisualInput(np.zeros((16, 1176), np.float32), (1, 4, 4), None, "image")
  with pytest.raises(InputError, match="2 images and videos were given"):
    vl_prompt([1, cfg.image_token_id, 2], [img, img], cfg)
  with pytest.raises(InputError, match="more image/video placeholders"):
    vl_prompt([cfg.image_token_id, cfg.image_token_id], [img], cfg)
  with pytest.raises(InputError, match="does not match"):
    vl_prompt([cfg.video_token_id], [img], cfg)


def _run_prefill(model, prompt):
  """Our prefill of one multimodal prompt: vision features at the pads, 3D positions; logits [T, V]."""
  from flax import nnx

  from qwenjax import KVCache, prefill

  features = model.visual.encode_images([(v.patches, v.grid_thw) for v in prompt.visuals])
  index = np.full((1, len(prompt.ids)), -1, np.int32)
  offset = 0
  for start, f in zip(prompt.starts, features):
    index[0, start:start + len(f)] = np.arange(offset, offset + len(f))
    offset += len(f)
  graphdef, params = nnx.split(model)
  cache = KVCache.zeros(model.cfg, 1, 128)
  logits, cache = prefill(graphdef, params, cache, np.asarray([prompt.ids], np.int32),
                          np.array([len(prompt.ids)], np.int32), all_logits=True,
                          rope_positions=prompt.positions[:, None],
                          rope_offset=np.array([prompt.rope_offset], np.int32),
                          embeds=(np.concatenate(features), index))
  return np.asarray(logits[0]), cache, graphdef, params


@pytest.mark.parametrize("scan", [False, True])
def test_multimodal_logits_and_greedy_match_transformers(tiny_vl, scan):
  from qwenjax import decode_step

  d, hf = tiny_vl
  model = load_model(d, scan_layers=scan)
  assert isinstance(model, Qwen2VL)
  rng = np.random.default_rng(1)
  visuals = [_visual(rng, (1, 6, 4)), _visual(rng, (2, 4, 4), 1.0), _visual(rng, (1, 2, 8))]
  ids = [10, 11, START, IMAGE, END, 12, START, VIDEO, END, 13, START, IMAGE, END, 14, 15]
  prompt = vl_prompt(ids, visuals, model.vl_cfg)
  logits, cache, graphdef, params = _run_prefill(model, prompt)
  inputs = _hf_inputs(prompt, visuals)
  # The video's temporal extent (t = 0, 2) stays within max(h', w') = 2 here, so transformers' positions agree
  # with Qwen's; pass ours explicitly anyway, so the comparison checks the model, not the bookkeeping.
  position_ids = torch.from_numpy(prompt.positions.astype(np.int64))[:, None]
  with torch.no_grad():
    ref = hf(**inputs, position_ids=position_ids).logits[0].numpy()
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)

  # Greedy decode: ours continues at cache position + rope_offset; transformers' generate tracks rope deltas.
  n = 12
  with torch.no_grad():
    out = hf.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
  expected = out[0, len(prompt.ids):].tolist()
  tokens = [int(np.argmax(logits[-1]))]
  for _ in range(n - 1):
    step_logits, cache = decode_step(graphdef, params, cache, np.array([tokens[-1]], np.int32))
    tokens.append(int(np.argmax(np.asarray(step_logits[0]))))
  assert tokens == expected


def test_int8_vision_tower_and_decoder_match_a_fake_quantized_reference(tiny_vl):
  """quantize="int8" quantizes the tower's Linears (patch embedding, qkv, proj, MLP, merger) and the decoder's:
  logits of an image prompt within 1e-5 of transformers with those weights quantized and dequantized by numpy."""
  from qwenjax.model.layers import QuantizedWeight  # noqa: PLC0415

  from conftest import fake_quantized_reference  # noqa: PLC0415

  d, hf = tiny_vl
  model = load_model(d, scan_layers=False, quantize="int8")
  tower = model.visual
  assert all(isinstance(w, QuantizedWeight) for w in (tower.patch_embed, tower.layers[0].attn.qkv_kernel,
                                                      tower.layers[0].mlp.down, tower.merger.fc2))
  rng = np.random.default_rng(3)
  visuals = [_visual(rng, (1, 6, 4))]
  prompt = vl_prompt([10, 11, START, IMAGE, END, 12, 13], visuals, model.vl_cfg)
  logits = _run_prefill(model, prompt)[0]
  position_ids = torch.from_numpy(prompt.positions.astype(np.int64))[:, None]
  with torch.no_grad():
    ref = fake_quantized_reference(hf)(**_hf_inputs(prompt, visuals), position_ids=position_ids).logits[0].numpy()
    floats = hf(**_hf_inputs(prompt, visuals), position_ids=position_ids).logits[0].numpy()
  np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)
  assert np.abs(floats - ref).max() > 1e-4  # the comparison is with the quantized model, not the float one


# --- The engine: chat requests with images, mixed with text, through continuous batching -----------------------

@pytest.mark.parametrize("impl,speculative", [("xla", None), ("pallas", None), ("xla", "ngram")])
def test_engine_images_in_chat_match_transformers(tiny_vl_chat, tmp_path, impl, speculative):
  """Images of different sizes from a path, a data: URL and PIL, mixed with a text request, two slots, prompts
  longer than the largest prefill chunk (chunked prefill across image tokens), through the paged cache with the
  XLA references and with the Pallas kernels (interpret mode: ragged paged attention, segment attention); and with
  prompt lookup speculation (verified past the image tokens at M-RoPE's text positions)."""
  import base64

  from PIL import Image

  from qwenjax import Engine, SamplingParams

  d, hf = tiny_vl_chat
  a = save_png(tmp_path / "a.png", 60, 90, 0)
  b = save_png(tmp_path / "b.png", 120, 50, 1)
  data_url = "data:image/png;base64," + base64.b64encode(b.read_bytes()).decode()
  chats = [
      ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(a)}},
                                     {"type": "text", "text": "Describe this."}]}], [a]),
      ([{"role": "user", "content": "Just text, no picture."}], []),
      ([{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                     {"type": "image_url", "image_url": {"url": data_url}},
                                     {"type": "image", "image": Image.open(a)}]}], [b, a]),
  ]
  spec = dict(method=speculative, prompt_lookup_min=1) if speculative else None
  engine = Engine.load(str(d), max_batch_size=2, max_seq_len=256, max_prefill_chunk=16, page_size=16,
                       attention_impl=impl, media_root=tmp_path, speculative=spec)
  n = 16 if speculative else 10
  outs = engine.generate([{"messages": m} for m, _ in chats], SamplingParams(max_tokens=n, ignore_eos=True))
  for (messages, paths), out in zip(chats, outs):
    hf_messages = [dict(m, content=[{"type": "image"} if p.get("type") != "text" else p for p in m["content"]])
                   if isinstance(m["content"], list) else m for m in messages]
    prompt_len, expected = hf_vl_chat_greedy(d, hf, hf_messages, [Image.open(p) for p in paths], n)
    assert out.usage["prompt_tokens"] == prompt_len
    assert out.token_ids == expected
  if speculative:
    assert engine.stats()["spec_proposed_tokens"] > 0


def test_engine_rejects_broken_images_per_request(tiny_vl_chat, tmp_path_factory):
  from qwenjax import Engine

  d, _ = tiny_vl_chat
  media = tmp_path_factory.mktemp("m")  # a short path: errors cut paths over 80 characters, and xdist adds a folder
  broken = media / "broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  engine = Engine.load(str(d), max_batch_size=1, max_seq_len=128, media_root=media)
  image_part = {"type": "image_url", "image_url": {"url": str(broken)}}
  with pytest.raises(InputError, match="broken.png"):
    engine.prepare({"messages": [{"role": "user", "content": [image_part]}]})
  with pytest.raises(InputError, match="no images or videos were given"):
    engine.prepare({"prompt": "<|vision_start|><|image_pad|><|vision_end|>"})
  with pytest.raises(InputError, match="unsupported content part"):
    engine.prepare({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}]})


def test_launch_generate_and_batch_jsonl_with_images(tiny_vl_chat, tmp_path, tmp_path_factory):
  """`launch.generate --image` and a batch JSONL job with image parts, against transformers; a broken image
  becomes that line's error record while every other line is answered."""
  import pathlib
  import subprocess
  import sys

  from PIL import Image

  repo = pathlib.Path(__file__).resolve().parents[2]
  d, hf = tiny_vl_chat
  a = save_png(tmp_path / "a.png", 70, 70, 4)
  b = save_png(tmp_path / "b.png", 40, 130, 5)
  broken = tmp_path_factory.mktemp("m") / "broken.jpg"  # short enough for the error to name it in full
  broken.write_text("not an image")
  n = 8
  proc = subprocess.run([sys.executable, "-m", "launch.generate", f"--model={d}", f"--image={a}",
                         "--prompt=What is this?", f"--max_new_tokens={n}", "--ignore_eos", "--json"],
                        cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  image_then_text = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
  assert json.loads(proc.stdout)["token_ids"] == hf_vl_chat_greedy(d, hf, image_then_text, [Image.open(a)], n)[1]

  def line(key, image):
    return {"id": key, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(image)}}, {"type": "text", "text": "What is this?"}]}]}

  lines = [line("a", a), line("bad", broken), line("b", b), {"id": "text", "prompt": "plain text"}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  out_path = tmp_path / "out.jsonl"
  proc = subprocess.run([sys.executable, "-m", "launch.batch_generate", f"--model={d}",
                         f"--input={tmp_path / 'in.jsonl'}", f"--output={out_path}", "--max_batch_size=2",
                         f"--max_new_tokens={n}", "--ignore_eos"], cwd=repo, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = {r["id"]: r for r in map(json.loads, out_path.read_text().splitlines())}
  assert sorted(results) == ["a", "b", "bad", "text"]
  assert "broken.jpg" in results["bad"]["error"]
  for key, image in (("a", a), ("b", b)):
    assert results[key]["token_ids"] == hf_vl_chat_greedy(d, hf, image_then_text, [Image.open(image)], n)[1], key
  assert len(results["text"]["token_ids"]) == n


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_engine_video_from_frame_directory_matches_transformers(tiny_vl_chat, tmp_path, impl):
  """A video as a directory of 3 frames (padded to 4: two temporal patches at 1 s each), through the engine,
  against transformers given the same pixel rows (its video processor needs torchvision, absent here; our video
  preprocessing is checked against its image processor frame by frame in test_image_processing)."""
  import transformers

  from qwenjax import Engine, SamplingParams
  from qwenjax.multimodal.processing import ImageProcessorConfig, preprocess_video

  d, hf = tiny_vl_chat
  frames = tmp_path / "frames"
  frames.mkdir()
  for i in range(3):
    save_png(frames / f"{i:03d}.png", 56, 84, 10 + i)
  messages = [{"role": "user", "content": [{"type": "video", "video": str(frames)},
                                           {"type": "text", "text": "What happens?"}]}]
  n = 8
  engine = Engine.load(str(d), max_batch_size=1, max_seq_len=256, page_size=16, attention_impl=impl,
                       media_root=tmp_path)
  out = engine.generate([{"messages": messages}], SamplingParams(max_tokens=n, ignore_eos=True))[0]

  video = preprocess_video(str(frames), ImageProcessorConfig.from_file(d / "preprocessor_config.json"))
  assert video.grid_thw[0] == 2 and video.second_per_grid_t == 1.0
  tokenizer = transformers.AutoTokenizer.from_pretrained(d)
  ids = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video"}, messages[0]["content"][1]]}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
  vid = hf.config.video_token_id
  expanded = sum(([t] * video.num_tokens if t == vid else [t] for t in ids), [])
  input_ids = torch.tensor([expanded])
  with torch.no_grad():
    ref = hf.generate(input_ids=input_ids, mm_token_type_ids=2 * (input_ids == vid).long(),
                      pixel_values_videos=torch.from_numpy(video.patches),
                      video_grid_thw=torch.tensor([video.grid_thw]), second_per_grid_ts=torch.tensor([1.0]),
                      max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
  assert out.usage["prompt_tokens"] == len(expanded)
  assert out.token_ids == ref[0, len(expanded):].tolist()


def test_tied_embeddings_load_and_match(tmp_path):
  """Qwen2.5-VL-3B ties lm_head to the embedding: a tied tiny checkpoint loads and matches transformers."""
  hf = build_tiny_vl(tmp_path, seed=2, tie=True)
  model = load_model(tmp_path, scan_layers=False)
  assert model.cfg.tie_word_embeddings and not hasattr(model, "lm_head")
  rng = np.random.default_rng(2)
  visuals = [_visual(rng, (1, 4, 4))]
  prompt = vl_prompt([3, START, IMAGE, END, 4, 5], visuals, model.vl_cfg)
  logits, *_ = _run_prefill(model, prompt)
  with torch.no_grad():
    ref = hf(**_hf_inputs(prompt, visuals)).logits[0].numpy()
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
