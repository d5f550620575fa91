"""Pictures and clips on disk: PNG grids and contact sheets, GIF, MP4 and npz.

The one writer behind `sample`, `evaluate` and the quickstart report. Every
function takes uint8 arrays with a channel axis (1 or 3 channels) and returns
what it wrote. MP4s are encoded by the ffmpeg binary that the imageio-ffmpeg
wheel ships (a dependency), so they are written everywhere.
"""
import os

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np

GUTTER = 40  # the dark grey between pictures


def _check_uint8(array, ndim: int, what: str) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim != ndim or array.dtype != np.uint8 or array.shape[-1] not in (1, 3):
    raise ValueError(f"{what} wants uint8 with {ndim} axes and 1 or 3 channels, got {array.dtype} {array.shape}")
  return array


def _plain(pixels: np.ndarray) -> np.ndarray:
  """imageio writes one-channel pictures without their channel axis."""
  return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def save_image(image, path: str) -> str:
  """One uint8 image [H, W, C] as a PNG."""
  iio.imwrite(path, _plain(_check_uint8(image, 3, "save_image")))
  return path


def grid(images, *, columns: int, pad: int = 2) -> np.ndarray:
  """uint8 images [N, H, W, C] as one picture, `columns` a row, with a dark gutter; small grids are
  scaled up (nearest) towards 256 px so they can be seen."""
  images = _check_uint8(images, 4, "grid")
  n, h, w, c = images.shape
  rows = -(-n // columns)
  canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), GUTTER, np.uint8)
  for index in range(n):
    i, j = divmod(index, columns)
    y, x = pad + i * (h + pad), pad + j * (w + pad)
    canvas[y:y + h, x:x + w] = images[index]
  scale = max(1, 256 // max(canvas.shape[:2]))
  return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(images, path: str, *, columns: int, pad: int = 2) -> str:
  """media.grid of uint8 images [N, H, W, C] as one PNG."""
  return save_image(grid(images, columns=columns, pad=pad), path)


def save_clip_rows(videos, path: str, *, scale: int = 2, pad: int = 2) -> str:
  """A contact sheet: one row per clip (uint8 [T, H, W, C], each its own size and length), its
  frames left to right; shorter clips leave the rest of their row as gutter. Scaled by `scale`
  (nearest)."""
  videos = [_check_uint8(v, 4, "save_clip_rows") for v in videos]
  if not videos:
    raise ValueError("save_clip_rows needs at least one clip")
  channels = {v.shape[-1] for v in videos}
  if len(channels) != 1:
    raise ValueError(f"save_clip_rows wants clips of one channel count, got {sorted(channels)}")
  height = sum(v.shape[1] + pad for v in videos) + pad
  width = max(len(v) * (v.shape[2] + pad) for v in videos) + pad
  canvas = np.full((height, width, channels.pop()), GUTTER, np.uint8)
  y = pad
  for video in videos:
    _, h, w, _ = video.shape
    for i, frame in enumerate(video):
      x = pad + i * (w + pad)
      canvas[y:y + h, x:x + w] = frame
    y += h + pad
  return save_image(canvas.repeat(scale, axis=0).repeat(scale, axis=1), path)


def side_by_side(videos, *, pad: int = 2) -> np.ndarray:
  """uint8 clips [T, H, W, C] of one length, height and channel count, left to right with a gutter
  column between them: one clip [T, H, sum(W) + gutters, C] (for comparisons in one GIF)."""
  videos = [_check_uint8(v, 4, "side_by_side") for v in videos]
  if not videos:
    raise ValueError("side_by_side needs at least one clip")
  shapes = {(v.shape[0], v.shape[1], v.shape[3]) for v in videos}
  if len(shapes) != 1:
    raise ValueError(f"side_by_side wants clips of one length, height and channel count, got shapes "
                     f"{[v.shape for v in videos]}")
  gutter = np.full(videos[0].shape[:2] + (pad, videos[0].shape[3]), GUTTER, np.uint8)
  parts = [videos[0]]
  for video in videos[1:]:
    parts += [gutter, video]
  return np.concatenate(parts, axis=2)


def encode_gif(video, *, fps: int = 8) -> bytes:
  """A uint8 video [T, H, W, C] as the bytes of a looping GIF (also what TensorBoard animates)."""
  video = _check_uint8(video, 4, "encode_gif")
  return iio.imwrite("<bytes>", _plain(video), extension=".gif", duration=1000 / fps, loop=0)


def save_gif(video, path: str, *, fps: int = 8) -> str:
  """A uint8 video [T, H, W, C] as a looping GIF."""
  with open(path, "wb") as f:
    f.write(encode_gif(video, fps=fps))
  return path


def save_mp4(video, path: str, *, fps: int = 8) -> str:
  """A uint8 video [T, H, W, C] as an H.264 MP4 (yuv420p, what browsers and TensorBoard play), by the
  ffmpeg that imageio-ffmpeg ships. Odd sides are padded by repeating the last row or column
  (4:2:0 needs even sides). Written under a temporary name and renamed, so a failed encode
  leaves nothing behind; ffmpeg's complaint is raised as a RuntimeError."""
  video = _check_uint8(video, 4, "save_mp4")
  frames = np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video
  _, h, w, _ = frames.shape
  frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  partial = f"{path}.partial.mp4"
  writer = imageio_ffmpeg.write_frames(
      partial, (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
      macro_block_size=1, ffmpeg_log_level="error", output_params=["-crf", "18"])
  try:
    writer.send(None)  # starts ffmpeg
    for frame in frames:
      writer.send(np.ascontiguousarray(frame))
    writer.close()
  except BaseException:
    writer.close()
    if os.path.exists(partial):
      os.remove(partial)
    raise
  os.replace(partial, path)
  return path


def save_npz(video, path: str) -> str:
  """uint8 frames [T, H, W, C] under the key "frames" (what sample's inputs read back)."""
  np.savez_compressed(path, frames=_check_uint8(video, 4, "save_npz"))
  return path


def save_sample(video, out_dir: str, stem: str) -> list[str]:
  """One generated sample as files in out_dir: STEM.png (one frame) or STEM.gif, STEM.npz, and
  STEM.mp4 for a video. Returns the file names, in that order."""
  video = _check_uint8(video, 4, "save_sample")
  if len(video) == 1:
    files = [os.path.basename(save_image(video[0], os.path.join(out_dir, f"{stem}.png")))]
  else:
    files = [os.path.basename(save_gif(video, os.path.join(out_dir, f"{stem}.gif")))]
  files.append(os.path.basename(save_npz(video, os.path.join(out_dir, f"{stem}.npz"))))
  if len(video) > 1:
    files.append(os.path.basename(save_mp4(video, os.path.join(out_dir, f"{stem}.mp4"))))
  return files
