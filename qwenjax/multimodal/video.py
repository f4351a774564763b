"""Video files for Qwen2.5-VL: decoding with PyAV and Qwen's rules for which frames to keep.

    info = probe_video("clip.mp4")                      # VideoInfo(total_frames=90, video_fps=30.0)
    indices = sample_frame_indices(info.total_frames, info.video_fps)   # [0, 29, 60, 89, ...] at 2 fps
    frames = decode_frames("clip.mp4", indices)         # RGB PIL images, in index order

`processing.preprocess_video` puts these together (sampling, the per-frame pixel budget, patches); use it unless
you need the frames themselves. The sampling follows qwen-vl-utils 0.0.14 (QwenLM/Qwen3-VL repository, the same
rules as the Qwen2.5-VL releases), as its decord and torchcodec readers apply them: a frame count and an average
frame rate from the file, `smart_nframes`, then evenly spaced frame indices. A video is any container and codec
FFmpeg reads (mp4, webm, mkv, mov, avi; h264, hevc, vp8, vp9, av1, mpeg4): a path, a `file://` URL or a
`data:video/<type>;base64,` URL. Anything missing, unreadable, truncated or without frames is an InputError that
names the source. Rotation metadata is not applied (qwen-vl-utils' readers ignore it too).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import io
import math
import os
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qwenjax._errors import InputError

# qwen-vl-utils' frame-sampling constants (vision_process.py).
FRAME_FACTOR = 2  # sampled frame counts are multiples of this (the temporal patch)
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

VideoSource = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What sampling needs to know about a video file: its frame count and average frame rate."""

  total_frames: int
  video_fps: float


def describe(source: Any) -> str:
  """A short name for a video source in error messages (data URLs cut to their start)."""
  text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
  return f"{text[:48]}... ({len(text)} characters)" if len(text) > 80 else text


# What a request is told for any local path outside the media root: the same words whatever the path is (missing,
# not an image, a directory, unreadable), so that requests cannot probe the file system through their errors.
OUTSIDE_ROOT = "outside the media root (Engine media_root / --media_root): no file there is read"


def local_path(source: str | os.PathLike, media_root: str | os.PathLike | None = None) -> str:
  """The file a local path or `file://` URL names (a file URL's percent-escapes decoded when only the decoded
  spelling exists). With media_root: relative paths are taken from it, and the result is the real path (every
  symlink resolved), which must lie inside media_root's real path; else an InputError that says only that, never
  whether or what the file is. Without one: the path as given (relative to the working directory)."""
  text = os.fspath(source)
  if not isinstance(text, str):
    raise InputError(f"{describe(source)}: a local path must be text, not bytes.")
  url = text.startswith("file://")
  text = text[len("file://"):] if url else text
  spellings = [text] + ([urllib.parse.unquote(text)] if url and urllib.parse.unquote(text) != text else [])
  if media_root is None:
    return next((s for s in spellings if os.path.exists(s)), text)
  root = os.path.realpath(media_root)
  try:
    real = [os.path.realpath(os.path.join(root, s)) for s in spellings]
    inside = all(os.path.commonpath([root, r]) == root for r in real)  # every spelling: no probing by escapes
  except ValueError:  # a NUL byte
    inside = False
  if not inside:
    raise InputError(f"{describe(source)}: {OUTSIDE_ROOT}.")
  return next((r for r in real if os.path.exists(r)), real[0])


def inside_root(path: str, media_root: str | os.PathLike | None) -> bool:
  """Whether `path`'s real path lies inside media_root's (always, without one)."""
  if media_root is None:
    return True
  root = os.path.realpath(media_root)
  return os.path.commonpath([root, os.path.realpath(path)]) == root


def _openable(source: VideoSource) -> str | io.BytesIO:
  """The path or in-memory file PyAV opens for `source`; InputError for a URL form that is not supported."""
  if not isinstance(source, (str, os.PathLike)):
    raise InputError(f"a video must be a path, a file:// or data: URL, a list of frames or a frame directory; got "
                     f"{type(source).__name__}.")
  text = os.fspath(source)
  if not isinstance(text, str):
    raise InputError(f"{describe(source)}: a video path must be text, not bytes.")
  if text.startswith(("http://", "https://")):
    raise InputError(f"{describe(source)}: remote videos are not fetched; download the video and pass its path.")
  if text.startswith("data:"):
    header, _, payload = text.partition(",")
    if not (header.startswith("data:video/") and header.endswith(";base64")):
      raise InputError(f"{describe(source)}: a video data URL must start 'data:video/<type>;base64,'.")
    try:
      return io.BytesIO(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError) as e:
      raise InputError(f"{describe(source)}: the base64 payload does not decode ({e}).") from None
  text = local_path(text)
  if os.path.isdir(text):
    raise InputError(f"{describe(source)}: is a directory, not a video file.")
  if not os.path.exists(text):
    raise InputError(f"{describe(source)}: video file not found.")
  return text


def _ffmpeg_reason(error: Exception) -> str:
  """FFmpeg's own words for an error, without PyAV's '[Errno N]' prefix and without repeating the file name."""
  reason = getattr(error, "strerror", None) or " ".join(str(error).split()) or type(error).__name__
  where = getattr(error, "filename", None)
  return f"{reason} in {where}" if isinstance(where, str) and where.endswith("()") else reason


class _Container:
  """A PyAV input container and its first real video stream (not cover art), closed on exit; every FFmpeg error
  inside the block becomes an InputError naming the source."""

  def __init__(self, source: VideoSource):
    self.source, self.name = source, describe(source)

  def __enter__(self):
    try:
      import av  # pylint: disable=g-import-not-at-top  (PyAV is needed only for video files)
    except ImportError:
      raise InputError(f"{self.name}: decoding video files needs PyAV (pip install av).") from None
    self._av = av
    try:
      self.container = av.open(_openable(self.source), "r", metadata_errors="ignore")
    except av.FFmpegError as e:
      raise InputError(f"{self.name}: not a video file FFmpeg can read ({_ffmpeg_reason(e)}).") from None
    streams = [s for s in self.container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
      self.container.close()
      kinds = sorted({s.type for s in self.container.streams}) or ["no streams"]
      raise InputError(f"{self.name}: holds no video stream (only {', '.join(kinds)}).")
    self.stream = streams[0]
    return self

  def __exit__(self, kind, error, traceback):
    self.container.close()
    if error is not None and isinstance(error, self._av.FFmpegError):
      raise InputError(f"{self.name}: cannot decode the video ({_ffmpeg_reason(error)}).") from None
    return False


def probe_video(source: VideoSource) -> VideoInfo:
  """A video file's frame count and average frame rate, as decord's `len(vr)` and `get_avg_fps()` give them.

  The count is the container's (mp4, mov) when it has one; webm and mkv hold none, so their video packets are
  counted (demuxing only, no decoding). The rate is the stream's average, else FFmpeg's guess, else frames over
  duration. No frames, or no rate, is an InputError.
  """
  with _Container(source) as c:
    stream = c.stream
    total = stream.frames
    if total <= 0:
      total = sum(1 for packet in c.container.demux(stream) if packet.size)
    if total <= 0:
      raise InputError(f"{c.name}: the video stream holds no frames.")
    rate = stream.average_rate or stream.guessed_rate
    if not rate and stream.duration and stream.time_base:
      rate = total / float(stream.duration * stream.time_base)
    if not rate or not float(rate) > 0:
      raise InputError(f"{c.name}: the video stream has no frame rate.")
    return VideoInfo(total, float(rate))


# Sampled frames at least this far apart on average make a first demux pass (reading the file, not decoding it)
# worth its cost: decoding can then jump from keyframe to keyframe.
_SEEK_GAP = 32


class _NoSeek(Exception):
  """The packets' timestamps cannot place the wanted frames: decode straight through instead."""


def decode_frames(source: VideoSource, indices: Sequence[int], convert: Callable[[Any], Any] | None = None,
                  total_frames: int | None = None) -> list[Any]:
  """The frames at `indices` (increasing, as `sample_frame_indices` gives them) as RGB PIL images, or as
  `convert(image)` of each: pass a resize there and a long video never holds more than its sampled frames at
  the size the model takes.

  Frames are counted in presentation order from the first (the numbering decord and torchcodec use). Dense
  indices (2 fps of a short clip) are decoded in one pass that stops after the last index. Sparse ones (on
  average `_SEEK_GAP` frames apart or more: a long video capped at 768 frames, a low fps, a small nframes) first
  read every packet's timestamp, then jump to the last keyframe before each wanted frame that lies past what is
  already decoded; the frames are the same (decoding from a keyframe needs nothing before it). A decode error,
  or a stream that ends before the last index (`total_frames`, the count the file declared, goes into the
  message), is an InputError naming the source: the file is truncated or corrupt.
  """
  wanted = [int(i) for i in indices]
  if any(b < a for a, b in zip(wanted, wanted[1:])) or (wanted and wanted[0] < 0):
    raise InputError(f"frame indices must be non-negative and increasing, got {wanted[:8]}.")
  convert = convert or (lambda image: image)
  if len(wanted) > 1 and (wanted[-1] - wanted[0]) / (len(wanted) - 1) >= _SEEK_GAP:
    try:
      return _decode_seeking(source, wanted, convert)
    except _NoSeek:
      pass
  return _decode_straight(source, wanted, convert, total_frames)


def _decode_straight(source: VideoSource, wanted: list[int], convert: Callable[[Any], Any],
                     total_frames: int | None) -> list[Any]:
  """decode_frames in one pass from the first frame, stopping after the last wanted one."""
  frames, decoded = [], 0
  with _Container(source) as c:
    c.stream.thread_type = "AUTO"
    for frame in c.container.decode(c.stream):
      while len(frames) < len(wanted) and wanted[len(frames)] == decoded:
        frames.append(convert(frame.to_image()))  # RGB, converted from the stream's pixel format by swscale
      decoded += 1
      if len(frames) == len(wanted):
        break
  if len(frames) < len(wanted):
    declared = "" if total_frames is None else f" of the {total_frames} it declares"
    raise InputError(f"{c.name}: the video stream ends after {decoded} frames{declared}, before frame "
                     f"{wanted[len(frames)]}: the file is truncated or corrupt.")
  return frames


def _decode_seeking(source: VideoSource, wanted: list[int], convert: Callable[[Any], Any]) -> list[Any]:
  """decode_frames by timestamps: frame i is the i-th smallest packet timestamp; each wanted frame is decoded from
  the last keyframe at or before it, or onwards from the previous one when no keyframe lies between. _NoSeek when
  a timestamp is missing or a decoded frame does not land where the packets said."""
  with _Container(source) as c:
    stream = c.stream
    packets = [(p.pts, p.is_keyframe) for p in c.container.demux(stream) if p.size and not p.is_discard]
    if not packets or any(pts is None for pts, _ in packets) or len(packets) <= wanted[-1]:
      raise _NoSeek()
    order = sorted(pts for pts, _ in packets)
    keys = sorted(pts for pts, key in packets if key)
    if not keys or keys[0] != order[0]:
      raise _NoSeek()
    stream.thread_type = "AUTO"
    frames, decoder, position = [], None, None
    for target in (order[i] for i in wanted):
      key = keys[bisect.bisect_right(keys, target) - 1]
      if decoder is None or key > position:
        c.container.seek(key, stream=stream, backward=True)  # flushes the decoder too
        decoder = c.container.decode(stream)
      for frame in decoder:
        position = frame.pts
        if position is None or position > target:
          raise _NoSeek()
        if position == target:
          frames.append(convert(frame.to_image()))
          break
      else:
        raise _NoSeek()  # the stream ended early: the straight decode says where
    return frames


def frame_range(total_frames: int, video_fps: float, video_start: float | None = None,
                video_end: float | None = None) -> tuple[int, int]:
  """(first, last) frame of the clip between video_start and video_end seconds, qwen-vl-utils'
  `calculate_video_frame_range`: times clamped to the video, first = ceil(start · fps), last = min(floor(end ·
  fps), total - 1). The whole video without either; a clip of fewer than 2 frames is an InputError."""
  if total_frames < 1 or not video_fps > 0:
    raise InputError(f"a video needs frames and a positive frame rate, got {total_frames} frames at {video_fps} fps.")
  if video_start is None and video_end is None:
    return 0, total_frames - 1
  duration = total_frames / video_fps
  first = 0 if video_start is None else math.ceil(max(0.0, min(video_start, duration)) * video_fps)
  last = total_frames - 1
  if video_end is not None:
    last = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
  if first >= last:
    raise InputError(f"video_start {video_start} and video_end {video_end} leave no clip in a video of "
                     f"{duration:.2f} s ({total_frames} frames at {video_fps:g} fps).")
  return first, last


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = FPS, *, nframes: int | None = None,
                         min_frames: int = FPS_MIN_FRAMES, max_frames: int | None = None,
                         frame_factor: int = FRAME_FACTOR, video_start: float | None = None,
                         video_end: float | None = None) -> np.ndarray:
  """Indices of the frames to keep from a decoded video: qwen-vl-utils' `smart_nframes` and its sampling.

  The clip is the whole video, or the frames between video_start and video_end seconds (`frame_range`), of
  `frames` frames. The count is `nframes` rounded to a multiple of frame_factor, or else frames / video_fps · fps
  clamped to [ceil(min_frames), floor(max_frames)] (max_frames defaults to min(768, frames)) and to frames,
  then floored to a multiple of frame_factor. The indices are qwen-vl-utils'
  `torch.linspace(first, last, n).round()`, reproduced in float32 (round half to even) and equal to torch's on
  CPU even for long videos, where float32 rounding moves an index. The rate the frames were sampled at is
  n / frames · video_fps (`sampled_fps`).
  """
  first, last = frame_range(total_frames, video_fps, video_start, video_end)
  frames = last - first + 1
  if nframes is not None:
    n = round(nframes / frame_factor) * frame_factor
  else:
    lo = math.ceil(min_frames / frame_factor) * frame_factor
    hi = math.floor((min(FPS_MAX_FRAMES, frames) if max_frames is None else max_frames) / frame_factor)
    hi *= frame_factor
    n = min(min(max(frames / video_fps * fps, lo), hi), frames)
    n = math.floor(n / frame_factor) * frame_factor
  if not frame_factor <= n <= frames:
    raise InputError(f"cannot sample {n} frames from a video of {frames} (need {frame_factor} to {frames}).")
  return _torch_linspace_f32(first, last, n).round().astype(np.int64)


def sampled_fps(num_sampled: int, clip_frames: int, video_fps: float) -> float:
  """The rate `num_sampled` evenly spaced frames of a clip of `clip_frames` at `video_fps` stand for
  (qwen-vl-utils' `sample_fps`): it sets the video's time positions, second_per_grid_t = Tp / sampled_fps."""
  return num_sampled / max(clip_frames, 1e-6) * video_fps


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace in float32 as ATen computes it on CPU: the first half is start + step·i, the rest
  end - step·(steps - 1 - i), each one fused multiply-add (one rounding), with step rounded to float32."""
  if steps == 1:
    return np.array([start], np.float32)
  step = np.float64((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  up = np.float64(np.float32(start)) + step * i  # exact in float64 for these magnitudes; rounded once below
  down = np.float64(np.float32(end)) - step * (steps - 1 - i)
  return np.where(i < steps // 2, up, down).astype(np.float32)
