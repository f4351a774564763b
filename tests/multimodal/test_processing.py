"""Qwen2.5-VL preprocessing against transformers' Qwen2-VL image processor (PIL backend) and qwen-vl-utils' rules."""

import base64
import io
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qwenjax._errors import ConfigError, InputError
from qwenjax.multimodal.processing import (
  VIDEO_MAX_PIXELS,
  VIDEO_MIN_PIXELS,
  ImageProcessorConfig,
  load_image,
  load_video_frames,
  preprocess_image,
  preprocess_video,
  sample_frame_indices,
  smart_resize,
)

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json, as released.
RELEASED = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
CUSTOM = {"min_pixels": 64 * 28 * 28, "max_pixels": 256 * 28 * 28}  # small enough for test images to hit both
ATOL = 1e-5


def random_image(height, width, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  # Smooth ramps plus noise, so bicubic overshoot and clipping are exercised.
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([yy * 255 / max(height - 1, 1), xx * 255 / max(width - 1, 1), (yy + xx) % 256], axis=-1)
  pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
  return Image.fromarray(pixels, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """(our config, transformers' processor), both read from the released preprocessor_config.json."""
  d = tmp_path_factory.mktemp("qwen25vl")
  (d / "preprocessor_config.json").write_text(json.dumps(RELEASED))
  return ImageProcessorConfig.from_file(d / "preprocessor_config.json"), Qwen2VLImageProcessorPil.from_pretrained(d)


@pytest.fixture(scope="module")
def custom():
  return ImageProcessorConfig(**CUSTOM), Qwen2VLImageProcessorPil(**CUSTOM)


def hf_patches(processor, image):
  out = processor(images=image, return_tensors="np")
  return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def assert_matches(cfg, processor, image, source=None):
  got = preprocess_image(image if source is None else source, cfg)
  want, grid = hf_patches(processor, image)
  assert got.grid_thw == grid and got.kind == "image" and got.second_per_grid_t is None
  assert got.patches.dtype == np.float32 and got.patches.shape == want.shape == (math.prod(grid), 1176)
  np.testing.assert_allclose(got.patches, want, rtol=0, atol=ATOL)
  assert got.num_tokens == math.prod(grid) // 4
  return got


# --- smart_resize ---

SPECIAL_SIZES = [
    (1, 1), (3, 3), (14, 14), (27, 29), (28, 28), (42, 42), (70, 70), (98, 126), (42, 70), (28, 5000), (5000, 28),
    (1, 200), (200, 1), (25, 4999), (10000, 10000), (4000, 3000), (3000, 4000), (8192, 8192), (56, 11200),
    (3583, 3585), (1080, 1920), (2160, 3840),
]
BUDGETS = [(3136, 12845056), (56 * 56, 28 * 28 * 1280), (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (100 * 784, 105369),
           (CUSTOM["min_pixels"], CUSTOM["max_pixels"]), (1, 784)]


def test_smart_resize_equals_transformers():
  rng = np.random.default_rng(0)
  sizes = SPECIAL_SIZES + [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
  sizes += [(int(h), int(h * r)) for h, r in zip(rng.integers(20, 200, 50), rng.uniform(1, 199, 50))]
  checked = 0
  for h, w in sizes:
    if max(h, w) / min(h, w) > 200:
      continue
    for lo, hi in BUDGETS:
      got = smart_resize(h, w, 28, lo, hi)
      assert got == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
      assert got[0] % 28 == 0 and got[1] % 28 == 0 and min(got) >= 28
      checked += 1
  assert checked > 2000
  # Python's round halves to even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2, 98/28 = 3.5 -> 4.
  assert smart_resize(42, 70, 28, 1, 10**9) == (56, 56)
  assert smart_resize(98, 98, 28, 1, 10**9) == (112, 112)


@pytest.mark.parametrize("h,w", [(1, 201), (201, 1), (10, 2001), (28, 6000)])
def test_smart_resize_rejects_aspect_ratio_over_200(h, w):
  with pytest.raises(ValueError, match="aspect ratio"):
    hf_smart_resize(h, w, 28, 3136, 12845056)
  with pytest.raises(InputError, match="aspect ratio"):
    smart_resize(h, w, 28, 3136, 12845056)


def test_preprocess_image_names_the_source_of_a_bad_aspect_ratio(short_tmp_path):
  path = short_tmp_path / "strip.png"
  random_image(2, 500).save(path)
  with pytest.raises(InputError, match="strip.png.*aspect ratio"):
    preprocess_image(path)


# --- pixel values against transformers ---

IMAGE_SIZES = [
    (1, 1), (5, 7), (27, 29), (28, 28), (57, 91), (100, 100), (224, 224), (333, 517), (640, 480), (480, 640),
    (28, 5000), (5000, 30), (701, 1203), (1000, 1400), (120, 1500),
]


@pytest.mark.parametrize("h,w", IMAGE_SIZES)
def test_patches_equal_transformers_released_config(released, h, w):
  assert_matches(*released, random_image(h, w, seed=h * w))


def test_patches_are_bit_identical_to_transformers(released):
  for image in (random_image(333, 517), MODES["RGBA"](), random_image(28, 5000)):
    np.testing.assert_array_equal(preprocess_image(image, released[0]).patches, hf_patches(released[1], image)[0])


@pytest.mark.parametrize("h,w", IMAGE_SIZES)
def test_patches_equal_transformers_custom_pixels(custom, h, w):
  got = assert_matches(*custom, random_image(h, w, seed=h + w))
  assert CUSTOM["min_pixels"] <= got.grid_thw[1] * got.grid_thw[2] * 14 * 14 <= CUSTOM["max_pixels"]


def _palette(transparent):
  image = random_image(61, 83, seed=5).quantize(32)
  if transparent:
    image.info["transparency"] = 3
  return image


MODES = {
    "RGBA": lambda: Image.fromarray(np.random.default_rng(1).integers(0, 256, (61, 83, 4), dtype=np.uint8), "RGBA"),
    "LA": lambda: random_image(61, 83, "LA", seed=2),
    "L": lambda: random_image(61, 83, "L", seed=3),
    "1": lambda: random_image(61, 83, "1", seed=3),
    "P": lambda: _palette(False),
    "P+transparency": lambda: _palette(True),
    "CMYK": lambda: random_image(61, 83, "CMYK", seed=4),
    "I;16": lambda: random_image(61, 83, "L", seed=3).convert("I;16"),
}


@pytest.mark.parametrize("which", ["released", "custom"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_image_modes_convert_like_transformers(request, mode, which):
  image = MODES[mode]()
  rgb = load_image(image)
  assert rgb.mode == "RGB" and rgb.size == image.size
  assert_matches(*request.getfixturevalue(which), image)


def test_rgba_composites_onto_white():
  image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
  image.putpixel((0, 0), (10, 20, 30, 255))
  pixels = np.asarray(load_image(image))
  assert (pixels[1:, 1:] == 255).all() and tuple(pixels[0, 0]) == (10, 20, 30)


def test_patch_rows_are_merge_units():
  # Each 14x14 patch is filled with its (row, col); four consecutive rows must be one 2x2 merge unit.
  gh, gw = 4, 6
  pixels = np.zeros((gh * 14, gw * 14, 3), np.uint8)
  for r in range(gh):
    for c in range(gw):
      pixels[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = (r * 40, c * 40, 0)
  cfg = ImageProcessorConfig()
  got = preprocess_image(Image.fromarray(pixels), cfg)
  assert got.grid_thw == (1, gh, gw) and got.num_tokens == 6
  rows = got.patches.reshape(-1, 3, 2, 14, 14)  # [N, C, Tp, P, P]
  assert (rows == rows[:, :, :, :1, :1]).all()  # every patch is uniform, both temporal copies equal
  # Undo the normalisation of the red (patch row) and green (patch column) channels.
  levels = np.rint((rows[:, :2, 0, 0, 0] * np.float32(cfg.image_std[:2]) + np.float32(cfg.image_mean[:2])) * 255)
  order = [tuple(v) for v in (levels.astype(int) // 40).tolist()]
  want = [(2 * br + i, 2 * bc + j) for br in range(gh // 2) for bc in range(gw // 2) for i in (0, 1) for j in (0, 1)]
  assert order == want


# --- loading ---

def data_url(image, fmt="PNG"):
  buf = io.BytesIO()
  image.save(buf, fmt)
  return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_load_image_sources_agree(released, tmp_path):
  image = random_image(97, 133, "RGBA", seed=9)
  path = tmp_path / "my image.png"
  image.save(path)
  want = assert_matches(*released, image).patches
  for source in (path, str(path), f"file://{path}", f"file://{str(path).replace(' ', '%20')}", data_url(image)):
    np.testing.assert_array_equal(preprocess_image(source, released[0]).patches, want, err_msg=str(source)[:60])
  jpeg = tmp_path / "photo.jpg"
  random_image(40, 50).save(jpeg, quality=90)
  np.testing.assert_array_equal(preprocess_image(jpeg).patches, preprocess_image(Image.open(jpeg)).patches)


def test_broken_images_are_input_errors_naming_the_source(short_tmp_path):
  png = short_tmp_path / "truncated.png"
  random_image(64, 64).save(png)
  png.write_bytes(png.read_bytes()[:300])
  text = short_tmp_path / "notes.png"
  text.write_text("this is not an image\n")
  empty = short_tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  for source in (png, text, empty, short_tmp_path / "missing.png", str(short_tmp_path),
                 f"file://{short_tmp_path}/gone.png"):
    with pytest.raises(InputError) as e:
      load_image(source)
    message = str(e.value)
    assert "\n" not in message and str(source).removeprefix("file://") in message, message


def test_bad_urls_are_input_errors():
  with pytest.raises(InputError, match="not fetched"):
    load_image("https://example.com/cat.png")
  with pytest.raises(InputError, match="data:image/<type>;base64"):
    load_image("data:text/plain;base64,aGVsbG8=")
  with pytest.raises(InputError, match="base64"):
    load_image("data:image/png;base64,abc")
  long_garbage = "data:image/png;base64," + base64.b64encode(b"not a png " * 1000).decode()
  with pytest.raises(InputError) as e:
    load_image(long_garbage)
  assert len(str(e.value)) < 200 and str(len(long_garbage)) in str(e.value)
  with pytest.raises(InputError, match="ndarray"):
    load_image(np.zeros((4, 4, 3), np.uint8))


# --- video ---

def hf_frame_patches(processor, frame):
  """One frame's [N, C, P, P] patches from transformers' image processor (which repeats a frame over Tp)."""
  pixels, grid = hf_patches(processor, frame)
  rows = pixels.reshape(-1, 3, 2, 14, 14)
  np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])
  return rows[:, :, 0], grid


def expected_video(processor, frames):
  """Patchify of stacked frames: temporal pair k holds frames 2k and 2k+1 in its Tp slot, rows as for images."""
  pairs = []
  for a, b in zip(frames[0::2], frames[1::2]):
    (pa, grid), (pb, _) = hf_frame_patches(processor, a), hf_frame_patches(processor, b)
    pairs.append(np.stack([pa, pb], axis=2).reshape(len(pa), -1))
  return np.concatenate(pairs), (len(pairs), grid[1], grid[2])


def test_video_list_is_padded_and_matches_the_image_processor(released):
  frames = [random_image(336, 448, seed=s) for s in range(5)]  # within every budget: no resize
  got = preprocess_video(frames, released[0], fps=2.0)
  want, grid = expected_video(released[1], frames + frames[-1:])
  assert got.kind == "video" and got.second_per_grid_t == 1.0
  assert got.grid_thw == grid == (3, 24, 32) and got.num_tokens == 3 * 24 * 32 // 4
  np.testing.assert_allclose(got.patches, want, rtol=0, atol=ATOL)
  assert preprocess_video(frames[:4], released[0], fps=4.0).second_per_grid_t == 0.5


def test_video_frames_resize_under_the_video_budget():
  # qwen-vl-utils: fetch_image resizes 200x300 to 196x308 (60,368 pixels), below VIDEO_MIN_PIXELS, so the
  # stacked frames are resized again to smart_resize(196, 308, 28, 128·28², 768·28²) = (280, 420).
  frames = [random_image(200, 300, seed=s) for s in range(4)]
  got = preprocess_video(frames)
  assert got.grid_thw == (2, 20, 30)
  step1 = [f.resize((308, 196), Image.Resampling.BICUBIC) for f in frames]
  want, grid = expected_video(Qwen2VLImageProcessorPil(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS),
                              step1)
  assert grid == got.grid_thw
  np.testing.assert_allclose(got.patches, want, rtol=0, atol=ATOL)


def test_video_total_pixel_budget_is_shared_between_frames():
  frames = [Image.new("RGB", (700, 700), (s * 60, 0, 0)) for s in range(4)]
  # max = max(min(768·28², total / 4 · 2), int(128·28² · 1.05)): 200,000 here, so 700x700 -> 420x420.
  assert preprocess_video(frames, total_pixels=400_000).grid_thw == (2, 30, 30)
  # A tiny budget is floored at int(1.05 · 128·28²) = 105,369 pixels: 308x308.
  assert preprocess_video(frames, total_pixels=1000).grid_thw == (2, 22, 22)
  assert preprocess_video(frames).grid_thw == (2, 50, 50)  # 490,000 pixels: within 768·28²
  assert preprocess_video(frames, max_pixels=200_000).grid_thw == (2, 30, 30)
  # Frames of other sizes are resized to the first frame's size.
  mixed = preprocess_video([Image.new("RGB", (700, 700)), Image.new("RGB", (300, 500), (9, 9, 9))])
  assert mixed.grid_thw == (1, 50, 50)


def test_video_directory_loads_in_name_order(tmp_path):
  colors = {"frame_002.png": (0, 200, 0), "frame_000.png": (200, 0, 0), "frame_001.png": (0, 0, 200)}
  for name, color in colors.items():  # written out of order
    Image.new("RGB", (56, 56), color).save(tmp_path / name)
  (tmp_path / ".DS_Store").write_bytes(b"\0\1")
  frames = load_video_frames(tmp_path)
  assert [f.getpixel((0, 0)) for f in frames] == [(200, 0, 0), (0, 0, 200), (0, 200, 0)]
  from_dir = preprocess_video(tmp_path)
  from_list = preprocess_video([tmp_path / n for n in sorted(colors)])
  assert from_dir.grid_thw == from_list.grid_thw == (2, 24, 24)  # 3 frames -> 4; 56x56 -> 336x336 (video min)
  np.testing.assert_array_equal(from_dir.patches, from_list.patches)
  (tmp_path / "notes.txt").write_text("not a frame")
  with pytest.raises(InputError, match=r"frame 3 \(in name order\): not an image file") as e:
    load_video_frames(tmp_path)  # by position: an error never names what a directory holds
  assert "notes" not in str(e.value).replace(str(tmp_path), "")
  (tmp_path / "clip.mp4").write_bytes(b"\0")
  with pytest.raises(InputError, match="not decoded"):
    load_video_frames(tmp_path / "clip.mp4")
  with pytest.raises(InputError, match="no such frame directory"):
    load_video_frames(tmp_path / "missing")
  with pytest.raises(InputError, match="empty"):
    preprocess_video([])


def _round_half_even(k, total, n):
  return round(Fraction(k * (total - 1), n - 1))


@pytest.mark.parametrize("total,video_fps,kwargs,want", [
    (10, 30.0, {}, [0, 3, 6, 9]),  # 0.67 frames at fps 2 -> min 4
    (3, 30.0, {}, [0, 2]),  # max_frames = floor(min(768, 3) / 2) * 2 = 2
    (61, 30.0, {"fps": 1.0}, [0, 20, 40, 60]),  # 2.03 -> 4
    (100, 30.0, {"nframes": 7}, [0, 14, 28, 42, 57, 71, 85, 99]),  # round(7 / 2) * 2 = 8
    (6, 1.0, {"nframes": 3}, [0, 2, 3, 5]),  # round(1.5) = 2 (half to even): 4 frames at 0, 1.67, 3.33, 5
    (6, 1.0, {"nframes": 5}, [0, 2, 3, 5]),  # round(2.5) = 2 as well
])
def test_sample_frame_indices_hand_computed(total, video_fps, kwargs, want):
  assert sample_frame_indices(total, video_fps, **kwargs).tolist() == want


def test_sample_frame_indices_counts():
  assert len(sample_frame_indices(300, 30.0)) == 20  # 10 s at 2 fps
  assert len(sample_frame_indices(301, 30.0)) == 20  # 20.07 floored to even
  assert len(sample_frame_indices(10_000, 25.0)) == 768  # 800 capped at FPS_MAX_FRAMES
  assert len(sample_frame_indices(10_000, 25.0, max_frames=101)) == 100
  assert len(sample_frame_indices(40, 30.0, min_frames=5)) == 6  # min rounded up to even
  assert len(sample_frame_indices(9, 2.0, fps=4.0)) == 8  # 18 wanted, capped at total and floored to even
  idx = sample_frame_indices(300, 30.0)
  assert idx.tolist() == [_round_half_even(k, 300, 20) for k in range(20)]
  for total in (1, 0):
    with pytest.raises(InputError):
      sample_frame_indices(total, 30.0)


def test_sample_frame_indices_equal_torch_linspace():
  rng = np.random.default_rng(0)
  for _ in range(300):
    total, video_fps = int(rng.integers(2, 500_000)), float(rng.choice([23.976, 24.0, 25.0, 29.97, 30.0, 60.0]))
    idx = sample_frame_indices(total, video_fps)
    assert idx.tolist() == torch.linspace(0, total - 1, len(idx)).round().long().tolist(), (total, video_fps)


# --- config ---

def test_config_defaults_are_the_released_values(released):
  assert released[0] == ImageProcessorConfig()
  assert ImageProcessorConfig().patch_dim == 1176 and ImageProcessorConfig().factor == 28


def test_config_size_forms(tmp_path):
  new = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 200000}, "foo": [1]})
  assert (new.min_pixels, new.max_pixels) == (100, 200000)
  both = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 200000}, "min_pixels": 3136,
                                         "max_pixels": None})
  assert (both.min_pixels, both.max_pixels) == (3136, 200000)  # top-level keys win, as in transformers
  path = tmp_path / "preprocessor_config.json"
  path.write_text(json.dumps({**RELEASED, **CUSTOM, "resample": 2, "rescale_factor": 0.5}))
  cfg = ImageProcessorConfig.from_file(path)
  assert (cfg.min_pixels, cfg.max_pixels, cfg.resample, cfg.rescale_factor) == (50176, 200704, 2, 0.5)


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"patch_size": "14"}), "patch_size must be an integer"),
    (json.dumps({"min_pixels": 5000, "max_pixels": 4000}), "below min_pixels"),
    (json.dumps({"image_mean": [0.5, 0.5]}), "3 values"),
    (json.dumps({"image_std": [0.5, 0.0, 0.5]}), "non-zero"),
    (json.dumps({"size": 224}), "size must be an object"),
    (json.dumps({"resample": 9}), "resampling filter"),
])
def test_bad_config_files_are_config_errors_naming_the_file(tmp_path, content, match):
  path = tmp_path / "preprocessor_config.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(ConfigError, match=match) as e:
    ImageProcessorConfig.from_file(path)
  assert str(path) in str(e.value)


# --- local files and the media root (issue 21, defect 14) ---

OUTSIDE_ROOT = "outside the media root (Engine media_root / --media_root): no file there is read"


@pytest.fixture
def media(tmp_path):
  """root/ with an image, a frame directory and symlinks pointing out of it; outside/ beside it with an image, a
  text file and a frame directory whose entries have telling names."""
  root, outside = tmp_path / "root", tmp_path / "outside"
  (root / "frames").mkdir(parents=True)
  (outside / "frames").mkdir(parents=True)
  random_image(40, 50, seed=1).save(root / "in.png")
  for i in range(2):
    random_image(56, 56, seed=2 + i).save(root / "frames" / f"{i:03d}.png")
  random_image(40, 50, seed=4).save(outside / "secret.png")
  (outside / "notes.txt").write_text("not an image\n")
  random_image(56, 56, seed=5).save(outside / "frames" / "id_rsa_first_entry.png")
  (root / "link.png").symlink_to(outside / "secret.png")
  (root / "linkdir").symlink_to(outside / "frames")
  return root, outside


def _outside_sources(root, outside):
  """Local media outside `root` spelt every way a request can: existing or not, an image or not, a directory,
  through a symlink inside the root, through '..', as a file:// URL (percent-escaped too), and system files."""
  return [str(outside / "secret.png"), str(outside / "notes.txt"), str(outside / "missing.png"), str(outside),
          str(outside / "frames"), str(root / "link.png"), str(root / "linkdir"), str(root / ".." / "outside"),
          "../outside/secret.png", f"file://{outside / 'secret.png'}", f"file://{root}/%2E%2E/outside/secret.png",
          "file:///etc/passwd", "/etc/passwd", "/proc/self/environ", "/root/.ssh", "/nonexistent/x.png"]


def test_local_media_outside_the_root_are_refused_alike(media):
  """Every local path outside media_root (symlinks resolved) is refused with the same words, whatever it is: the
  message never tells a missing file from a non-image, a directory or an unreadable one, and never names what a
  directory holds (before: 'image file not found' vs 'not an image file PIL can read', and a frame directory's
  first entry in the message)."""
  root, outside = media
  seen = set()
  for source in _outside_sources(root, outside):
    for load in (lambda s: load_image(s, media_root=root), lambda s: load_video_frames(s, media_root=root),
                 lambda s: preprocess_image(s, media_root=root), lambda s: preprocess_video(s, media_root=root),
                 lambda s: preprocess_video([root / "in.png", s], media_root=root)):
      with pytest.raises(InputError) as e:
        load(source)
      message = str(e.value)
      assert OUTSIDE_ROOT in message, (source, message)
      named, said = message[:message.index(OUTSIDE_ROOT)], message[message.index(OUTSIDE_ROOT):]
      assert named.removeprefix("frame 1: ").removesuffix(": ") in (source, f"{source[:48]}... ({len(source)} "
                                                                    "characters)"), (source, message)
      assert "id_rsa" not in message and "\n" not in message
      seen.add(said)
  assert seen == {OUTSIDE_ROOT + "."}, seen


def test_local_media_inside_the_root_load_and_keep_their_messages(media):
  """Inside media_root, paths (relative ones from the root), file:// URLs and frame directories load as without a
  root; a broken file keeps its own message, but a frame directory's entries are named by position, never by name,
  and an entry that links out of the root is refused like any path outside it."""
  root, _ = media
  want = preprocess_image(root / "in.png").patches
  for source in ("in.png", str(root / "in.png"), f"file://{root}/in.png", root / "frames" / ".." / "in.png"):
    np.testing.assert_array_equal(preprocess_image(source, media_root=root).patches, want, err_msg=str(source))
  frames = preprocess_video(root / "frames")
  np.testing.assert_array_equal(preprocess_video("frames", media_root=root).patches, frames.patches)
  with pytest.raises(InputError, match="missing.png: image file not found"):
    load_image("missing.png", media_root=root)
  (root / "frames" / "001.png").write_text("not an image either")
  with pytest.raises(InputError) as e:
    load_video_frames(root / "frames", media_root=root)
  assert "frame 1 (in name order): not an image file PIL can read" in str(e.value)
  assert "001.png" not in str(e.value)
  (root / "frames" / "001.png").unlink()
  (root / "frames" / "002.png").symlink_to(media[1] / "secret.png")
  with pytest.raises(InputError) as e:
    load_video_frames(root / "frames", media_root=root)
  assert "frame 1 (in name order)" in str(e.value) and OUTSIDE_ROOT in str(e.value)
  assert "002" not in str(e.value) and "secret" not in str(e.value)
