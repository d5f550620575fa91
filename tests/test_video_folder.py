"""video_folder on real files: clips written by the ffmpeg that imageio-ffmpeg ships (MP4, WebM,
MOV, AVI, GIF; grey, RGBA, odd-sized, 10-bit, variable frame rate), some then damaged; the
builder decodes or skips each and counts why; the validation split; a VAE trains on the folder."""
import os
import subprocess
import tracemalloc

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import checkpoint
from diffusion_jax import config as config_lib
from diffusion_jax.data import imaging, pipeline, sources, video_folder
from diffusion_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moving_square(frames: int, height: int, width: int, colour=(240, 60, 30)) -> np.ndarray:
  """A smooth test clip: a coloured square moving right over a vertical gradient."""
  video = np.empty((frames, height, width, 3), np.uint8)
  video[:] = np.linspace(20, 120, height, dtype=np.uint8)[None, :, None, None]
  side = max(4, min(height, width) // 3)
  for t in range(frames):
    x = (t * 3) % max(1, width - side)
    video[t, 2:2 + side, x:x + side] = colour
  return video


def write_clip(path, frames: np.ndarray, *args: str, pix_fmt_in: str = "rgb24", rate: str = "10") -> None:
  """Encodes raw frames (uint8 [T, H, W, C]) with the bundled ffmpeg; args are its output options."""
  t, h, w = frames.shape[:3]
  cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
         "-pix_fmt", pix_fmt_in, "-s", f"{w}x{h}", "-r", rate, "-i", "-", *args, str(path)]
  subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True, timeout=60)


def _mean_error(a, b) -> float:
  return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  """A folder of real clips and damaged files; returns (folder, {name: source frames or None})."""
  folder = tmp_path_factory.mktemp("videos")
  (folder / "sub").mkdir()
  square = moving_square(9, 48, 64)
  made = {}

  def clip(name, frames, *args, **kwargs):
    write_clip(folder / name, frames, *args, **kwargs)
    made[name] = frames

  clip("h264.mp4", square, "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p")
  clip("vp9.webm", square, "-c:v", "libvpx-vp9", "-crf", "10", "-b:v", "0")
  clip("mjpeg.avi", square, "-c:v", "mjpeg", "-q:v", "2")
  rgba = np.concatenate([square, np.full(square.shape[:3] + (1,), 128, np.uint8)], -1)
  clip("sub/rgba.mov", rgba, "-c:v", "qtrle", "-pix_fmt", "argb", pix_fmt_in="rgba")  # lossless, alpha
  odd = moving_square(9, 47, 63)
  clip("odd.avi", odd, "-c:v", "ffv1", "-pix_fmt", "bgr0")  # lossless, odd sides
  grey = moving_square(9, 48, 64)[..., :1]
  clip("grey.mp4", grey, "-c:v", "libx264", "-crf", "12", "-pix_fmt", "gray", pix_fmt_in="gray")
  clip("ten_bit.mp4", square, "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p10le")
  # Variable frame rate: frames 0-3 0.1 s apart, then 0.3 s apart (9 frames over 1.6 s).
  clip("vfr.mkv", square, "-vf", "setpts='if(lt(N,4),N*0.1,0.4+(N-4)*0.3)/TB'", "-fps_mode", "vfr",
       "-c:v", "libx264", "-crf", "12")
  big = moving_square(30, 480, 640)
  clip("big.mp4", big, "-c:v", "libx264", "-crf", "18")
  iio.imwrite(folder / "anim.gif", square[:5], duration=100, loop=0)
  made["anim.gif"] = square[:5]
  long_clip = moving_square(40, 48, 64)
  clip("faststart.mp4", long_clip, "-c:v", "libx264", "-g", "5", "-movflags", "+faststart")
  # Damaged: cut short with the index in front (decodes a prefix), cut short with the index at
  # the end (unreadable), audio only, zero frames of a video stream, garbage, empty.
  data = (folder / "faststart.mp4").read_bytes()
  (folder / "cut_faststart.mp4").write_bytes(data[:len(data) * 6 // 10])
  made["cut_faststart.mp4"] = long_clip
  data = (folder / "h264.mp4").read_bytes()
  (folder / "cut_moov.mp4").write_bytes(data[:len(data) // 2])
  data = (folder / "vp9.webm").read_bytes()
  (folder / "cut_header.webm").write_bytes(data[:len(data) // 2])
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                  "-i", "sine=duration=0.3", "-c:a", "aac", str(folder / "audio_only.mp4")], check=True, timeout=60)
  (folder / "garbage.mov").write_bytes(b"not a video" * 10)
  (folder / "empty.avi").write_bytes(b"")
  (folder / "notes.md").write_text("not a video: ignored")
  # Captions: UTF-8, UTF-8 with a BOM, Latin-1 bytes (not UTF-8); the other clips have none.
  (folder / "h264.txt").write_text("a red square moving right\n", encoding="utf-8")
  (folder / "vp9.txt").write_bytes("\ufeffun carré rouge".encode("utf-8"))
  (folder / "mjpeg.txt").write_bytes("un carr\xe9 rouge".encode("latin-1"))
  return folder, made


def test_read_video_decodes_every_kind_of_file(clips):
  folder, made = clips
  square = made["h264.mp4"]
  for name in ("h264.mp4", "vp9.webm", "mjpeg.avi", "ten_bit.mp4"):  # lossy codecs: close to the source
    video = video_folder.read_video(str(folder / name), 129, 512)
    assert video.shape == square.shape and video.dtype == np.uint8, name
    assert _mean_error(video, square) < 4, name
  rgba = video_folder.read_video(str(folder / "sub/rgba.mov"), 129, 512)
  np.testing.assert_array_equal(rgba, square)  # alpha dropped
  np.testing.assert_array_equal(video_folder.read_video(str(folder / "odd.avi"), 129, 512), made["odd.avi"])
  grey = video_folder.read_video(str(folder / "grey.mp4"), 129, 512)
  assert grey.shape == square.shape and (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  assert _mean_error(grey[..., :1], made["grey.mp4"]) < 4
  np.testing.assert_array_equal(video_folder.read_video(str(folder / "anim.gif"), 129, 512), square[:5])

  # Variable frame rate: every decoded frame once, or resampled to a constant 10 fps over its 1.6 s.
  vfr = video_folder.read_video(str(folder / "vfr.mkv"), 129, 512)
  assert len(vfr) == 9 and _mean_error(vfr, square) < 4
  even = video_folder.read_video(str(folder / "vfr.mkv"), 129, 512, fps=10)
  assert len(even) == 17  # t = 0.0, 0.1, ..., 1.6
  assert _mean_error(even[4], square[4]) < 4 and _mean_error(even[7], square[5]) < 4  # frame 5 sits at 0.7 s

  # Long and large: cut to max_frames, shrunk to max_side with the aspect kept.
  small = video_folder.read_video(str(folder / "big.mp4"), 6, 64)
  assert small.shape == (6, 48, 64, 3)
  expected = imaging.resize_frames(made["big.mp4"][:6].astype(np.float32), 48, 64)
  assert _mean_error(small, expected) < 6
  # A file cut short mid-stream with its index in front decodes its whole frames before the cut.
  prefix = video_folder.read_video(str(folder / "cut_faststart.mp4"), 129, 512)
  assert 0 < len(prefix) < 40 and _mean_error(prefix, made["cut_faststart.mp4"][:len(prefix)]) < 6


def test_read_video_memory_stays_near_the_clip_it_returns(clips):
  """640 x 480 x 30 frames decoded to <= 64 px: the full-size frames never reach Python."""
  folder, made = clips
  path = str(folder / "big.mp4")
  tracemalloc.start()
  try:
    video = video_folder.read_video(path, 129, 64)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert video.shape == (30, 48, 64, 3)
  assert peak < 2.5 * video.nbytes + 256 * 1024, (peak, video.nbytes)  # measured: 2.06x
  assert peak < made["big.mp4"][0].nbytes  # less than one source frame (0.9 MB; the clip is 27.6 MB)


@pytest.mark.parametrize("name, reason, says", [
    ("cut_moov.mp4", "unreadable", "moov atom not found"),
    ("cut_header.webm", "no_frames", "ended prematurely"),
    ("audio_only.mp4", "no_video_stream", "matches no streams"),
    ("garbage.mov", "unreadable", "moov atom not found"),  # what ffmpeg's MOV demuxer says
    ("empty.avi", "unreadable", ""),
])
def test_read_video_names_why_a_file_is_unusable(clips, name, reason, says):
  folder, _ = clips
  with pytest.raises(video_folder.UnreadableVideo, match=f"^{reason}: .*{says}") as caught:
    video_folder.read_video(str(folder / name), 129, 512)
  assert caught.value.reason == reason


def test_video_folder_builds_splits_and_counts_skips_and_captions(clips, tmp_path):
  folder, made = clips
  data_dir = str(tmp_path / "data")
  build = dict(folder=str(folder), max_frames=33, max_side=64, validation_fraction=0.25)
  sources.ensure_dataset("video_folder", data_dir, **build)
  train = sources.open_source("video_folder", "train", data_dir, **build)
  validation = sources.open_source("video_folder", "validation", data_dir, **build)

  names = sorted(os.path.relpath(os.path.join(r, n), folder) for r, _, ns in os.walk(folder) for n in ns
                 if n.endswith(video_folder.VIDEO_EXTENSIONS))
  held_out = video_folder.validation_files(names, 0.25)
  decodable = set(made) | {"faststart.mp4"}
  by_split = {}
  for split, source in (("train", train), ("validation", validation)):
    for example in source.__getitems__(range(len(source))):
      by_split.setdefault(split, {})[names[int(example["id"])]] = example
  assert set(by_split["validation"]) == held_out & decodable and by_split["validation"]
  assert set(by_split["train"]) == decodable - held_out
  everything = {**by_split["train"], **by_split["validation"]}
  assert everything["h264.mp4"]["caption"].decode() == "a red square moving right"
  assert everything["vp9.webm"]["caption"].decode() == "un carré rouge"  # BOM dropped
  assert everything["mjpeg.avi"]["caption"].decode() == "un carré rouge"  # read as Latin-1
  assert everything["big.mp4"]["video"].shape == (30, 48, 64, 3)
  assert everything["faststart.mp4"]["video"].shape == (33, 48, 64, 3)

  metadata = tfds.builder_from_directory(
      str(video_folder.VideoFolder(data_dir=data_dir, **build).data_dir)).info.metadata
  assert metadata["skipped"] == {"unreadable": 3, "no_frames": 1, "no_video_stream": 1}
  assert sorted(metadata["skipped_files"]) == ["audio_only.mp4", "cut_header.webm", "cut_moov.mp4",
                                               "empty.avi", "garbage.mov"]
  assert metadata["skipped_files"]["cut_moov.mp4"] == "unreadable: moov atom not found"
  assert metadata["captions"] == {"missing": len(decodable) - 3, "not_utf8": 1}


def test_validation_files_are_stable_and_never_empty():
  names = [f"clip_{i}.mp4" for i in range(200)]
  chosen = video_folder.validation_files(names, 0.1)
  assert 5 < len(chosen) < 40
  assert video_folder.validation_files(names[:100], 0.1) == chosen & set(names[:100])  # a file keeps its split
  assert len(video_folder.validation_files(names[:2], 0.01)) == 1  # a small folder still gets one
  assert video_folder.validation_files(names, 0.0) == set()
  assert video_folder.validation_files(names[:1], 0.5) <= set(names)
  with pytest.raises(ValueError, match="validation_fraction < 1"):
    sources.ensure_dataset("video_folder", "", folder=REPO, validation_fraction=1.0)
  with pytest.raises(ValueError, match="needs folder= an existing directory"):
    sources.ensure_dataset("video_folder", "", folder=os.path.join(REPO, "missing"))


def test_a_vae_trains_on_a_folder_of_mp4s_and_evaluates_its_validation_split(tmp_path):
  """Done-when of issue 15: an MP4 folder builds and trains (the VAE evaluates the validation
  split at every save: its latent statistics)."""
  folder = tmp_path / "mp4s"
  folder.mkdir()
  for i in range(6):
    write_clip(folder / f"clip_{i}.mp4", moving_square(9, 24 + 8 * i, 32, colour=(40 * i, 200, 90)),
               "-c:v", "libx264", "-pix_fmt", "yuv420p")
    (folder / f"clip_{i}.txt").write_text(f"clip {i}")
  config = config_lib.load_config(os.path.join(REPO, "configs", "vae_video.py") + ":smoke")
  # As the README's command line gives them: the builder section as JSON replaces moving_digits' arguments.
  config_lib.apply_overrides(config, ["data.name=video_folder", f"data.data_dir={tmp_path / 'data'}",
                                      f'data.builder={{"folder": "{folder}", "max_frames": 9, "max_side": 32}}',
                                      "train.steps=2", "train.ckpt_every=2", "train.log_every=1"])
  with pytest.raises(config_lib.ConfigError, match="cannot read data.builder="):
    config_lib.apply_overrides(config, ["data.builder=[1, 2]"])
  sources.ensure_dataset(config.data.name, config.data.data_dir, **pipeline.builder_kwargs(config.data))
  state, metrics = loop.train(config, str(tmp_path / "run"))
  assert int(state.step) == 2 and np.isfinite(metrics["loss"])
  manager = checkpoint.make_manager(str(tmp_path / "run"), keep=1, create=False)
  extras = checkpoint.saved_extras(manager, 2)
  manager.close()
  assert extras["latent_stats"]["mean"] and np.isfinite(extras["latent_stats"]["std"]).all()
  assert extras["latent_stats"]["source"].startswith("video_folder:validation")
