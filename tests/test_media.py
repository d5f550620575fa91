"""media.py: the one writer of grids, contact sheets, GIF, MP4 and npz."""
import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import media


def _clip(frames, h, w, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (frames, h, w, c), dtype=np.uint8)


def test_save_sample_writes_gif_mp4_and_npz_or_png(tmp_path):
  video = _clip(5, 8, 10)
  files = media.save_sample(video, str(tmp_path), "sample_0")
  assert files == ["sample_0.gif", "sample_0.npz", "sample_0.mp4"]
  np.testing.assert_array_equal(iio.imread(tmp_path / "sample_0.gif", index=None).shape[:3], (5, 8, 10))
  with np.load(tmp_path / "sample_0.npz") as f:
    np.testing.assert_array_equal(f["frames"], video)
  assert media.save_sample(video[:1, ..., :1], str(tmp_path), "still") == ["still.png", "still.npz"]
  assert iio.imread(tmp_path / "still.png").shape == (8, 10)


def test_save_mp4_writes_a_real_h264_file_of_any_size(tmp_path):
  from diffusion_jax.data import video_folder

  t = np.arange(9)[:, None, None]
  y, x = np.mgrid[0:15, 0:21]
  smooth = np.stack([(8 * x + 4 * t) % 256, (10 * y + 0 * t) % 256, np.full_like(x + t, 128)], -1).astype(np.uint8)
  path = media.save_mp4(smooth, str(tmp_path / "odd.mp4"), fps=8)  # 15 x 21: odd sides are padded
  assert open(path, "rb").read(12)[4:8] == b"ftyp" and sorted(os.listdir(tmp_path)) == ["odd.mp4"]
  back = video_folder.read_video(path, 100, 512)
  assert back.shape == (9, 16, 22, 3)
  assert np.abs(back[:, :15, :21].astype(float) - smooth).mean() < 6
  grey = media.save_mp4(smooth[..., :1], str(tmp_path / "grey.mp4"))
  assert video_folder.read_video(grey, 100, 512).shape == (9, 16, 22, 3)
  with pytest.raises(ValueError, match="save_mp4 wants uint8"):
    media.save_mp4(smooth.astype(np.float32), str(tmp_path / "bad.mp4"))


def test_save_grid_places_images_in_rows_and_scales_small_grids(tmp_path):
  images = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(5)])
  grid = iio.imread(media.save_grid(images, str(tmp_path / "g.png"), columns=2, pad=2))
  scale = 256 // 20  # canvas 3 rows x 2 columns of 4 px with a 2 px gutter: 20 x 14
  assert grid.shape == (20 * scale, 14 * scale, 3)
  np.testing.assert_array_equal(grid[2 * scale, 8 * scale], [10, 10, 10])  # image 1: row 0, column 1
  np.testing.assert_array_equal(grid[0, 0], [media.GUTTER] * 3)


def test_save_clip_rows_pads_rows_to_the_longest_clip(tmp_path):
  clips = [_clip(3, 4, 5), _clip(1, 6, 2, seed=1)]
  sheet = iio.imread(media.save_clip_rows(clips, str(tmp_path / "s.png"), scale=2, pad=1))
  assert sheet.shape == (2 * (1 + 4 + 1 + 6 + 1), 2 * (1 + 3 * (5 + 1)), 3)
  np.testing.assert_array_equal(sheet[2:10:2, 2 + 2 * 6:2 + 2 * 11:2], clips[0][1])  # clip 0, frame 1
  np.testing.assert_array_equal(sheet[2 * 6:2 * 12:2, 2:6:2], clips[1][0])
  assert (sheet[2 * 6:2 * 12, 2 * 4:] == media.GUTTER).all()  # the short clip's row is gutter after its frame
  with pytest.raises(ValueError, match="uint8"):
    media.save_clip_rows([np.zeros((2, 4, 4, 3), np.float32)], str(tmp_path / "bad.png"))


def test_quickstart_report_has_a_contact_sheet_of_the_samples(tmp_path):
  from diffusion_jax import quickstart

  eval_dir = tmp_path / "eval"
  eval_dir.mkdir()
  rng = np.random.default_rng(0)
  with open(eval_dir / "samples.jsonl", "w") as f:
    for i, frames in enumerate((9, 5, 1)):
      media.save_npz(rng.integers(0, 255, (frames, 32, 24, 3), dtype=np.uint8), str(eval_dir / f"sample_{i}.npz"))
      f.write(json.dumps(dict(prompt=f"prompt {i}", files=[f"sample_{i}.gif", f"sample_{i}.npz"])) + "\n")
  scores = {"check/digit/generated": 0.5, "check/digit/vae": 0.7, "check/digit/real": 1.0, "check/digit/clips": 40}
  report = open(quickstart.write_report(str(tmp_path), scores, {"total": 1.0}, {})).read()
  sheet = np.asarray(Image.open(eval_dir / "sheet.png"))
  assert sheet.shape[0] > 3 * 32 * 2 and sheet.shape[1] > 9 * 24 * 2  # three rows, nine frames wide, x2
  assert "![](eval/sheet.png)" in report and "3. prompt 2" in report
  assert "| digit (classifier, majority over frames) | 0.500 | 0.700 | 1.000 | 40 |" in report
