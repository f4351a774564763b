"""Qwen2.5-VL image and video preprocessing in numpy and Pillow, matching transformers' Qwen2-VL processor.

An image, a video file or a list of video frames becomes rows of C·Tp·P·P = 1176 float32 values for the vision
tower:

    cfg = ImageProcessorConfig.from_file("Qwen2.5-VL-7B-Instruct/preprocessor_config.json")
    image = preprocess_image("cat.png", cfg)     # a path, file:// or data: URL, or a PIL image
    image.patches.shape                          # [gt·gh·gw, 1176]; image.grid_thw == (1, gh, gw)
    image.num_tokens                             # gt·gh·gw / 4 <|image_pad|> tokens in the prompt
    video = preprocess_video("clip.mp4", cfg)    # sampled at 2 frames per second (Qwen's rules), PyAV-decoded
    video = preprocess_video("frames/", cfg, fps=2.0)   # a folder of frames, or a list of images

Images follow transformers' `Qwen2VLImageProcessorPil` (transformers 5.24) op for op: convert to RGB,
compositing transparency onto white (`image_transforms.convert_to_rgb`); `smart_resize` to multiples of
patch_size·merge_size; resize the uint8 image with PIL (bicubic); rescale in float64 (x · 1/255) and cast
to float32; normalise in float32, (x - mean) / std; patchify. The result equals transformers' to the bit.

Letters in shape comments: T frames, H, W pixels, C channels (3), Tp temporal_patch_size, P patch_size,
M merge_size, gt = T/Tp, gh = H/P, gw = W/P. Rows are ordered (gt, gh/M, gw/M, M, M), so four consecutive
rows form one 2×2 merge unit; a row holds (C, Tp, P, P).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from qwenjax._errors import ConfigError, InputError
from qwenjax.config import read_field, read_json
from qwenjax.multimodal import video as video_files
from qwenjax.multimodal.video import FPS, FPS_MAX_FRAMES, FPS_MIN_FRAMES, sample_frame_indices  # noqa: F401

# Qwen's released preprocessor_config.json (Qwen2.5-VL 3B…72B), also qwen-vl-utils' image MIN/MAX_PIXELS.
# transformers' class defaults differ (max_pixels 28·28·1280); the released values are what Qwen runs.
MIN_PIXELS = 3136  # 56·56 = 4 tokens of 28·28
MAX_PIXELS = 12845056  # 16384·28·28
MAX_ASPECT_RATIO = 200
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# qwen-vl-utils' video constants (vision_process.py, for 28-pixel tokens).
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9  # 90% of a 128K-token context, as qwen-vl-utils sets it

ImageSource = str | os.PathLike | Image.Image


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """What `preprocessor_config.json` fixes about turning pixels into patches; defaults are Qwen's released values."""

  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = MIN_PIXELS
  max_pixels: int = MAX_PIXELS
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  resample: int = 3  # PIL.Image.Resampling.BICUBIC
  rescale_factor: float = 1 / 255

  def __post_init__(self):
    for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}.")
    if self.max_pixels < self.min_pixels:
      raise ConfigError(f"max_pixels ({self.max_pixels}) is below min_pixels ({self.min_pixels}).")
    if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(self.image_std):
      raise ConfigError(f"image_mean and image_std must hold 3 values, std non-zero; got {self.image_mean} and "
                        f"{self.image_std}.")
    if self.resample not in tuple(Image.Resampling):
      raise ConfigError(f"resample {self.resample} is not a PIL resampling filter (0-5; 3 is bicubic).")

  @property
  def factor(self) -> int:
    """Side of one LLM token in pixels (patch_size · merge_size): resized sides are multiples of it."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Values in one patch row: C · Tp · P · P."""
    return 3 * self.temporal_patch_size * self.patch_size ** 2

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str = "preprocessor_config.json") -> ImageProcessorConfig:
    """Reads a `preprocessor_config.json` dict: `min_pixels`/`max_pixels` as Qwen ships them, or the newer
    `size: {"shortest_edge", "longest_edge"}` (top-level keys win, as in transformers). Other keys are ignored."""
    if not isinstance(d, Mapping):
      raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}.")
    size = read_field(d, "size", dict, source, {})

    def integer(key, *size_keys):  # top-level key, else the first of size_keys that is set
      if d.get(key) is None and (in_size := next((k for k in size_keys if size.get(k) is not None), None)):
        return read_field(size, in_size, int, source, within="size")
      return read_field(d, key, int, source, None)

    kw = {
        "patch_size": integer("patch_size"),
        "temporal_patch_size": integer("temporal_patch_size"),
        "merge_size": integer("merge_size"),
        "min_pixels": integer("min_pixels", "shortest_edge", "min_pixels"),
        "max_pixels": integer("max_pixels", "longest_edge", "max_pixels"),
        "resample": integer("resample"),
        "image_mean": read_field(d, "image_mean", list[float], source, None),
        "image_std": read_field(d, "image_std", list[float], source, None),
        "rescale_factor": read_field(d, "rescale_factor", float, source, None),
    }
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> ImageProcessorConfig:
    return cls.from_dict(read_json(path), source=str(path))


@dataclasses.dataclass(frozen=True, eq=False)
class VisualInput:
  """One preprocessed image or video, ready for the vision tower."""

  patches: np.ndarray  # [gt·gh·gw, C·Tp·P·P] float32
  grid_thw: tuple[int, int, int]  # (gt, gh, gw) in patches
  second_per_grid_t: float | None  # seconds spanned by one temporal patch (videos); None for images
  kind: str  # "image" or "video"
  merge_size: int = 2

  @property
  def num_tokens(self) -> int:
    """LLM tokens (<|image_pad|> or <|video_pad|>) this input takes: gt·gh·gw / M²."""
    t, h, w = self.grid_thw
    return t * h * w // self.merge_size ** 2


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """(height, width) rounded to multiples of `factor` with height·width within [min_pixels, max_pixels].

  Qwen's rule, as in transformers' `smart_resize`: round each side to the nearest multiple (Python's
  round, half to even); over max_pixels, shrink both by β = √(hw/max) and floor (never below one factor);
  under min_pixels, grow both by β = √(min/hw) and ceil. An aspect ratio over 200 is an InputError.
  """
  if min(height, width) < 1:
    raise InputError(f"image of {height}x{width} pixels is empty.")
  ratio = max(height, width) / min(height, width)
  if ratio > MAX_ASPECT_RATIO:
    raise InputError(f"image of {height}x{width} pixels has aspect ratio {ratio:.1f}, over Qwen's limit of "
                     f"{MAX_ASPECT_RATIO}.")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _describe(source: Any) -> str:
  """A short name for an image source in error messages (data URLs cut to their start)."""
  if isinstance(source, Image.Image):
    return f"PIL image ({source.mode}, {source.width}x{source.height})"
  text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
  if len(text) > 80:
    return f"{text[:48]}... ({len(text)} characters)"
  return text


def _to_rgb(image: Image.Image) -> Image.Image:
  """transformers' `convert_to_rgb`: transparency (an A band or a transparency key) is composited onto white."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")
  return image.convert("RGB")


def load_image(source: ImageSource, *, media_root: str | os.PathLike | None = None) -> Image.Image:
  """An RGB PIL image from a path, a `file://` URL, a `data:image/...;base64,` URL, or a PIL image.

  Modes convert as transformers converts them (RGBA, LA and palette transparency composited onto white;
  L, P, CMYK, ... through PIL's convert). Like qwen-vl-utils' `fetch_image`, EXIF orientation is not applied.
  A missing, unreadable or truncated file, or one that is not an image, is an InputError naming the source.
  media_root: a local path must lie inside this directory, symlinks resolved (relative paths are taken from it);
  one outside is an InputError that says only that (`video.local_path`). None: any path (the caller's own).
  """
  return _load_image(source, _describe(source), media_root)


def _load_image(source: ImageSource, name: str, media_root: str | os.PathLike | None) -> Image.Image:
  """load_image, its errors naming the source as `name`."""
  try:
    if isinstance(source, Image.Image):
      return _to_rgb(source)
    if not isinstance(source, (str, os.PathLike)):
      raise InputError(f"an image must be a path, a file:// or data: URL, or a PIL image; got {type(source).__name__}.")
    text = os.fspath(source)
    if isinstance(source, str) and text.startswith(("http://", "https://")):
      raise InputError(f"{name}: remote images are not fetched; download the image and pass its path.")
    if isinstance(source, str) and text.startswith("data:"):
      header, _, payload = text.partition(",")
      if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise InputError(f"{name}: a data URL must start 'data:image/<type>;base64,'.")
      try:
        data = base64.b64decode(payload)
      except (binascii.Error, ValueError) as e:
        raise InputError(f"{name}: the base64 payload does not decode ({e}).") from None
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        return _to_rgb(image)
    try:
      text = video_files.local_path(source, media_root)
    except InputError as e:  # outside the root: the same words for every path, under the name given
      raise InputError(f"{name}: {str(e).partition(': ')[2]}") from None
    with Image.open(text) as image:
      image.load()  # decode now, so a truncated file fails here
      return _to_rgb(image)
  except FileNotFoundError:
    raise InputError(f"{name}: image file not found.") from None
  except IsADirectoryError:
    raise InputError(f"{name}: is a directory, not an image file.") from None
  except Image.UnidentifiedImageError:
    raise InputError(f"{name}: not an image file PIL can read.") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    raise InputError(f"{name}: cannot decode the image ({reason}).") from None


def _normalize(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
  """[H, W, C] float32: uint8 pixels rescaled in float64 then cast, normalised in float32 (transformers' order)."""
  x = (np.asarray(image, dtype=np.uint8).astype(np.float64) * cfg.rescale_factor).astype(np.float32)
  mean = np.asarray(cfg.image_mean, dtype=np.float32)
  std = np.asarray(cfg.image_std, dtype=np.float32)
  return (x - mean) / std


def _patchify(frames: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
  """[T, H, W, C] -> ([gt·gh·gw, C·Tp·P·P], (gt, gh, gw)); T is padded to a multiple of Tp with the last frame."""
  tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
  if frames.shape[0] % tp:
    frames = np.concatenate([frames, np.repeat(frames[-1:], tp - frames.shape[0] % tp, axis=0)])
  t, h, w, c = frames.shape
  gt, gh, gw = t // tp, h // p, w // p
  x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
  x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # [gt, gh/M, gw/M, M, M, C, Tp, P, P]
  return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def preprocess_image(image: ImageSource, cfg: ImageProcessorConfig = ImageProcessorConfig(), *,
                     media_root: str | os.PathLike | None = None) -> VisualInput:
  """One image as patches, equal to transformers' Qwen2-VL image processor's `pixel_values` and `image_grid_thw`.
  media_root: as in `load_image`."""
  rgb = load_image(image, media_root=media_root)
  try:
    height, width = smart_resize(rgb.height, rgb.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
  except InputError as e:
    raise InputError(f"{_describe(image)}: {e}") from None
  pixels = _normalize(rgb.resize((width, height), resample=cfg.resample), cfg)  # [H, W, C]
  patches, grid = _patchify(pixels[None], cfg)
  return VisualInput(patches, grid, None, "image", cfg.merge_size)


def load_video_frames(source: str | os.PathLike | Sequence[ImageSource], *,
                      media_root: str | os.PathLike | None = None) -> list[Image.Image]:
  """RGB frames from a list of images (paths, URLs, PIL images) or a directory of frame images.

  A directory's non-hidden files are read in name order (plain string sort: zero-pad frame numbers);
  a file there that is not an image is an InputError, never skipped, naming it by position (never by name: an
  error lists no directory). Video files are not decoded here (`preprocess_video` decodes them). media_root: as in
  `load_image`, for the directory, each of its entries, and each frame of a list.
  """
  if isinstance(source, (str, os.PathLike)):
    name = _describe(source)
    path = pathlib.Path(video_files.local_path(source, media_root))
    if not path.exists():
      raise InputError(f"{name}: no such frame directory.")
    if not path.is_dir():
      raise InputError(f"{name}: load_video_frames takes a list of frames or a directory of frame "
                       "images (video files are not decoded here: preprocess_video decodes them).")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    for i, entry in enumerate(entries):
      if not video_files.inside_root(str(entry), media_root):
        raise InputError(f"{name}: frame {i} (in name order): {video_files.OUTSIDE_ROOT}.")
    files = [p for p in entries if p.is_file()]
    if not files:
      raise InputError(f"{name}: the frame directory holds no files.")
    return [_load_image(f, f"{name}: frame {i} (in name order)", media_root) for i, f in enumerate(files)]
  if isinstance(source, Image.Image) or not isinstance(source, Iterable):
    raise InputError(f"a video must be a list of frames or a directory of frame images, got {type(source).__name__}.")
  frames = [_load_image(f, f"frame {i}: {_describe(f)}", media_root) for i, f in enumerate(source)]
  if not frames:
    raise InputError("a video needs at least one frame; got an empty list.")
  return frames


def preprocess_video(video: str | os.PathLike | Sequence[ImageSource] | Mapping[str, Any],
                     cfg: ImageProcessorConfig = ImageProcessorConfig(), fps: float = FPS, *,
                     min_pixels: int | None = None, max_pixels: int | None = None,
                     total_pixels: float = VIDEO_TOTAL_PIXELS, nframes: int | None = None,
                     min_frames: int = FPS_MIN_FRAMES, max_frames: int | None = None,
                     video_start: float | None = None, video_end: float | None = None,
                     media_root: str | os.PathLike | None = None) -> VisualInput:
  """A video as patches, the way qwen-vl-utils and transformers take it: a video file, or frames (a list or a
  directory), or a qwen-vl-utils video element, {"video": file or frames, "fps": 1.0, "max_pixels": ..., ...}
  (a content part as Qwen's examples write it), whose keys set the keyword arguments of the same names.

  Follows qwen-vl-utils' `fetch_video` as its current version (0.0.14, QwenLM/Qwen3-VL repository) has it,
  called with 14-pixel patches for Qwen2.5-VL, then transformers' video processor. A video FILE (a path that is
  not a directory, a file:// or data:video/ URL; decoded with PyAV, `qwenjax.multimodal.video`):
  1. T frames are sampled at `fps` (2) per second, T even and within [min_frames, max_frames] (4, 768), or
     exactly `nframes`; video_start / video_end (seconds) cut the clip first (`video.sample_frame_indices`);
  2. each frame is resized once under the video budget (step 3 below) from its decoded size;
  and `fps` is the sampling rate asked for: the frames stand for T / clip frames · the file's rate, which sets
  second_per_grid_t = Tp / that rate. FRAMES (nframes, min_frames, max_frames, video_start, video_end unused):
  1. every frame is an image (`fetch_image`): RGB, resized with smart_resize under min_pixels/max_pixels
     when given, else the image defaults 4·28² and 16384·28²;
  2. frames are not subsampled: the list is padded with its last frame to a multiple of Tp (2);
  and `fps` is the rate the frames were sampled at; it only sets second_per_grid_t = Tp / fps. Then both:
  3. the frames are resized under the video budget: smart_resize with min = min_pixels or 128·28²,
     max = max(min(768·28², total_pixels / T · 2), int(min · 1.05)), lowered to max_pixels if given;
  4. transformers' processor applies smart_resize with cfg's min/max_pixels (a no-op for sizes from step 3
     within them), rescales, normalises and patchifies T frames into T/2 temporal patches.

  Differences from the reference: every frame gets the first frame's sizes (qwen-vl-utils fails on frames
  of different sizes); resizes are PIL bicubic on uint8 where qwen-vl-utils' step 3 uses torchvision's
  antialiased bicubic on uint8 (its kernel comes from Pillow-SIMD; values may differ by a grey level
  where step 3 changes the size, and torchvision keeps the resized values unrounded); rescale and normalise
  are the image processor's float32 ops, not the torchvision video processor's fused
  (x - 255·mean) / (255·std) (differences up to 2.4e-7). Decoded colours are FFmpeg's (swscale) YUV to RGB,
  as with decord and torchcodec.

  media_root: as in `load_image`, for a video file, a frame directory and its entries, and each frame of a list.
  """
  if isinstance(video, Mapping):
    source, options = _video_element(video)
    return preprocess_video(source, cfg, **options, media_root=media_root)
  remote = ("data:", "http://", "https://")
  if media_root is not None and isinstance(video, (str, os.PathLike)) and not str(video).startswith(remote):
    video = video_files.local_path(video, media_root)  # the real path inside the root, or the one refusal
  if not fps > 0:
    raise InputError(f"fps must be positive, got {fps}.")
  tp = cfg.temporal_patch_size
  if _is_video_file(video):
    name = video_files.describe(video)
    info = video_files.probe_video(video)
    try:
      first, last = video_files.frame_range(info.total_frames, info.video_fps, video_start, video_end)
      indices = video_files.sample_frame_indices(info.total_frames, info.video_fps, fps, nframes=nframes,
                                                 min_frames=min_frames, max_frames=max_frames,
                                                 frame_factor=tp, video_start=video_start, video_end=video_end)
    except InputError as e:
      raise InputError(f"{name}: {e}") from None
    sample_fps = video_files.sampled_fps(len(indices), last - first + 1, info.video_fps)
    sizes: list[tuple[int, int]] = []  # [video budget, processor] sizes, set from the first decoded frame

    def convert(image: Image.Image) -> np.ndarray:
      if not sizes:
        sizes.extend(_video_sizes((image.height, image.width), len(indices), cfg, name, min_pixels, max_pixels,
                                  total_pixels))
      return _normalize(_resize_through(image, sizes, cfg), cfg)

    pixels = np.stack(video_files.decode_frames(video, indices, convert, info.total_frames))  # [T, H, W, C]
    patches, grid = _patchify(pixels, cfg)
    return VisualInput(patches, grid, tp / sample_fps, "video", cfg.merge_size)

  file_only = [name for name, value, default in (("nframes", nframes, None), ("min_frames", min_frames, FPS_MIN_FRAMES),
                                                  ("max_frames", max_frames, None), ("video_start", video_start, None),
                                                  ("video_end", video_end, None)) if value != default]
  if file_only:
    raise InputError(f"{', '.join(file_only)}: sample video files; a video given as frames keeps every frame.")
  images = load_video_frames(video, media_root=media_root)
  images += [images[-1]] * (-len(images) % tp)
  first = images[0]
  try:
    size1 = smart_resize(first.height, first.width, cfg.factor, min_pixels or MIN_PIXELS, max_pixels or MAX_PIXELS)
  except InputError as e:
    raise InputError(f"video frames: {e}") from None
  sizes = [size1, *_video_sizes(size1, len(images), cfg, "video frames", min_pixels, max_pixels, total_pixels)]
  pixels = np.stack([_normalize(_resize_through(image, sizes, cfg), cfg) for image in images])  # [T, H, W, C]
  patches, grid = _patchify(pixels, cfg)
  return VisualInput(patches, grid, tp / fps, "video", cfg.merge_size)


# qwen-vl-utils' video element keys that preprocess_video takes, with the kind of number each holds.
_VIDEO_OPTIONS = {"fps": float, "nframes": int, "min_frames": int, "max_frames": int, "min_pixels": int,
                  "max_pixels": int, "total_pixels": float, "video_start": float, "video_end": float}


def _video_element(element: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(source, preprocess_video keyword arguments) of a qwen-vl-utils video element; InputError naming the key for
  an unknown key, a value that is not a non-negative number of its kind, or fps and nframes together."""
  if element.get("video") is None:
    raise InputError("a video element needs {'video': video file, [frames] or a frame directory}.")
  unknown = sorted(set(element) - set(_VIDEO_OPTIONS) - {"type", "video"})
  if unknown:
    raise InputError(f"unknown video option {unknown[0]!r} (expected {', '.join(_VIDEO_OPTIONS)}).")
  options = {k: v for k, v in element.items() if k in _VIDEO_OPTIONS and v is not None}
  for key, value in options.items():
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if not number or _VIDEO_OPTIONS[key] is int and not float(value).is_integer():
      kind = "integer" if _VIDEO_OPTIONS[key] is int else "number"
      raise InputError(f"video option {key!r} must be a non-negative {kind}, got {value!r}.")
    options[key] = _VIDEO_OPTIONS[key](value)
  if "fps" in options and "nframes" in options:
    raise InputError("video options 'fps' and 'nframes' exclude each other (qwen-vl-utils takes one or the other).")
  return element["video"], options


def _is_video_file(video: Any) -> bool:
  """Whether preprocess_video takes `video` as a video file: text or a path that is not a directory."""
  return isinstance(video, (str, os.PathLike)) and not os.path.isdir(video)


def _video_sizes(size: tuple[int, int], num_frames: int, cfg: ImageProcessorConfig, name: str,
                 min_pixels: int | None, max_pixels: int | None, total_pixels: float) -> list[tuple[int, int]]:
  """[(H, W) under qwen-vl-utils' video budget for num_frames frames of `size`, (H, W) after transformers'
  processor], steps 3 and 4 of preprocess_video."""
  video_min = min_pixels or VIDEO_MIN_PIXELS
  video_max = max(min(VIDEO_MAX_PIXELS, total_pixels / num_frames * video_files.FRAME_FACTOR),
                  int(video_min * 1.05))
  if max_pixels is not None:
    video_max = min(max_pixels, video_max)
  if video_max < video_min:  # qwen-vl-utils 0.0.14's smart_resize asserts this
    raise InputError(f"{name}: max_pixels {max_pixels} is below the frames' min_pixels {video_min}.")
  try:
    budget = smart_resize(*size, cfg.factor, video_min, video_max)
    return [budget, smart_resize(*budget, cfg.factor, cfg.min_pixels, cfg.max_pixels)]
  except InputError as e:
    raise InputError(f"{name}: {e}") from None


def _resize_through(image: Image.Image, sizes: Sequence[tuple[int, int]], cfg: ImageProcessorConfig) -> Image.Image:
  """`image` resized to each (H, W) of `sizes` in turn (PIL, cfg's filter), skipping those it already has."""
  for height, width in sizes:
    if image.size != (width, height):
      image = image.resize((width, height), resample=cfg.resample)
  return image
