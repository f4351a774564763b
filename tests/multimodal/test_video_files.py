"""Video files (mp4, webm, mkv) for Qwen2.5-VL against qwen-vl-utils' rules worked out by hand: which frames are
sampled, that the decoded frames are those, the pixel budget, patches against transformers' image processor, the
engine, `launch.generate --video` and a batch job, and broken files as one-line InputErrors naming the file.

Clips are written here with PyAV. Frame i is one solid colour that encodes i (levels 45 apart, where lossy coding
moves a channel by at most ~7), so every decoded frame says which frame it is.
"""

import base64
import json
import pathlib
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwenjax._errors import InputError
from qwenjax.multimodal import video as video_module
from qwenjax.multimodal.processing import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, ImageProcessorConfig, preprocess_video
from qwenjax.multimodal.video import decode_frames, probe_video, sample_frame_indices

REPO = pathlib.Path(__file__).resolve().parents[2]
LEVELS = (20, 65, 110, 155, 200)


def color(i):
  return np.array([LEVELS[i % 5], LEVELS[i // 5 % 5], LEVELS[i // 25 % 5]], np.uint8)


def frame_number(rgb):
  """The i whose colour is nearest to a decoded frame's mean colour."""
  level = [int(np.abs(np.array(LEVELS) - c).argmin()) for c in np.asarray(rgb, np.float64).mean(axis=(0, 1))]
  return level[0] + 5 * level[1] + 25 * level[2]


def write_clip(path, codec, num_frames, rate, height=56, width=84, options=None, gop=None):
  with av.open(str(path), "w", options=options or {}) as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if gop is not None:
      stream.codec_context.gop_size = gop
    for i in range(num_frames):
      frame = av.VideoFrame.from_ndarray(np.broadcast_to(color(i), (height, width, 3)).copy(), format="rgb24")
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return path


def pyav_frames(path):
  """Every frame of a file as [H, W, 3] uint8, decoded here with PyAV alone (not through qwenjax)."""
  with av.open(str(path)) as container:
    return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def hf_video_patches(frames, processor):
  """Patches of stacked frames from transformers' image processor, one frame at a time: temporal patch k holds
  frames 2k and 2k+1 in its Tp slot (the processor repeats a lone frame over Tp)."""
  rows, grid = [], None
  for frame in frames:
    out = processor(images=Image.fromarray(frame), return_tensors="np")
    rows.append(out["pixel_values"].reshape(-1, 3, 2, 14, 14)[:, :, 0])
    grid = tuple(int(v) for v in out["image_grid_thw"][0])
  pairs = [np.stack([a, b], axis=2).reshape(len(a), -1) for a, b in zip(rows[0::2], rows[1::2])]
  return np.concatenate(pairs), (len(pairs), grid[1], grid[2])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("clips")
  return {"x264.mp4": write_clip(d / "x264.mp4", "libx264", 90, 30),  # 3 s at 30 fps
          "vp8.webm": write_clip(d / "vp8.webm", "libvpx", 30, 30),  # 1 s; webm declares no frame count
          "vp9.mkv": write_clip(d / "vp9.mkv", "libvpx-vp9", 45, 15),  # 3 s at 15 fps
          "mpeg4.mp4": write_clip(d / "mpeg4.mp4", "mpeg4", 55, 25)}  # 2.2 s at 25 fps


# (clip, sampling options, frame indices and the rate they stand for, worked out by hand from qwen-vl-utils 0.0.14:
# n = floor_2(clamp(frames / fps_file · fps, 4, floor_2(min(768, frames)))), round(linspace(first, last, n)),
# sampled fps = n / frames · fps_file).
SAMPLING = [
    ("x264.mp4", {}, [0, 18, 36, 53, 71, 89], 2.0),  # 6 frames: 0, 17.8, 35.6, 53.4, 71.2, 89
    ("vp8.webm", {}, [0, 10, 19, 29], 4.0),  # 2 frames wanted, 4 at least: 0, 9.67, 19.33, 29
    ("vp9.mkv", {}, [0, 9, 18, 26, 35, 44], 2.0),  # 0, 8.8, 17.6, 26.4, 35.2, 44
    ("mpeg4.mp4", {}, [0, 18, 36, 54], 4 / 55 * 25),  # 4.4 floored to 4
    ("x264.mp4", {"fps": 1.0}, [0, 30, 59, 89], 4 / 90 * 30),  # 3 wanted, 4 at least: 0, 29.67, 59.33, 89
    ("x264.mp4", {"nframes": 9}, [0, 13, 25, 38, 51, 64, 76, 89], 8 / 90 * 30),  # round(4.5) = 4 (half to even)
    # Frames ceil(1.0 · 30) = 30 to floor(2.5 · 30) = 75: 46 frames, 3.07 wanted, 4 at least.
    ("x264.mp4", {"video_start": 1.0, "video_end": 2.5}, [30, 45, 60, 75], 4 / 46 * 30),
]


@pytest.mark.parametrize("name,options,want,want_fps", SAMPLING)
def test_frames_are_sampled_decoded_and_patched_by_qwens_rules(clips, name, options, want, want_fps):
  path = clips[name]
  info = probe_video(path)
  assert (info.total_frames, info.video_fps) == {"x264.mp4": (90, 30), "vp8.webm": (30, 30), "vp9.mkv": (45, 15),
                                                 "mpeg4.mp4": (55, 25)}[name]
  assert sample_frame_indices(info.total_frames, info.video_fps, **options).tolist() == want
  decoded = decode_frames(path, want)
  assert [frame_number(f) for f in decoded] == want
  everything = pyav_frames(path)
  for image, i in zip(decoded, want):
    assert image.mode == "RGB" and np.abs(np.asarray(image, np.int16) - color(i)).max() <= 15
    np.testing.assert_array_equal(np.asarray(image), everything[i])

  video = preprocess_video(path, **options)
  # 56x84 frames under the video budget: smart_resize(56, 84, 28, 128·28², 768·28²) grows them to 280x392.
  assert video.kind == "video" and video.grid_thw == (len(want) // 2, 20, 28)
  assert video.second_per_grid_t == pytest.approx(2 / want_fps, rel=1e-12)
  ref, grid = hf_video_patches([everything[i] for i in want],
                               Qwen2VLImageProcessorPil(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS))
  assert grid == video.grid_thw
  np.testing.assert_allclose(video.patches, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,codec", [("gop.mp4", "libx264"), ("gop.webm", "libvpx"), ("gop.mkv", "libvpx-vp9")])
def test_sparse_frames_are_decoded_from_keyframes(tmp_path, name, codec):
  """Frames ~100 apart in a clip with a keyframe every 10 or fewer: decoding jumps between keyframes, and the
  frames equal those of decoding everything; a cut file still fails as truncated."""
  path = write_clip(tmp_path / name, codec, 300, 30, gop=10)
  want = sample_frame_indices(300, 30.0, nframes=4).tolist()
  assert want == [0, 100, 199, 299]  # linspace(0, 299, 4) = 0, 99.67, 199.33, 299
  everything = pyav_frames(path)
  decoded = decode_frames(path, want)
  assert [frame_number(f) for f in decoded] == [i % 125 for i in want]
  for image, i in zip(decoded, want):
    np.testing.assert_array_equal(np.asarray(image), everything[i])
  seeking = video_module._decode_seeking(path, want, lambda image: image)  # no silent fall-back to one pass
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(seeking, decoded))
  if name.endswith(".mp4"):
    cut = _written(tmp_path / "cut.mp4", write_clip(tmp_path / "fs.mp4", codec, 300, 30, gop=10,
                                                    options={"movflags": "faststart"}).read_bytes()[:-3000])
    with pytest.raises(InputError, match="cut.mp4: the video stream ends after .* of the 300 it declares"):
      decode_frames(cut, want, total_frames=300)


def test_pixel_budget_per_frame(tmp_path):
  """360x480 frames, 6 sampled (3 s at 12 fps). smart_resize(360, 480) rounds to 364x476 = 173,264 pixels."""
  path = write_clip(tmp_path / "big.mp4", "libx264", 36, 12, height=360, width=480)
  assert preprocess_video(path).grid_thw == (3, 26, 34)  # within 768·28²: 364x476
  # max = max(min(768·28², 360,000 / 6 · 2), int(1.05 · 128·28²)) = 120,000: β = √(172,800 / 120,000) = 1.2,
  # floor(300 / 28) · 28 = 280, floor(400 / 28) · 28 = 392.
  budgeted = preprocess_video(path, total_pixels=360_000)
  assert budgeted.grid_thw == (3, 20, 28)
  everything = pyav_frames(path)  # resized once, from the decoded size, as qwen-vl-utils resizes a video file
  ref, _ = hf_video_patches([everything[i] for i in [0, 7, 14, 21, 28, 35]],
                            Qwen2VLImageProcessorPil(min_pixels=VIDEO_MIN_PIXELS, max_pixels=120_000))
  np.testing.assert_allclose(budgeted.patches, ref, rtol=0, atol=1e-5)
  # max_pixels lowers the budget to 110,000: β = 1.2534, floor(287.2 / 28) · 28 = 280, floor(383.0 / 28) · 28 = 364;
  # as a qwen-vl-utils element (a content part) too. Below the frames' min_pixels (128·28²) it is an error.
  assert preprocess_video(path, max_pixels=110_000).grid_thw == (3, 20, 26)
  assert preprocess_video({"type": "video", "video": str(path), "max_pixels": 110_000}).grid_thw == (3, 20, 26)
  with pytest.raises(InputError, match="max_pixels 50000 is below"):
    preprocess_video(path, max_pixels=50_000)
  # The processor's own max_pixels (24·28² = 18,816) then applies: 364x476 -> β = 3.035 -> 112x140.
  small = ImageProcessorConfig(min_pixels=4 * 28 * 28, max_pixels=24 * 28 * 28)
  assert preprocess_video(path, small).grid_thw == (3, 8, 10)


def test_video_elements_carry_qwen_vl_utils_options(clips):
  """Content parts as Qwen's examples write them: options beside "video" (checked), frame-only ones refused; a
  data: URL decodes as its file does."""
  path = str(clips["x264.mp4"])
  one_fps = preprocess_video({"type": "video", "video": path, "fps": 1})  # [0, 30, 59, 89]: SAMPLING above
  assert one_fps.grid_thw == (2, 20, 28) and one_fps.second_per_grid_t == pytest.approx(2 / (4 / 90 * 30))
  data_url = "data:video/webm;base64," + base64.b64encode(clips["vp8.webm"].read_bytes()).decode()
  np.testing.assert_array_equal(preprocess_video(data_url).patches, preprocess_video(clips["vp8.webm"]).patches)
  clip = preprocess_video({"video": path, "video_start": 1, "video_end": 2.5})
  np.testing.assert_array_equal(clip.patches, preprocess_video(path, video_start=1.0, video_end=2.5).patches)
  for element, match in [({"video": path, "fps": 1, "nframes": 4}, "exclude each other"),
                         ({"video": path, "fsp": 1}, "unknown video option 'fsp'"),
                         ({"video": path, "fps": "2"}, "'fps' must be a non-negative number"),
                         ({"video": path, "nframes": 4.5}, "'nframes' must be a non-negative integer"),
                         ({"video": path, "video_start": 2, "video_end": 1}, "leave no clip"),
                         ({"fps": 1}, "needs {'video'"),
                         ({"video": [Image.new("RGB", (56, 56))] * 2, "nframes": 2}, "nframes: sample video files")]:
    with pytest.raises(InputError, match=match):
      preprocess_video(element)


def _silent_audio(container):
  stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
  frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
  frame.sample_rate = 8000
  container.mux(stream.encode(frame))
  container.mux(stream.encode())


def _audio_only(path):
  with av.open(str(path), "w") as container:
    _silent_audio(container)
  return path


def _video_stream_without_frames(path):
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    _silent_audio(container)  # PyAV writes the header with the first packet: an audio one here
  return path


def _truncated(path, keep, **write):
  data = write_clip(path.with_suffix(".full" + path.suffix), "libx264", 60, 30, **write).read_bytes()
  return _written(path, data[:int(len(data) * keep)])


def _written(path, data):
  path.write_bytes(data)
  return path


BROKEN = [  # (file name, how to make it, what the error says)
    ("missing.mp4", lambda p: p, "video file not found"),
    ("random.mp4", lambda p: _written(p, np.random.default_rng(0).bytes(4000)), "not a video file"),
    ("notes.mkv", lambda p: _written(p, b"not a video"), "not a video file"),
    # mp4 as FFmpeg writes it keeps its index (moov) at the end: a cut file cannot be opened at all.
    ("cut.mp4", lambda p: _truncated(p, 0.6), "not a video file"),
    # With the index first (faststart), the cut shows while decoding: fewer frames than the 60 declared.
    ("cut_faststart.mp4", lambda p: _truncated(p, 0.8, options={"movflags": "faststart"}),
     "truncated or corrupt"),
    ("audio.wav", _audio_only, "no video stream"),
    ("empty.mkv", _video_stream_without_frames, "video stream holds no frames"),
    ("one_frame.mp4", lambda p: write_clip(p, "libx264", 1, 30), "cannot sample"),
]


@pytest.mark.parametrize("name,make,match", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_video_files_are_one_line_input_errors(short_tmp_path, name, make, match):
  path = make(short_tmp_path / name)
  with pytest.raises(InputError, match=match) as error:
    preprocess_video(path)
  assert name in str(error.value) and "\n" not in str(error.value)


def test_engine_generate_and_batch_with_video_files(tiny_vl_chat, clips, short_tmp_path):
  """A video file part, a video_url part and the same sampled frames given as a frame list (taken at 2 fps, the
  rate the file's 6 frames stand for) generate the same tokens; so do `launch.generate --video` and a batch job,
  where a corrupt and a missing video fail their own lines only."""
  from qwenjax import Engine, SamplingParams

  d, _ = tiny_vl_chat
  path = clips["x264.mp4"]
  frames = [Image.fromarray(f) for f in np.asarray(pyav_frames(path))[[0, 18, 36, 53, 71, 89]]]
  text = {"type": "text", "text": "What happens?"}
  others = [Image.fromarray(f) for f in np.asarray(pyav_frames(path))[[1, 19, 37, 54, 72, 88]]]  # a frame off
  parts = [{"type": "video", "video": str(path)}, {"type": "video_url", "video_url": {"url": f"file://{path}"}},
           {"type": "video", "video": frames}, {"type": "video", "video": others}]
  media = short_tmp_path.parent  # holds the clips fixture's directory and short_tmp_path
  engine = Engine.load(str(d), max_batch_size=2, max_seq_len=256, page_size=16, media_root=media)
  n = 8
  outs = engine.generate([{"messages": [{"role": "user", "content": [part, text]}]} for part in parts],
                         SamplingParams(max_tokens=n, ignore_eos=True))
  # 280x392 frames, then the tiny processor's 24·28² cap: 112x140 = 4x5 merged tokens per temporal patch, 3 patches.
  prompt = engine.prepare({"messages": [{"role": "user", "content": [parts[0], text]}]})
  assert prompt.ids.count(engine.vl_cfg.video_token_id) == 60 and len(outs[0].token_ids) == n
  one_fps = engine.prepare({"messages": [{"role": "user", "content": [dict(parts[0], fps=1.0), text]}]})
  assert one_fps.ids.count(engine.vl_cfg.video_token_id) == 40  # 4 frames: 2 temporal patches
  assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids
  assert outs[0].usage == outs[1].usage == outs[2].usage
  assert outs[3].token_ids != outs[0].token_ids  # the frames matter

  proc = subprocess.run([sys.executable, "-m", "launch.generate", f"--model={d}", f"--video={path}",
                         "--prompt=What happens?", f"--max_new_tokens={n}", "--ignore_eos", "--json"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)["token_ids"] == outs[0].token_ids

  corrupt = short_tmp_path / "corrupt.mp4"
  corrupt.write_bytes(path.read_bytes()[:3000])
  lines = [{"id": key, "messages": [{"role": "user", "content": [{"type": "video", "video": str(video)}, text]}]}
           for key, video in (("good", path), ("corrupt", corrupt), ("missing", short_tmp_path / "gone.webm"))]
  lines.append({"id": "text", "prompt": "plain text"})
  (short_tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  out_path = short_tmp_path / "out.jsonl"
  proc = subprocess.run([sys.executable, "-m", "launch.batch_generate", f"--model={d}",
                         f"--input={short_tmp_path / 'in.jsonl'}", f"--output={out_path}", "--max_batch_size=2",
                         f"--max_new_tokens={n}", "--ignore_eos", f"--media_root={media}"], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = {r["id"]: r for r in map(json.loads, out_path.read_text().splitlines())}
  assert sorted(results) == ["corrupt", "good", "missing", "text"]
  assert results["good"]["token_ids"] == outs[0].token_ids
  assert "corrupt.mp4" in results["corrupt"]["error"] and "not a video file" in results["corrupt"]["error"]
  assert "gone.webm" in results["missing"]["error"] and "not found" in results["missing"]["error"]
  assert len(results["text"]["token_ids"]) == n


# --- local files and the media root (issue 21, defect 14) ---

OUTSIDE_ROOT = "outside the media root (Engine media_root / --media_root): no file there is read."


def _image_line(key, url):
  return {"id": key, "messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                                               {"type": "image_url", "image_url": {"url": url}}]}]}


def _outside_tree(tmp_path):
  """jobs/ (the input's directory: an image, a symlink out) and outside/ beside it (an image, a text file, a frame
  directory whose one entry has a telling name)."""
  jobs, outside = tmp_path / "jobs", tmp_path / "outside"
  (outside / "frames").mkdir(parents=True)
  jobs.mkdir()
  Image.fromarray(np.full((56, 84, 3), 90, np.uint8)).save(jobs / "in.png")
  Image.fromarray(np.full((56, 84, 3), 30, np.uint8)).save(outside / "secret.png")
  Image.fromarray(np.full((56, 84, 3), 60, np.uint8)).save(outside / "frames" / "id_rsa_first_entry.png")
  (outside / "notes.txt").write_text("not an image\n")
  (jobs / "link.png").symlink_to(outside / "secret.png")
  return jobs, outside


def test_engine_holds_requests_to_its_media_root(tiny_vl_chat, clips, short_tmp_path):
  """Engine(media_root=...): an image or video outside it is that request's InputError naming the request's field
  (a content part, or a raw prompt's images[i] / videos[i]) and saying only that it is outside; the default root is
  the working directory; prepare(..., media_root=) sets one per request."""
  from qwenjax import Engine, InputError

  d, _ = tiny_vl_chat
  jobs, outside = _outside_tree(short_tmp_path)
  engine = Engine.load(str(d), max_batch_size=1, max_seq_len=256, page_size=16, media_root=jobs)
  assert len(engine.prepare(_image_line("in", "in.png")).visuals) == 1  # relative: from the root
  video = {"role": "user", "content": [{"type": "text", "text": "Watch:"}, {"type": "video", "video": str(clips[
      "vp8.webm"])}]}
  cases = [(_image_line("x", str(outside / "secret.png")), "messages[0].content[1].image_url"),
           (_image_line("x", "link.png"), "messages[0].content[1].image_url"),
           ({"messages": [video]}, "messages[0].content[1].video"),
           ({"messages": [dict(video, content=[{"type": "video", "video": str(outside / "frames")}])]},
            "messages[0].content[0].video"),
           ({"prompt": "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>",
             "images": [str(jobs / "in.png")], "videos": ["/etc"]}, "videos[0]")]
  for request, field in cases:
    with pytest.raises(InputError) as e:
      engine.prepare(request)
    assert str(e.value).startswith(f"{field}: ") and str(e.value).endswith(f": {OUTSIDE_ROOT}"), str(e.value)
    assert "id_rsa" not in str(e.value)
  assert engine.prepare(cases[2][0], media_root=clips["vp8.webm"].parent).visuals[0].kind == "video"
  default = Engine.load(str(d), max_batch_size=1, max_seq_len=256, page_size=16)
  with pytest.raises(InputError) as e:
    default.prepare(_image_line("in", str(jobs / "in.png")))  # short_tmp_path is outside the working directory
  assert str(e.value) == f"messages[0].content[1].image_url: {jobs / 'in.png'}: {OUTSIDE_ROOT}"


def test_batch_lines_cannot_read_or_probe_files_outside_the_input_directory(tiny_vl_chat, tmp_path):
  """A batch file from someone else: /etc/passwd, a file:// URL outside the root, a symlink inside the root that
  points out, a frame directory outside, a missing file and a text file outside are all error records in the same
  words (before: 'not found' vs 'not an image' vs the frame directory's first entry named); an image beside the
  input file is served. With --media_root=outside/, the outside image is served and the inside one refused."""
  d, _ = tiny_vl_chat
  jobs, outside = _outside_tree(tmp_path)
  frames = {"id": "frames", "messages": [{"role": "user", "content": [{"type": "video", "video": str(outside /
                                                                                                     "frames")}]}]}
  lines = [_image_line("passwd", "/etc/passwd"), _image_line("url", f"file://{outside / 'secret.png'}"),
           _image_line("link", str(jobs / "link.png")), frames, _image_line("missing", str(outside / "gone.png")),
           _image_line("text", str(outside / "notes.txt")), _image_line("good", "in.png")]
  (jobs / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  out_path = tmp_path / "out.jsonl"
  proc = subprocess.run([sys.executable, "-m", "launch.batch_generate", f"--model={d}",
                         f"--input={jobs / 'in.jsonl'}", f"--output={out_path}", "--max_batch_size=1",
                         "--max_new_tokens=2", "--ignore_eos"], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  results = {r["id"]: r for r in map(json.loads, out_path.read_text().splitlines())}
  said = set()
  for line_number, line in enumerate(lines[:-1], 1):
    error = results[line["id"]]["error"]
    field = "messages[0].content[0].video" if line["id"] == "frames" else "messages[0].content[1].image_url"
    assert error.startswith(f"{jobs / 'in.jsonl'}:{line_number}: {field}: ") and "id_rsa" not in error, error
    said.add(error[error.index(OUTSIDE_ROOT[:20]):])
  assert said == {OUTSIDE_ROOT}, said
  assert len(results["good"]["token_ids"]) == 2 and "error" not in results["good"]  # relative: from jobs/
