"""moving_digits, the variable-size pipeline (crop, resize rule, skips), packing invariants, data_stats."""
import json
import os

import grain
import numpy as np
import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import patches
from diffusion_jax.data import image_pans, imaging, moving_digits, packing, pipeline, sources, stats

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "dit_image.py")
BUILD = dict(min_side=16, max_side=40, train_examples=40, validation_examples=16)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("video_data"))
  sources.ensure_dataset("moving_digits", path, **BUILD)
  return path


def _config(data_dir, **data):
  config = config_lib.load_config(CONFIG + ":smoke")
  with config.unlocked():
    config.data.update(name="moving_digits", data_dir=data_dir, builder=dict(BUILD), patch=(1, 4, 4),
                       tokens_per_row=256, examples_per_row=8, max_frames=9, pack_buffer=8)
    config.data.update(data)
    config.train.global_batch = 2
  return config


def _all(source):
  return source.__getitems__(range(len(source)))


# --------------------------------------------------------------------------- the builder

def test_moving_digits_is_deterministic_and_varied(video_dir, tmp_path):
  stored = {int(ex["id"]): ex for ex in _all(sources.open_source("moving_digits", "validation", video_dir, **BUILD))}

  def generate(seed):
    builder = moving_digits.MovingDigits(data_dir=str(tmp_path), seed=seed, **BUILD)
    return list(builder._split_generators(None)["validation"])

  for key, ex in generate(0):
    np.testing.assert_array_equal(ex["video"], stored[key]["video"])
    np.testing.assert_array_equal(ex["centers"], stored[key]["centers"])
    assert ex["caption"] == stored[key]["caption"].decode()
  other = generate(1)
  assert any(ex["caption"] != stored[key]["caption"].decode() for key, ex in other)

  train = _all(sources.open_source("moving_digits", "train", video_dir, **BUILD))
  shapes = {ex["video"].shape for ex in train}
  assert {s[0] for s in shapes} <= {1, 5, 9, 17, 33} and len({s[0] for s in shapes}) >= 4
  assert len({s[1:3] for s in shapes}) >= 30  # native sizes and aspect ratios, not one canvas
  assert all(16 <= s[1] <= 40 and 16 <= s[2] <= 40 and s[3] == 3 for s in shapes)
  assert {len(ex["labels"]) for ex in train} == {1, 2, 3}
  for ex in train:
    assert ex["label"] == ex["labels"][0] and ex["centers"].shape == (ex["video"].shape[0], len(ex["labels"]), 2)


def test_short_captions_are_the_same_clips_with_alt_text(video_dir, tmp_path):
  dense = {int(ex["id"]): ex for ex in _all(sources.open_source("moving_digits", "validation", video_dir, **BUILD))}
  builder = moving_digits.MovingDigits(data_dir=str(tmp_path), captions="short", **BUILD)
  assert builder.builder_config.name.endswith("_short")
  for key, ex in builder._split_generators(None)["validation"]:
    np.testing.assert_array_equal(ex["video"], dense[key]["video"])
    assert ex["caption"] == " and ".join(f"a {d}" for d in dense[key]["labels"])
    assert "on a" in dense[key]["caption"].decode()  # the dense one names the background too
  with pytest.raises(ValueError, match="captions"):
    moving_digits.MovingDigits(data_dir="/nonexistent", captions="long")


def test_digit_scale_sets_the_digit_size_and_names_the_build():
  images, labels = imaging.digit_images()
  for scale in ((0.3, 0.3), (0.7, 0.7)):
    rng = np.random.default_rng(0)
    ex = moving_digits.render_moving_digits(images, labels, rng, min_side=40, max_side=40, max_digits=1,
                                            durations=(1,), digit_scale=scale)
    # The stored centre is the digit square's centre; the square starts at a whole pixel.
    video = ex["video"][0].astype(np.int64)
    ink = np.abs(video - video[0, 0]).sum(-1) > 0
    rows, cols = np.nonzero(ink)
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    side = int(round(scale[0] * 40))
    assert side - 4 <= extent <= side, (scale, extent)
  scaled = moving_digits.MovingDigits(data_dir="/nonexistent", digit_scale=(0.5, 0.7))
  assert scaled.builder_config.name.endswith("_z0.5-0.7")
  assert moving_digits.MovingDigits(data_dir="/nonexistent").builder_config.name == "default"
  with pytest.raises(ValueError, match="digit_scale"):
    moving_digits.MovingDigits(data_dir="/nonexistent", digit_scale=(0.8, 0.5))


def _ink_centroid(frame, background):
  ink = np.abs(frame.astype(np.float64) - background).sum(-1)
  ys, xs = np.mgrid[:frame.shape[0], :frame.shape[1]]
  return np.array([(ink * ys).sum(), (ink * xs).sum()]) / ink.sum()


def test_digits_move_as_the_metadata_and_caption_say(video_dir):
  clips = [ex for ex in _all(sources.open_source("moving_digits", "train", video_dir, **BUILD))
           if ex["video"].shape[0] > 1 and len(ex["labels"]) == 1]
  assert len(clips) >= 5
  moved = 0
  for ex in clips:
    video, centers, (dy, dx) = ex["video"], ex["centers"][:, 0], ex["velocities"][0]
    colours, counts = np.unique(video[0].reshape(-1, 3), axis=0, return_counts=True)
    background = colours[counts.argmax()].astype(np.float64)
    # The same glyph is shifted by whole pixels: its ink centroid moves exactly as the stored centre.
    track = np.stack([_ink_centroid(frame, background) for frame in video])
    np.testing.assert_allclose(track - track[0], centers - centers[0], atol=0.05)
    moved += bool(np.abs(track[-1] - track[0]).max() > 1)
    caption = ex["caption"].decode()
    if "standing still" in caption:
      assert dy == dx == 0 and np.ptp(track, axis=0).max() < 0.05
    if "to the left" in caption:
      assert dx < 0
    if "to the right" in caption:
      assert dx > 0
    if "falling" in caption or " down " in caption:
      assert dy > 0
    if "rising" in caption or " up " in caption:
      assert dy < 0
    if "bouncing" not in caption:  # no wall reached: the centre moves at the stored velocity
      steps = np.diff(centers, axis=0)
      np.testing.assert_allclose(steps.mean(0), [dy, dx], atol=1.0)
  assert moved >= len(clips) // 2


# --------------------------------------------------------------------------- sizes

def test_plan_shape_rule():
  patch = (1, 4, 4)
  # Fits: only cropped to patch multiples; frames cut to 1 + 4k (and to max_frames).
  assert pipeline.plan_shape(1, 24, 30, patch=patch, tokens_per_row=1000) == (1, 24, 28)
  assert pipeline.plan_shape(12, 16, 16, patch=patch, tokens_per_row=1000) == (9, 16, 16)
  assert pipeline.plan_shape(33, 16, 16, patch=patch, tokens_per_row=1000, max_frames=17) == (17, 16, 16)
  assert pipeline.plan_shape(9, 16, 16, patch=(2, 4, 4), tokens_per_row=1000) == (8, 16, 16)
  assert pipeline.plan_shape(1, 16, 16, patch=(2, 4, 4), tokens_per_row=1000) is None
  # max_area keeps the aspect ratio.
  assert pipeline.plan_shape(1, 96, 48, patch=patch, tokens_per_row=1000, max_area=1152) == (1, 48, 24)
  # Too large for L: the sides shrink together to fit L / T' tokens per frame, frames kept.
  frames, h, w = pipeline.plan_shape(17, 64, 96, patch=patch, tokens_per_row=1024, min_side=8)
  assert frames == 17 and 17 * (h // 4) * (w // 4) <= 1024
  assert 17 * (h // 4) * (w // 4) > 0.75 * 1024 and abs(w / h - 1.5) < 0.25
  # Below min_side the frames go instead: 16x16 = 16 tokens a frame -> 13 frames <= 256 tokens.
  assert pipeline.plan_shape(33, 64, 64, patch=patch, tokens_per_row=256, min_side=16) == (13, 16, 16)
  # One frame at min_side is still more than L: cannot fit.
  assert pipeline.plan_shape(1, 16, 4000, patch=patch, tokens_per_row=256, min_side=16) is None


def _element(video, i=0):
  return {"video": video, "id": i, "label": i % 10, "caption": f"clip {i}".encode()}


def test_too_large_example_is_resized_to_fit_not_dropped():
  rng = np.random.default_rng(0)
  prepare = pipeline.PrepareExample(patch=(1, 4, 4), channels=3, tokens_per_row=256, min_side=8)
  video = np.zeros((33, 64, 96, 3), np.uint8)
  video[:, :32] = 255  # top half white
  out = prepare.random_map(_element(video), rng)
  frames, height, width = np.asarray(out["grid"]) * (1, 4, 4)
  assert out["patches"].shape[0] == np.prod(out["grid"]) <= 256 and frames == 33
  assert (height, width) == (8, 12)  # 33 frames x 2 x 3 patches = 198 tokens <= 256; 2x3 keeps 2:3
  clip = patches.unpatchify(out["patches"], out["grid"], (1, 4, 4), 3)
  np.testing.assert_allclose(clip[:, :3], 1.0, atol=1e-5)  # the filter blurs only the edge rows
  np.testing.assert_allclose(clip[:, 5:], -1.0, atol=1e-5)
  np.testing.assert_allclose(clip.mean(), 0.0, atol=1e-5)  # half white, half black still
  # A clip that fits keeps its pixels exactly (a temporal crop of 1 + 4k frames, centre-cropped sides).
  small = rng.integers(0, 256, size=(7, 18, 21, 3), dtype=np.uint8)
  out = prepare.random_map(_element(small), np.random.default_rng(1))
  clip = patches.unpatchify(out["patches"], out["grid"], (1, 4, 4), 3)
  assert clip.shape == (5, 16, 20, 3)
  starts = [s for s in range(3) if np.allclose(clip, small[s:s + 5, 1:17, 0:20] / 127.5 - 1, atol=1e-6)]
  assert len(starts) == 1


def test_fixed_side_models_skip_other_sizes():
  """A fixed-grid model (the U-Net) gets only data.image_size-sided examples; others are skipped, not padded."""
  prepare = pipeline.PrepareExample(patch=(1, 4, 4), channels=3, tokens_per_row=16, min_side=8, fixed_side=16)
  rng = np.random.default_rng(0)
  assert tuple(prepare.random_map(_element(np.zeros((1, 16, 16, 3), np.uint8)), rng)["grid"]) == (1, 4, 4)
  assert prepare.random_map(_element(np.zeros((1, 16, 18, 3), np.uint8)), rng)["grid"].tolist() == [1, 4, 4]
  assert prepare.random_map(_element(np.zeros((1, 8, 16, 3), np.uint8)), rng)["skipped"] == "wrong_size"
  latent = {"latent_mean": np.zeros((1, 12, 12, 3), np.float32), "latent_logvar": np.zeros((1, 12, 12, 3), np.float32),
            "id": 0, "label": 0}
  assert prepare.random_map(latent, rng)["skipped"] == "wrong_size"


def test_bad_examples_are_skipped_and_counted_per_reason():
  good = np.full((5, 20, 24, 3), 100, np.uint8)
  nan = np.full((1, 16, 16, 3), 0.5, np.float32)
  nan[0, 3, 3, 1] = np.nan
  inf = np.full((1, 16, 16, 3), 0.5, np.float32)
  inf[0, 0, 0, 0] = np.inf
  elements = [
      _element(good, 0),
      _element(np.zeros((0, 16, 16, 3), np.uint8), 1),  # no frames
      _element(np.zeros((1, 16, 16, 4), np.uint8), 2),  # RGBA
      _element(nan, 3), _element(inf, 4),
      _element(np.zeros((1, 16, 4000, 3), np.uint8), 5),  # a strip no resize can fit
      _element(np.zeros((16, 16), np.uint8), 6),  # no channel axis
      _element(np.full((1, 16, 16, 3), 0.25, np.float32), 7),  # a float image in [0, 1]
      _element(good, 8),
  ]
  prepare = pipeline.PrepareExample(patch=(1, 4, 4), channels=3, tokens_per_row=256, min_side=16)
  ds = grain.MapDataset.source(elements).random_map(prepare, seed=0).to_iter_dataset()
  rows = list(packing.pack(ds, tokens_per_row=256, examples_per_row=4, buffer_size=2))
  counter = stats.SkipCounter()
  for row in rows:
    counter.update(row)
  assert counter.as_dict() == {"no_frames": 1, "bad_channels": 1, "bad_shape": 1, "non_finite": 2, "too_big": 1,
                              "wrong_size": 0}
  assert counter.total == 6
  parts = [part for row in rows for part in packing.split_row(row)]
  assert sorted(p["id"] for p in parts) == [0, 7, 8]  # the run goes on with the good ones
  float_image = next(p for p in parts if p["id"] == 7)
  np.testing.assert_allclose(float_image["patches"], -0.5)  # [0, 1] -> [-1, 1]
  assert float_image["caption"] == "clip 7"


# --------------------------------------------------------------------------- pipeline

def _check_row_invariants(batch):
  for r in range(batch["segment_ids"].shape[0]):
    seg, pos, grid = batch["segment_ids"][r], batch["positions"][r], batch["grid"][r]
    k = int(seg.max())
    if k == 0:  # an empty row padding the last batch
      assert (batch["example_ids"][r] == -1).all() and not batch["patches"][r].any()
      continue
    changes = seg[np.flatnonzero(np.diff(seg)) + 1]  # contiguous 1..k, then padding
    np.testing.assert_array_equal(changes, list(range(2, k + 1)) + ([0] if seg[-1] == 0 else []))
    for s in range(1, k + 1):
      p = pos[seg == s]
      assert len(p) == np.prod(grid[s - 1])  # the whole example is in this row
      assert (p >= 0).all() and (p < grid[s - 1]).all()  # positions inside its own grid
      np.testing.assert_array_equal(np.unique(p, axis=0).shape[0], len(p))
    assert (batch["example_ids"][r][k:] == -1).all() and (batch["captions"][r][k:] == "").all()


def test_pipeline_packs_one_epoch_of_native_sizes(video_dir):
  config = _config(video_dir)
  source = sources.open_source("moving_digits", "validation", video_dir, **BUILD)
  by_id = {int(ex["id"]): ex for ex in _all(source)}
  seen = []
  for batch in pipeline.make_dataset(config, split="validation", num_epochs=1, drop_remainder=False):
    _check_row_invariants(batch)
    assert batch["patches"].shape[1:] == (256, 48) and batch["example_ids"].shape[1] == 8
    present = batch["example_ids"] >= 0
    for i, caption, grid in zip(batch["example_ids"][present], batch["captions"][present], batch["grid"][present]):
      ex = by_id[int(i)]
      assert caption == ex["caption"].decode()
      plan = pipeline.plan_shape(*ex["video"].shape[:3], patch=(1, 4, 4), tokens_per_row=256,
                                 max_frames=9, min_side=16)
      np.testing.assert_array_equal(grid * (1, 4, 4), plan)  # the stated rule, applied
      assert grid[0] in (1, 5, 9) and 4 * grid[1] <= ex["video"].shape[1] and 4 * grid[2] <= ex["video"].shape[2]
      seen.append(int(i))
  assert sorted(seen) == sorted(by_id)  # exactly once, none dropped


def test_pipeline_resumes_to_equal_batches(video_dir):
  dataset = pipeline.make_dataset(_config(video_dir), split="train", seed=2)
  iterator = iter(dataset)
  for _ in range(2):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(3)]
  resumed = iter(dataset)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_data_stats_reports_json(video_dir):
  result = stats.data_stats(_config(video_dir), num_batches=3)
  result = json.loads(json.dumps(result))
  assert result["batches"] == 3 and result["rows"] == 6
  assert result["examples"] == sum(result["frames"].values()) == sum(result["height_px"]["counts"])
  assert set(result["frames"]) <= {"1", "5", "9"}
  assert result["examples"] == sum(int(k) * v for k, v in result["examples_per_row"]["rows"].items())
  assert 0 < result["packing_efficiency"] <= 1 and result["tokens_per_example"]["max"] <= 256
  assert result["skipped"] == {reason: 0 for reason in packing.SKIP_REASONS}
  assert result["batches_per_s"] > 0 and len(result["captions"]) == 3
  with pytest.raises(ValueError, match="num_batches must be >= 1"):
    stats.data_stats(_config(video_dir), num_batches=0)


# --------------------------------------------------------------------------- image_pans

def test_image_pans_moves_as_captioned(tmp_path):
  build = dict(min_side=16, max_side=48, durations=(1, 5, 9), train_examples=14, validation_examples=2)
  sources.ensure_dataset("image_pans", str(tmp_path), **build)
  train = _all(sources.open_source("image_pans", "train", str(tmp_path), **build))
  regenerated = dict(image_pans.ImagePans(data_dir=str(tmp_path), **build)._split_generators(None)["train"])
  for ex in train:
    np.testing.assert_array_equal(ex["video"], regenerated[int(ex["id"])]["video"])  # deterministic
    video, boxes, caption = ex["video"], ex["boxes"], ex["caption"].decode()
    assert caption.endswith(image_pans.PHOTOS[ex["label"]][1]) and boxes.shape == (video.shape[0], 4)
    np.testing.assert_allclose(boxes[:, 3] / boxes[:, 2], video.shape[2] / video.shape[1], rtol=1e-4)
    top, left, height = boxes[-1, :3] - boxes[0, :3]
    if video.shape[0] == 1:
      assert caption.startswith("a photo of")
      continue
    assert np.abs(np.diff(video.astype(np.float64), axis=0)).mean() > 0.5  # frames really change
    expected = {"pan to the right": left > 0, "pan to the left": left < 0, "pan down": top > 0,
                "pan up": top < 0, "zoom in": height < 0, "zoom out": height > 0}
    assert [move for move, ok in expected.items() if move in caption and ok], caption
