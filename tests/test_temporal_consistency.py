"""Temporal consistency (eval_metrics: digit identity across frames, centre-of-mass path roughness,
frame-to-frame change) on synthetic clips whose answers are known, and `evaluate --baseline=frames`
(the naive frame-by-frame baseline beside the video model and the real clips) on a smoke pixel
video model with a smoke digit classifier."""
import json
import os

import imageio.v3 as iio
import numpy as np
import pytest

from diffusion_jax import __main__ as cli
from diffusion_jax import config as config_lib
from diffusion_jax import eval_metrics, media
from diffusion_jax import evaluate as evaluate_lib
from diffusion_jax import export as export_lib
from diffusion_jax.data import digits_canvas, imaging, pipeline, sources
from diffusion_jax.train import loop

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
BACKGROUND, INK = (12, 22, 72), np.array([240, 220, 40], np.float64)
SIDE = 40


def _digit_images():
  """sklearn's 8 x 8 digits in [0, 1] and their labels (the generator's glyphs)."""
  return imaging.digit_images()


def _clip(glyphs, positions, backgrounds=None):
  """uint8 [T, SIDE, SIDE, 3]: frame t shows glyphs[t] (8 x 8 in [0, 1]) blended in INK at (y, x)
  positions[t] over backgrounds[t] (default: one navy background)."""
  frames = len(positions)
  backgrounds = np.asarray(backgrounds if backgrounds is not None else [BACKGROUND] * frames, np.float64)
  video = np.empty((frames, SIDE, SIDE, 3), np.float64)
  for t, ((y, x), glyph) in enumerate(zip(positions, glyphs)):
    video[t] = backgrounds[t]
    patch = video[t, y:y + 8, x:x + 8]
    video[t, y:y + 8, x:x + 8] = patch + glyph[..., None] * (INK - patch)
  return np.round(video).astype(np.uint8)


def _template_classifier(images, labels):
  """frames -> digits by the nearest of `images` (8 x 8) to the frame's ink crop: exact on clips made
  by _clip from those glyphs, so the identity metric is tested on what it is given."""
  def classify(video):
    out = []
    for frame, (y, x) in zip(np.asarray(video, np.float64), eval_metrics.ink_track(video)):
      background = frame[0, 0]
      ink = np.linalg.norm(frame - background, axis=-1) / np.linalg.norm(INK - background)
      ys, xs = np.nonzero(ink > 0.05)
      crop = np.zeros((8, 8))
      top, left = ys.min(), xs.min()
      crop[:ys.max() - top + 1, :xs.max() - left + 1] = ink[top:ys.max() + 1, left:xs.max() + 1][:8, :8]
      distances = [np.abs(crop - _top_left(image)).sum() for image in images]
      out.append(int(labels[int(np.argmin(distances))]))
    return np.asarray(out)

  return classify


def _top_left(image):
  """An 8 x 8 glyph shifted so its ink starts at the top-left corner (as _template_classifier crops)."""
  ys, xs = np.nonzero(image > 0.05)
  out = np.zeros_like(image)
  out[:ys.max() - ys.min() + 1, :xs.max() - xs.min() + 1] = image[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  return out


# --------------------------------------------------------------------------- the metrics on known clips


def test_a_digit_at_constant_velocity_has_a_smooth_path_and_one_identity():
  images, labels = _digit_images()
  three = images[np.flatnonzero(labels == 3)[0]]
  positions = [(4 + 2 * t, 3 + 3 * t) for t in range(9)]  # (2, 3) px per frame
  video = _clip([three] * 9, positions)
  track = eval_metrics.ink_track(video)
  np.testing.assert_allclose(np.diff(track, axis=0), [[2.0, 3.0]] * 8, atol=1e-9)
  assert eval_metrics.path_roughness(video) < 1e-9
  classify = _template_classifier(images[:20], labels[:20])
  measured = eval_metrics.temporal_consistency(video, classify=classify)
  assert measured["identity"] == 1.0 and measured["path_roughness"] < 1e-9
  assert measured["frame_change"] > 0
  # Per-frame backgrounds: each frame on its own colour (as frame-by-frame generation may give)
  # still tracks the digit, and still smoothly (uint8 rounding of the blend differs per background).
  backgrounds = [digits_canvas.BACKGROUND_COLOURS[n] for n in list(digits_canvas.BACKGROUND_COLOURS)[:3]] * 3
  assert eval_metrics.path_roughness(_clip([three] * 9, positions, backgrounds)) < 1e-3


def test_frames_at_random_positions_have_a_rough_path():
  images, labels = _digit_images()
  three = images[np.flatnonzero(labels == 3)[0]]
  rng = np.random.default_rng(0)
  positions = [tuple(int(v) for v in rng.integers(0, SIDE - 8, size=2)) for _ in range(17)]
  rough = eval_metrics.path_roughness(_clip([three] * 17, positions))
  assert rough > 0.3  # (y, x) uniform over 32 px of a 40 px side: E|2nd difference| ~ 0.71 side
  # A bounce is one spike on a smooth path: far less rough than random positions.
  bounce = [(10, x) for x in (20, 24, 28, 32, 28, 24, 20, 16, 12)]
  assert 0 < eval_metrics.path_roughness(_clip([three] * 9, bounce)) < rough / 4


def test_frames_showing_different_digits_have_identity_below_one():
  images, labels = _digit_images()
  pick = [int(np.flatnonzero(labels == d)[0]) for d in (3, 3, 3, 5, 7)]
  video = _clip([images[i] for i in pick], [(10 + t, 10 + t) for t in range(5)])
  classify = _template_classifier(images[pick], labels[pick])
  np.testing.assert_array_equal(classify(video), [3, 3, 3, 5, 7])
  assert eval_metrics.temporal_consistency(video, classify=classify)["identity"] == pytest.approx(0.6)
  assert eval_metrics.identity_consistency([4, 1, 1, 4]) == 0.5  # a tie takes the smaller digit: still 0.5
  assert eval_metrics.identity_consistency([9]) == 1.0


def test_frame_change_and_missing_ink():
  still = np.full((4, 16, 16, 3), 100, np.uint8)
  assert eval_metrics.mean_frame_change(still) == 0.0
  ramp = np.stack([np.full((16, 16, 3), 10.0 * t) for t in range(5)])  # float in uint8 levels
  assert eval_metrics.mean_frame_change(ramp) == pytest.approx(10 / 255)
  assert np.isnan(eval_metrics.mean_frame_change(still[:1]))
  assert np.isnan(eval_metrics.path_roughness(still))  # no ink anywhere: no path
  assert np.isnan(eval_metrics.ink_track(still)).all()
  images, labels = _digit_images()
  inked = _clip([images[0]] * 4, [(5, 5), (7, 7), (9, 9), (11, 11)])
  inked[2] = BACKGROUND  # a blank frame: no three consecutive frames show ink
  assert np.isnan(eval_metrics.ink_track(inked)[2]).all() and np.isfinite(eval_metrics.ink_track(inked)[3]).all()
  assert np.isnan(eval_metrics.path_roughness(inked))


def test_temporal_rates_pool_clips_and_skip_several_digit_captions():
  images, labels = _digit_images()
  three = images[np.flatnonzero(labels == 3)[0]]
  smooth = _clip([three] * 5, [(5 + t, 5 + 2 * t) for t in range(5)])
  jumpy = _clip([three] * 5, [(5, 5), (30, 30), (5, 30), (30, 5), (5, 5)])
  one, two = dict(count=1), dict(count=2)
  rates, counts = eval_metrics.temporal_rates([smooth, jumpy, smooth[:1]], [one, two, one])
  assert counts == dict(identity=0, path_roughness=1, frame_change=2)  # one-frame clip: nothing
  assert rates["path_roughness"] < 1e-9 and np.isnan(rates["identity"])
  rates, counts = eval_metrics.temporal_rates([smooth, jumpy], [one, None], classify=lambda v: np.full(len(v), 3))
  assert counts["identity"] == 2 and rates["identity"] == 1.0 and rates["path_roughness"] > 0.2


def test_bad_clips_and_predictions_are_clear_errors():
  with pytest.raises(ValueError, match=r"uint8 levels \[0, 255\]"):
    eval_metrics.path_roughness(np.full((3, 8, 8, 3), -0.5))  # a [-1, 1] clip
  with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
    eval_metrics.mean_frame_change(np.zeros((3, 8, 8), np.uint8))
  with pytest.raises(ValueError, match="integer labels"):
    eval_metrics.identity_consistency([])
  with pytest.raises(ValueError, match="integer labels"):
    eval_metrics.identity_consistency([0.5, 1.0])
  with pytest.raises(ValueError, match="labels >= 0"):
    eval_metrics.identity_consistency([-1, 2])


def test_side_by_side_clips():
  a, b = np.zeros((3, 8, 5, 3), np.uint8), np.full((3, 8, 7, 3), 255, np.uint8)
  both = media.side_by_side([a, b])
  assert both.shape == (3, 8, 5 + 2 + 7, 3) and (both[:, :, 5:7] == media.GUTTER).all()
  with pytest.raises(ValueError, match="one length, height"):
    media.side_by_side([a, b[:2]])


# --------------------------------------------------------------------------- evaluate --baseline=frames


@pytest.fixture(scope="module")
def pixel_model(data_dir, tmp_path_factory):
  """configs/video_dit.py:smoke on one-digit moving_digits pixels trained 2 steps and exported, and a
  smoke digit classifier: (video export, classifier export, moving_digits data dir)."""
  root = tmp_path_factory.mktemp("baseline")
  workdir, data, classifier = str(root / "video"), str(root / "data"), str(root / "classifier")
  config = config_lib.load_config(f"{CONFIGS}/video_dit.py:smoke")
  config_lib.apply_overrides(config, [f"data.data_dir={data}", "data.builder.train_examples=16",
                                      "data.builder.validation_examples=8", "train.steps=2", "train.ckpt_every=2",
                                      "train.eval_batches=1"])
  with config.unlocked():  # not a field of the smoke builder: every caption one digit, so every clip counts
    config.data.builder.max_digits = 1
  sources.ensure_dataset(config.data.name, data, **pipeline.builder_kwargs(config.data))
  loop.train(config, workdir)
  assert cli.main(["train", f"--config={CONFIGS}/classifier_digits.py:smoke,data=digits_canvas,image_size=16",
                   f"--workdir={classifier}", f"--config.data.data_dir={data_dir}"]) == 0
  return (export_lib.export(workdir, str(root / "video_export")),
          export_lib.export(classifier, str(root / "classifier_export")), data)


def test_evaluate_with_the_frame_by_frame_baseline(pixel_model, tmp_path, capsys):
  exported, classifier, _ = pixel_model
  out = str(tmp_path / "eval")
  assert cli.main(["--debug", "evaluate", f"--export={exported}", f"--out={out}", "--num-samples=3",
                   f"--classifier={classifier}", "--baseline=frames"]) == 0
  printed = capsys.readouterr().out
  assert "| metric | video model | frame by frame | real |" in printed
  with open(os.path.join(out, "metrics.json")) as f:
    scores = json.load(f)
  assert scores["baseline"] == "frames" and scores["videos"] == 3
  for which in ("generated", "framewise", "real"):
    assert 0.0 <= scores[f"temporal/identity/{which}"] <= 1.0, which
    assert scores[f"temporal/identity/{which}_clips"] == 3  # one-digit captions, all classified
    assert scores[f"temporal/frame_change/{which}"] > 0, which
    assert f"temporal/path_roughness/{which}" in scores
    assert 0.0 <= scores[f"check/background/{which}"] <= 1.0
  assert scores["check/background/real"] == 1.0
  assert scores["temporal/identity/real"] > 0.5  # the smoke classifier is weak, the real digit one
  # The real clips move along smooth paths (a bounce adds a spike), by the generator's construction.
  assert scores["temporal/path_roughness/real"] < 0.2

  records = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
  for i, record in enumerate(records):
    (h, w), frames = record["size_made"], record["frames_made"]
    gif = iio.imread(os.path.join(out, f"baseline_{i}.gif"), index=None)
    assert gif.shape[:3] == (frames, h, 3 * w + 2 * 2)  # video | frame by frame | real, 2 px gutters
    assert np.any(gif[:, :, :w] != gif[:, :, w + 2:2 * w + 2])  # the baseline draws its own noise
    assert f"baseline_{i}.gif" in scores["files"]

  # frame_by_frame itself: as many frames as the video, each its own draw of noise.
  from diffusion_jax import inference, sample as sample_lib
  from diffusion_jax.train import dit_task

  export = export_lib.load_export(exported)
  gen = inference.with_conditioners(export.config, dit_task.build_model(export.config), export.params, 2)
  request = sample_lib.Request(records[0]["prompt"], (8, 8), 5)
  video = np.zeros((5, 8, 8, 3), np.uint8)
  clips = evaluate_lib.frame_by_frame(gen, [request], [video], sampler="euler", steps=2, cfg_scale=1.0,
                                      rows_per_call=1, seed=0)
  assert len(clips) == 1 and clips[0].shape == (5, 8, 8, 3) and clips[0].dtype == np.uint8
  assert len({frame.tobytes() for frame in clips[0]}) == 5


def test_baseline_bad_input_is_a_clear_error(pixel_model, tmp_path, capsys):
  exported, classifier, _ = pixel_model
  with pytest.raises(ValueError, match="unknown baseline 'clips'"):
    evaluate_lib.evaluate(exported, str(tmp_path / "a"), num_samples=3, baseline="clips")
  assert not os.path.exists(tmp_path / "a")
  # A classifier export is no text-to-video model: evaluate names the task, nothing is written.
  assert cli.main(["evaluate", f"--export={classifier}", f"--out={tmp_path / 'b'}", "--num-samples=3",
                   "--baseline=frames"]) == 2
  assert "task 'classifier'" in capsys.readouterr().err and not os.path.exists(tmp_path / "b")
