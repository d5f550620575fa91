"""Evaluation: FD and KID against closed forms, motion direction on synthetic clips, the digit
classifier, and evaluate() on smoke DiT and VAE exports (finite, reproducible)."""
import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.linalg

from diffusion_jax import config as config_lib
from diffusion_jax import eval_metrics
from diffusion_jax import evaluate as evaluate_lib
from diffusion_jax import export as export_lib
from diffusion_jax import inference
from diffusion_jax.train import loop
from test_train import smoke_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CLASSIFIER_CONFIG = os.path.join(CONFIGS, "classifier_digits.py")

# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
  sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)  # W2 of commuting Gaussians
  got = eval_metrics.frechet_distance_from_stats(mu1, np.diag(sd1 ** 2), mu2, np.diag(sd2 ** 2))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_of_non_commuting_covariances():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
  cov1, cov2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
  mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
  reference = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * np.real(scipy.linalg.sqrtm(cov1 @ cov2)))
  np.testing.assert_allclose(eval_metrics.frechet_distance_from_stats(mu1, cov1, mu2, cov2), reference, rtol=1e-8)
  assert eval_metrics.frechet_distance_from_stats(mu1, cov1, mu1, cov1) < 1e-9


def test_frechet_distance_of_samples_approaches_the_gaussians():
  rng = np.random.default_rng(1)
  a = rng.normal([0.0, 0.0], [1.0, 1.0], size=(20000, 2))
  b = rng.normal([2.0, 0.0], [1.0, 3.0], size=(20000, 2))
  expected = 4.0 + (3.0 - 1.0) ** 2
  np.testing.assert_allclose(eval_metrics.frechet_distance(a, b), expected, rtol=0.03)
  assert eval_metrics.frechet_distance(a, a) < 1e-9
  assert eval_metrics.frechet_distance(a, rng.normal(size=(20000, 2))) < 0.01


# --------------------------------------------------------------------------- KID


def _poly_kernel_mean_1d(mu_p, mu_q, sd):
  """E k(x, y) for independent x ~ N(mu_p, sd^2), y ~ N(mu_q, sd^2) in one dimension, k = (xy + 1)^3:
  E x^3 E y^3 + 3 E x^2 E y^2 + 3 E x E y + 1, with E x^2 = mu^2 + sd^2, E x^3 = mu^3 + 3 mu sd^2."""
  m2 = lambda mu: mu ** 2 + sd ** 2  # noqa: E731
  m3 = lambda mu: mu ** 3 + 3 * mu * sd ** 2  # noqa: E731
  return m3(mu_p) * m3(mu_q) + 3 * m2(mu_p) * m2(mu_q) + 3 * mu_p * mu_q + 1


def test_mmd_of_one_dimensional_gaussians_is_the_closed_form():
  p, q, sd = 0.0, 1.0, 0.3  # a small sd keeps the cubic kernel's estimator spread low (~2% at n = 2000)
  expected = (_poly_kernel_mean_1d(p, p, sd) + _poly_kernel_mean_1d(q, q, sd)
              - 2 * _poly_kernel_mean_1d(p, q, sd))  # 7.6129
  draws = [(np.random.default_rng(seed).normal(p, sd, size=(2000, 1)),
            np.random.default_rng(100 + seed).normal(q, sd, size=(2000, 1))) for seed in range(4)]
  # Unbiased: the mean of independent estimates converges to the closed form.
  np.testing.assert_allclose(np.mean([eval_metrics.mmd2_unbiased(a, b) for a, b in draws]), expected, rtol=0.04)
  kid, kid_std = eval_metrics.kernel_inception_distance(*draws[0], num_subsets=20, subset_size=1000, seed=0)
  np.testing.assert_allclose(kid, expected, rtol=0.08)
  assert kid_std > 0
  same = eval_metrics.mmd2_unbiased(draws[0][0], draws[1][0])
  assert abs(same) < 0.02 * expected


def test_kid_of_one_distribution_is_about_zero_and_seeded():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
  kid, _ = eval_metrics.kernel_inception_distance(a, b, num_subsets=20, subset_size=200, seed=0)
  far, _ = eval_metrics.kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=200, seed=0)
  assert abs(kid) < 0.02 < far
  assert eval_metrics.kernel_inception_distance(a, b, num_subsets=5, subset_size=100, seed=7) == \
      eval_metrics.kernel_inception_distance(a, b, num_subsets=5, subset_size=100, seed=7)
  identical = eval_metrics.mmd2_unbiased(a, a)  # only the diagonal terms differ: O(1/n)
  assert abs(identical) < 0.05


# --------------------------------------------------------------------------- motion


def _moving_square(dx, dy, frames=9, size=40, side=6):
  video = np.zeros((frames, size, size, 3), np.uint8)
  video[...] = (12, 22, 72)  # navy background
  for t in range(frames):
    y, x = int(round(15 + dy * t)), int(round(12 + dx * t))
    video[t, y:y + side, x:x + side] = (240, 220, 40)
  return video


@pytest.mark.parametrize("dx, dy, direction", [(2.0, 0.0, "right"), (-1.5, 0.0, "left"), (0.0, -1.0, "up"),
                                               (1.0, 1.0, "down-right"), (0.0, 0.0, "still")])
def test_motion_direction_of_a_moving_square(dx, dy, direction):
  got_dx, got_dy = eval_metrics.motion_direction(_moving_square(dx, dy))
  np.testing.assert_allclose([got_dx, got_dy], [dx, dy], atol=0.1)
  assert eval_metrics.direction_agrees(direction, got_dx, got_dy)
  others = [d for d in ("right", "left", "up", "down", "down-right", "up-left", "still") if d != direction]
  assert not any(eval_metrics.direction_agrees(d, got_dx, got_dy) for d in others)


def test_motion_direction_without_foreground_and_bad_direction():
  blank = np.zeros((5, 8, 8, 3), np.uint8)
  dx, dy = eval_metrics.motion_direction(blank)
  assert np.isnan(dx) and np.isnan(dy)
  assert not eval_metrics.direction_agrees("still", dx, dy)
  with pytest.raises(ValueError, match="unknown direction 'sideways'"):
    eval_metrics.direction_agrees("sideways", 1.0, 0.0)


def test_video_samples_become_gifs(tmp_path):
  videos = np.stack([_moving_square(1, 0, frames=5), _moving_square(0, 1, frames=5)])
  files = evaluate_lib.write_samples(videos, np.array([1, 0]), str(tmp_path), num_classes=2)
  gifs = sorted(f for f in files if f.endswith(".gif"))
  assert [os.path.basename(f) for f in gifs] == ["sample_0000_class1.gif", "sample_0001_class0.gif"]
  frames = iio.imread(gifs[0], index=None)
  assert frames.shape[0] == 5 and frames.shape[1:3] == (40, 40)
  assert os.path.isfile(tmp_path / "samples.png")


# --------------------------------------------------------------------------- classifier and evaluate


def _classifier_config(data_dir, *overrides):
  config = config_lib.load_config(CLASSIFIER_CONFIG + ":smoke,data=digits_canvas,image_size=16")
  config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", *overrides])
  return config


@pytest.fixture(scope="module")
def exports(data_dir, tmp_path_factory):
  """Smoke DiT and smoke classifier, trained a few steps and exported: (dit export, classifier export)."""
  root = tmp_path_factory.mktemp("evaluate")
  loop.train(smoke_config(data_dir, "train.steps=2", "train.ckpt_every=2", "train.eval_batches=1"),
             str(root / "dit"))
  loop.train(_classifier_config(data_dir), str(root / "classifier"))
  return (export_lib.export(str(root / "dit"), str(root / "dit_export")),
          export_lib.export(str(root / "classifier"), str(root / "classifier_export")))


def test_classify_any_frame_size(exports):
  classifier = export_lib.load_export(exports[1])
  rng = np.random.default_rng(0)
  for size in (16, 37):
    frames = rng.integers(0, 256, size=(5, size, size, 3)).astype(np.uint8)
    logits, features = inference.classify(classifier, frames, batch_size=4)
    assert logits.shape == (5, 10) and features.shape == (5, classifier.config.model.features)
    assert np.isfinite(logits).all()
    alone, _ = inference.classify(classifier, frames[:1])
    np.testing.assert_allclose(alone, logits[:1], rtol=1e-5, atol=1e-5)  # chunk padding changes nothing
  with pytest.raises(ValueError, match="uint8 frames"):
    inference.classify(classifier, np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match="task 'classifier'"):
    inference.classify(export_lib.load_export(exports[0]), np.zeros((2, 16, 16, 3), np.uint8))


def test_evaluate_dit_export_writes_finite_reproducible_metrics(exports, data_dir, tmp_path):
  dit_export, classifier = exports
  metrics = evaluate_lib.evaluate(dit_export, str(tmp_path / "a"), num_samples=10, seed=0, classifier=classifier,
                                  data_dir=data_dir)
  on_disk = json.loads((tmp_path / "a" / "metrics.json").read_text())
  assert on_disk == json.loads(json.dumps(metrics))
  for name in ("classifier_accuracy", "classifier_accuracy_real", "fd", "kid", "kid_std", "eval/loss"):
    assert np.isfinite(metrics[name]), name
  assert 0.0 <= metrics["classifier_accuracy"] <= 1.0 and metrics["fd"] > 0 and metrics["kid_std"] > 0
  assert metrics["feature_space"].startswith("classifier_penultimate:")
  assert metrics["feature_dim"] == 16  # the smoke classifier's features
  assert any(f"eval/loss_t{i}" in metrics for i in range(4))
  assert {"samples.png", "real.png"} <= set(os.listdir(tmp_path / "a"))
  grid = iio.imread(tmp_path / "a" / "samples.png")
  assert grid.ndim == 3 and grid.shape[-1] == 3

  again = evaluate_lib.evaluate(dit_export, str(tmp_path / "b"), num_samples=10, seed=0, classifier=classifier,
                                data_dir=data_dir)
  assert again == metrics
  other = evaluate_lib.evaluate(dit_export, str(tmp_path / "c"), num_samples=10, seed=1, classifier=classifier,
                                data_dir=data_dir)
  assert other["fd"] != metrics["fd"]


def test_evaluate_with_a_user_feature_extractor(exports, data_dir, tmp_path):
  def mean_colour_and_brightness(frames):
    x = frames.astype(np.float64) / 255.0
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)

  metrics = evaluate_lib.evaluate(exports[0], str(tmp_path), num_samples=6, feature_extractor=mean_colour_and_brightness,
                                  data_dir=data_dir)
  assert metrics["feature_space"] == "mean_colour_and_brightness" and metrics["feature_dim"] == 6
  assert np.isfinite(metrics["fd"]) and "classifier_accuracy" not in metrics
  with pytest.raises(ValueError, match="num_samples=1"):
    evaluate_lib.evaluate(exports[0], str(tmp_path), num_samples=1)


def test_evaluate_vae_export(smoke_vae, tmp_path):
  config, workdir = smoke_vae
  out = export_lib.export(workdir, str(tmp_path / "vae_export"))
  info = export_lib.load_export(out).info
  assert len(info["latent_stats"]["mean"]) == len(info["latent_stats"]["std"]) > 0
  handle = inference.load_vae(out)  # a VAE export reads back as a VAE
  assert handle.latent_stats == info["latent_stats"] and handle.step == config.train.steps

  metrics = evaluate_lib.evaluate(out, str(tmp_path / "eval"), num_samples=3)
  for name in ("eval/psnr", "eval/ssim", "eval/l1", "eval/loss"):
    assert np.isfinite(metrics[name]), name
  assert metrics["eval_clips"] == config.train.global_batch  # ceil(3 / 8) batches
  written = set(os.listdir(tmp_path / "eval"))
  assert {"metrics.json", "reconstructions.png"} <= written
  assert {f"reconstruction_{i:04d}.gif" for i in range(3)} <= written  # 5-frame clips
  frames = iio.imread(tmp_path / "eval" / "reconstruction_0000.gif", index=None)
  assert frames.shape[0] == config.data.frames and frames.shape[2] == 2 * config.data.width


def test_vae_ceiling_and_clip_classification(smoke_vae, exports):
  """The plumbing of the video checks' ceilings: VAE reconstructions of real clips come back as
  uint8 clips of the VAE's 1 + 4k frames and crop, the checks run on them, and the classifier
  labels frames of any size, one label per frame."""
  from diffusion_jax.data import imaging, moving_digits

  _, workdir = smoke_vae
  vae = inference.load_vae(workdir)
  images, labels = imaging.digit_images()
  examples = [moving_digits.render_moving_digits(images, labels, np.random.default_rng([3, 0, i]), min_side=20,
                                                 max_side=30, max_digits=1, durations=(7,)) for i in range(2)]
  clips = [ex["video"] for ex in examples]
  recon = evaluate_lib.reconstruct(vae, clips)
  f = vae.spatial_factor
  for clip, out in zip(clips, recon):
    assert out.dtype == np.uint8 and out.shape == (5, clip.shape[1] // f * f, clip.shape[2] // f * f, 3)
  # Zero-padded at the end to a longer clip's frames, a clip reconstructs as it does alone (the VAE
  # is causal in time); crop_multiple crops to multiples of it as well as of the VAE's factor.
  longer = moving_digits.render_moving_digits(images, labels, np.random.default_rng([3, 0, 9]), min_side=20,
                                              max_side=30, max_digits=1, durations=(9,))["video"]
  alone = evaluate_lib.reconstruct(vae, clips[:1], crop_multiple=2 * f)[0]
  together = evaluate_lib.reconstruct(vae, [clips[0], longer], crop_multiple=2 * f)
  assert alone.shape == (5, clips[0].shape[1] // (2 * f) * 2 * f, clips[0].shape[2] // (2 * f) * 2 * f, 3)
  assert together[0].shape == alone.shape and together[1].shape[0] == 9
  np.testing.assert_allclose(together[0].astype(np.int32), alone.astype(np.int32), atol=1)
  rates, counts = eval_metrics.attribute_rates(recon, [eval_metrics.clip_truth(ex) for ex in examples])
  assert counts["background"] == 2 and np.isfinite(rates["seam"])
  classifier = export_lib.load_export(exports[1])
  for clip in clips:
    predicted = evaluate_lib.classify_frames(classifier, clip)
    assert predicted.shape == (len(clip),) and ((0 <= predicted) & (predicted < 10)).all()


def test_the_frame_baseline_needs_a_video_model(exports, tmp_path):
  """evaluate --baseline=frames compares a text-to-video model with itself run frame by frame; a
  class-conditional image DiT is refused by name, before anything is sampled or written."""
  with pytest.raises(ValueError, match="does not make videos from prompts"):
    evaluate_lib.evaluate(exports[0], str(tmp_path / "out"), num_samples=4, baseline="frames")
  assert not os.path.exists(tmp_path / "out")


def test_eval_data_needs_a_prompt_model(exports, tmp_path):
  """--eval-data gives a text-to-video model another dataset's captions: a class-conditional DiT is
  refused by name, and an export of a task evaluate does not know is refused as that first, before
  anything is loaded from the other dataset or written."""
  dit_export, classifier_export = exports
  with pytest.raises(ValueError, match="takes none"):
    evaluate_lib.evaluate(dit_export, str(tmp_path / "out"), num_samples=4, eval_data="moving_digits")
  with pytest.raises(ValueError, match="evaluate knows tasks 'dit' and 'vae'"):
    evaluate_lib.evaluate(classifier_export, str(tmp_path / "out"), num_samples=4, eval_data="moving_digits")
  assert not os.path.exists(tmp_path / "out")
