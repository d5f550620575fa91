"""`video_folder`: the user's own folder of videos (decoded by the ffmpeg that the imageio-ffmpeg
wheel ships), with optional caption side files, split into train and validation by a hash of each
file's path; unusable files are skipped and counted by reason in the metadata.
"""
import dataclasses
import hashlib
import logging
import os

import imageio_ffmpeg
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import imaging


# imageio-ffmpeg warns whenever the frames read differ in size from the source's: here that is
# read_video's intended shrink, once per file, so only that message is dropped.
logging.getLogger("imageio_ffmpeg").addFilter(
    lambda record: "different from the source frame size" not in record.getMessage())

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".webm", ".gif", ".avi", ".mov", ".mkv")
# Why a file of the folder was left out (info.metadata["skipped"] counts them):
#   no_video_stream  ffmpeg opened it but found no video stream (an audio-only file, an empty track)
#   unreadable       ffmpeg could not open it (not a video, an empty file, a truncated header)
#   no_frames        a video stream without one decodable frame
#   decode_error     decoding stopped inside a frame (a file cut short mid-stream)
VIDEO_SKIP_REASONS = ("no_video_stream", "unreadable", "no_frames", "decode_error")


class UnreadableVideo(ValueError):
  """A video file the reader cannot use; `reason` is one of VIDEO_SKIP_REASONS."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
  """folder: the user's videos; longer clips keep their first max_frames frames and larger frames are
  shrunk (aspect kept) to max_side px on the long side; fps > 0 resamples every clip to that constant
  rate first (variable-rate files too), 0 keeps each decoded frame once; validation_fraction of the
  files (by a hash of their path) form the validation split."""

  folder: str = ""
  max_frames: int = 129
  max_side: int = 512
  fps: float = 0.0
  validation_fraction: float = 0.05


def _video_folder_config(folder: str, max_frames: int = 129, max_side: int = 512, fps: float = 0.0,
                         validation_fraction: float = 0.05) -> VideoFolderConfig:
  if not folder or not os.path.isdir(folder):
    raise ValueError(f"video_folder needs folder= an existing directory, got {folder!r}")
  if max_frames < 1 or max_side < 8:
    raise ValueError(f"video_folder needs max_frames >= 1 and max_side >= 8, got {max_frames}, {max_side}")
  if fps < 0 or not 0 <= validation_fraction < 1:
    raise ValueError(f"video_folder needs fps >= 0 and 0 <= validation_fraction < 1, got {fps}, "
                     f"{validation_fraction}")
  folder = os.path.abspath(folder)
  name = f"{hashlib.sha256(folder.encode()).hexdigest()[:12]}_f{max_frames}_s{max_side}"
  if fps:
    name += f"_r{fps:g}"
  if validation_fraction != 0.05:
    name += f"_v{validation_fraction:g}"
  return VideoFolderConfig(name=name, folder=folder, max_frames=max_frames, max_side=max_side, fps=float(fps),
                           validation_fraction=float(validation_fraction), description=f"videos of {folder}")


_FFMPEG_COMPLAINTS = ("error", "invalid", "not found", "prematurely", "matches no streams", "could not", "failed")


def _ffmpeg_failure(log: str) -> str:
  """The first line of ffmpeg's log (after its banner) that complains, without '[demuxer @ 0x...]' prefixes."""
  lines = [line.strip() for line in log.splitlines() if line.strip() and not line.startswith("===")]
  banner_end = max((i for i, line in enumerate(lines) if line.startswith(("configuration:", "lib"))), default=-1)
  lines = lines[banner_end + 1:] or ["no output from ffmpeg"]
  line = next((line for line in lines if any(word in line.lower() for word in _FFMPEG_COMPLAINTS)), lines[-1])
  while line.startswith("[") and "] " in line:
    line = line.split("] ", 1)[1]
  return line[:200]


def read_video(path: str, max_frames: int, max_side: int, fps: float = 0.0) -> np.ndarray:
  """uint8 [T, H, W, 3] of a video file's first max_frames frames, decoded by the ffmpeg that
  imageio-ffmpeg ships (any container and codec it reads: MP4, WebM, MOV, AVI, MKV, GIF).

  ffmpeg converts every pixel format to 8-bit RGB (grey, alpha dropped, 10-bit, 4:2:2 ...) and
  shrinks frames over max_side (area filter, aspect kept) before they reach Python; frames
  arrive one at a time through a pipe and ffmpeg stops after max_frames, so the memory used
  is at most about twice the returned clip, whatever the source's size or length. With
  fps > 0 the clip is resampled to that constant rate (a variable-frame-rate file becomes
  evenly timed); with 0 every decoded frame is kept once. Raises UnreadableVideo (with a
  reason of VIDEO_SKIP_REASONS) for a file it cannot use.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no video file {path}")
  shrink = (f"scale=w='if(gte(iw,ih),min(iw,{max_side}),-1)':h='if(gte(iw,ih),-1,min(ih,{max_side}))'"
            ":flags=area")
  filters = ([f"fps={fps:g}"] if fps else []) + [shrink]
  output = ["-map", "0:v:0", "-an", "-sn", "-dn", "-frames:v", str(max_frames), "-vf", ",".join(filters)]
  if not fps:
    output += ["-fps_mode", "passthrough"]  # each decoded frame once, none duplicated or dropped
  frames_in = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24", output_params=output)
  try:
    try:
      meta = next(frames_in)
    except (OSError, RuntimeError, ValueError, KeyError, IndexError, StopIteration) as e:
      log = str(e)
      if "matches no streams" in log:
        reason = "no_video_stream"
      elif "received no packets" in log:  # a video stream, but ffmpeg got no frame out of it
        reason = "no_frames"
      else:
        reason = "unreadable"
      raise UnreadableVideo(reason, _ffmpeg_failure(log)) from None
    width, height = meta["size"]
    frames = []
    try:
      for raw in frames_in:
        frames.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
    except RuntimeError as e:  # ffmpeg's output ended inside a frame
      if not frames:
        raise UnreadableVideo("decode_error", _ffmpeg_failure(str(e))) from None
      # The frames before the damage are whole: keep them (a file cut short mid-stream).
  finally:
    frames_in.close()  # ends ffmpeg when we stop early
  if not frames:
    raise UnreadableVideo("no_frames", "no frame decoded")
  return np.stack(frames)


def _read_caption(video_path: str) -> tuple[str, str]:
  """(caption, note) from the side file clip.txt of clip.mp4: note is "" for a UTF-8 caption,
  "missing" without a side file, "not_utf8" when its bytes are read as Latin-1 instead."""
  caption_path = os.path.splitext(video_path)[0] + ".txt"
  if not os.path.isfile(caption_path):
    return "", "missing"
  with open(caption_path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8-sig").strip(), ""
  except UnicodeDecodeError:  # a caption written in a legacy encoding still says something
    return raw.decode("latin-1").strip(), "not_utf8"


def validation_files(relative_paths, fraction: float) -> set:
  """The files of the validation split: those whose path hashes below `fraction`, so a file keeps
  its split when others are added or removed; when none does (a small folder) and there are at
  least 2 files, the one with the smallest hash."""
  if not fraction:
    return set()
  hashes = {p: int(hashlib.sha256(p.encode()).hexdigest()[:15], 16) / 16 ** 15 for p in relative_paths}
  chosen = {p for p, h in hashes.items() if h < fraction}
  if not chosen and len(hashes) >= 2:
    chosen = {min(hashes, key=hashes.get)}
  return chosen


class VideoFolder(tfds.core.GeneratorBasedBuilder):
  """The user's folder of videos (mp4, m4v, webm, gif, avi, mov, mkv; subfolders too), split into
  train and validation by a hash of each file's path (`validation_files`).

  A side file with the same name and .txt (clip.mp4 -> clip.txt) is the caption (UTF-8, else
  read as Latin-1), else the caption is empty; label is 0. Files are read in sorted order and
  `id` is the index in that order. A file that does not decode is skipped; nothing aborts the
  build. The dataset's metadata keeps what happened:
    skipped_files  {relative path: "reason: ffmpeg's message"}
    skipped        {reason: count}, reasons from VIDEO_SKIP_REASONS
    captions       {"missing": count, "not_utf8": count}
  """

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "2.0.0": "Decoded by ffmpeg (imageio-ffmpeg); a validation split; skips and captions counted."}

  def __init__(self, *, config=None, folder: str = "", max_frames: int = 129, max_side: int = 512,
               fps: float = 0.0, validation_fraction: float = 0.05, **kwargs):
    if config is None:
      config = _video_folder_config(folder, max_frames, max_side, fps, validation_fraction)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="A folder of the user's videos with optional caption side files.",
        features=imaging.video_features(), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # local files
    cfg = self.builder_config
    paths = sorted(
        os.path.join(root, name) for root, _, names in os.walk(cfg.folder) for name in names
        if name.lower().endswith(VIDEO_EXTENSIONS))
    relative = [os.path.relpath(p, cfg.folder).replace(os.sep, "/") for p in paths]
    held_out = validation_files(relative, cfg.validation_fraction)
    indexed = list(enumerate(zip(paths, relative)))
    self.info.metadata.update(skipped_files={}, skipped={}, captions={"missing": 0, "not_utf8": 0})
    return {"train": self._generate_examples([x for x in indexed if x[1][1] not in held_out]),
            "validation": self._generate_examples([x for x in indexed if x[1][1] in held_out])}

  def _generate_examples(self, files):
    cfg = self.builder_config
    metadata = self.info.metadata
    for index, (path, relative) in files:
      try:
        video = read_video(path, cfg.max_frames, cfg.max_side, cfg.fps)
      except UnreadableVideo as e:  # this one file is unusable, the rest are not
        metadata["skipped_files"][relative] = str(e)
        metadata["skipped"][e.reason] = metadata["skipped"].get(e.reason, 0) + 1
        logging.warning("video_folder: skipping %s (%s)", relative, e)
        continue
      caption, note = _read_caption(path)
      if note:
        metadata["captions"][note] += 1
      yield index, {"video": video, "label": 0, "caption": caption, "id": index}
