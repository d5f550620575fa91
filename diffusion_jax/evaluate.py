"""Metrics and sample grids from an export (export.py): what a trained model is worth.

  evaluate(export_dir, out_dir, num_samples=..., classifier=CLASSIFIER_EXPORT)

writes OUT_DIR/metrics.json, sample grids (PNG, one row per class) and, for
video samples, one GIF per sample. By the export's task:

  dit  generate num_samples images over the classes (dit_task.sample with the
       config's sample section); the classifier's conditional accuracy (a
       sample of class 3 classified as a 3); Fréchet distance and KID between
       real frames of the dataset's eval split and the samples, in a pluggable
       feature space; the held-out diffusion loss per timestep bucket
       (dit_task.eval_fn + summarize_eval over train.eval_batches eval batches).
  vae  the vae task's held-out metrics (eval/psnr, eval/ssim from metrics.py,
       eval/l1, eval/kl, latent stats) over ceil(num_samples / global_batch)
       eval-split batches, reconstructions of the first batch as a grid
       (real | reconstruction, first frames) and side-by-side GIFs.

Feature spaces (the `feature_extractor` callable contract): a function
frames -> features, taking uint8 numpy frames [N, H, W, 3] (image models; videos
[N, T, H, W, 3] for video models) of any N and any size, returning a float
array [N, D] with D fixed, deterministic for its input. It must do its own
resizing and normalisation (Inception-v3 wants 299 px in [-1, 1], I3D 224 px
clips). Default: the project classifier's penultimate features
(classifier_task.classify on the `classifier` export). To use Inception, wrap
a local weights file in such a callable; nothing is downloaded here.

Motion (model-free, for the video DiT's prompt-following check):
motion_direction(frames) -> (dx, dy) and direction_agrees(prompt_direction, dx, dy).

Everything is reproducible for a seed: the same seed gives the same samples,
the same real subset and the same KID subsets, hence the same metrics.
"""
import json
import math
import os

import jax
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import export as export_lib
from diffusion_jax import sharding
from diffusion_jax.data import pipeline, sources

# --------------------------------------------------------------------------- distances between feature sets


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) in float64, the covariance with N - 1 (np.cov's default, as in FID)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
  return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues from
  round-off are clipped to 0)."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
  """Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2) (Heusel et al. 2017):

    |mu1 - mu2|^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

  Tr((cov1 cov2)^(1/2)) is computed as Tr((S cov2 S)^(1/2)) with S = cov1^(1/2): the two
  matrices are similar, and the second is symmetric PSD, so its square root comes from a
  symmetric eigendecomposition (no complex round-off as with a general sqrtm).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
    raise ValueError(f"mismatched Gaussian stats: means {mu1.shape}, {mu2.shape}; covariances {cov1.shape}, "
                     f"{cov2.shape}")
  root1 = _sqrt_psd(cov1)
  middle = root1 @ cov2 @ root1
  trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)))
  value = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt
  return float(max(value, 0.0))


def frechet_distance(features_a, features_b) -> float:
  """FD between Gaussians fitted to two feature sets [N, D] (FID when the features are Inception's)."""
  return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def polynomial_kernel(x, y) -> np.ndarray:
  """KID's kernel k(x, y) = (x . y / d + 1)^3 (Binkowski et al. 2018)."""
  return (np.asarray(x, np.float64) @ np.asarray(y, np.float64).T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(features_a, features_b) -> float:
  """Unbiased estimate of the squared MMD with the polynomial kernel:

    1/(m(m-1)) sum_{i != j} k(a_i, a_j) + 1/(n(n-1)) sum_{i != j} k(b_i, b_j) - 2/(mn) sum_{i,j} k(a_i, b_j).
  """
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  m, n = len(a), len(b)
  if m < 2 or n < 2:
    raise ValueError(f"MMD needs at least 2 samples per set, got {m} and {n}")
  kaa, kbb, kab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
  return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
               - 2.0 * kab.mean())


def kernel_inception_distance(features_a, features_b, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """KID (Binkowski et al. 2018): mean and std of mmd2_unbiased over `num_subsets` random subsets of
  min(subset_size, m // 2, n // 2) samples (at least 2) from each set, drawn without replacement by
  a seeded generator. Halving keeps the subsets different from each other (so the std means
  something) when there are fewer than 2 x subset_size samples; each estimate stays unbiased.
  The value scales with the features' magnitude (a cubic kernel): compare KIDs within one feature
  space only."""
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  size = max(2, min(subset_size, len(a) // 2, len(b) // 2))
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------- motion

def motion_direction(frames) -> tuple[float, float]:
  """(dx, dy) in pixels per frame of the foreground's centre of mass; +x right, +y down.

  frames: [T, H, W] or [T, H, W, C], any dtype. The background of each frame
  is its median colour; a pixel's foreground weight is its colour distance
  from it, kept where it exceeds a quarter of the clip's largest distance.
  The velocity is the least-squares slope of the weighted centre of mass over
  the frame index (a bounce off a wall pulls it towards zero). (nan, nan)
  when fewer than two frames show any foreground.
  """
  video = np.asarray(frames, np.float64)
  if video.ndim == 3:
    video = video[..., None]
  if video.ndim != 4:
    raise ValueError(f"motion_direction wants frames [T, H, W] or [T, H, W, C], got shape {video.shape}")
  background = np.median(video.reshape(video.shape[0], -1, video.shape[-1]), axis=1)  # [T, C]
  distance = np.linalg.norm(video - background[:, None, None, :], axis=-1)  # [T, H, W]
  peak = distance.max()
  if peak <= 0:
    return float("nan"), float("nan")
  weight = np.where(distance > 0.25 * peak, distance, 0.0)
  mass = weight.sum(axis=(1, 2))
  present = mass > 0
  if present.sum() < 2:
    return float("nan"), float("nan")
  ys, xs = np.arange(video.shape[1]), np.arange(video.shape[2])
  cy = (weight.sum(axis=2) @ ys)[present] / mass[present]
  cx = (weight.sum(axis=1) @ xs)[present] / mass[present]
  t = np.arange(video.shape[0])[present].astype(np.float64)
  t -= t.mean()
  dx = float(np.dot(t, cx - cx.mean()) / np.dot(t, t))
  dy = float(np.dot(t, cy - cy.mean()) / np.dot(t, t))
  return dx, dy


def direction_agrees(prompt_direction: str, dx: float, dy: float, *, min_speed: float = 0.25,
                     max_angle_deg: float = 22.5) -> bool:
  """Whether a measured motion (dx, dy) px/frame matches a direction of data.sources.DIRECTIONS.

  "still": speed below min_speed. Any other direction: speed at least
  min_speed and at most max_angle_deg away from it; the default 22.5 degrees
  means "the nearest of the eight named directions is the prompt's". A nan
  motion (nothing visible) agrees with nothing.
  """
  if prompt_direction not in sources.DIRECTIONS:
    raise ValueError(f"unknown direction {prompt_direction!r}; known: {sorted(sources.DIRECTIONS)}")
  if not (math.isfinite(dx) and math.isfinite(dy)):
    return False
  speed = math.hypot(dx, dy)
  if prompt_direction == "still":
    return speed < min_speed
  if speed < min_speed:
    return False
  uy, ux = sources.DIRECTIONS[prompt_direction]
  cosine = (dx * ux + dy * uy) / (speed * math.hypot(ux, uy))
  return cosine >= math.cos(math.radians(max_angle_deg)) - 1e-9


# --------------------------------------------------------------------------- pictures

def save_grid(images, path: str, *, columns: int, pad: int = 2) -> str:
  """Writes uint8 images [N, H, W, C] as one PNG, `columns` a row, with a dark gutter."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top

  images = np.asarray(images)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 40, np.uint8)
  for index in range(n):
    i, j = divmod(index, columns)
    canvas[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = images[index]
  scale = max(1, 256 // max(canvas.shape[:2]))  # small images are shown larger
  canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
  iio.imwrite(path, canvas[..., 0] if c == 1 else canvas)
  return path


def save_gif(video, path: str, *, fps: int = 8) -> str:
  """Writes a uint8 video [T, H, W, C] as a looping GIF."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top

  video = np.asarray(video)
  if video.ndim != 4 or video.dtype != np.uint8:
    raise ValueError(f"save_gif wants uint8 [T, H, W, C], got {video.dtype} {video.shape}")
  iio.imwrite(path, video[..., 0] if video.shape[-1] == 1 else video, duration=1000 / fps, loop=0)
  return path


def write_samples(samples, labels, out_dir: str, num_classes: int) -> list[str]:
  """samples.png (rows by class) for images [N, H, W, C]; for videos [N, T, H, W, C] also a
  first-frame grid and sample_{i:04d}_class{c}.gif each. Returns the files written."""
  samples, labels = np.asarray(samples), np.asarray(labels)
  order = np.argsort(labels, kind="stable")
  per_class = max(int(np.bincount(labels, minlength=num_classes).max()), 1)
  files = []
  if samples.ndim == 5:
    for i, (video, label) in enumerate(zip(samples, labels)):
      files.append(save_gif(video, os.path.join(out_dir, f"sample_{i:04d}_class{int(label)}.gif")))
    samples = samples[:, 0]
  files.append(save_grid(samples[order], os.path.join(out_dir, "samples.png"), columns=per_class))
  return files


# --------------------------------------------------------------------------- data

def real_frames(config, num: int, *, seed: int, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
  """(frames uint8 [num, S, S, C], labels [num]) of the config's eval split, a seeded subset,
  resized to data.image_size where they differ (the size the model samples at)."""
  data = config.data
  source = sources.open_source(data.name, data.eval_split, data_dir or data.data_dir,
                               **pipeline.builder_kwargs(data))
  if len(source) == 0:
    raise ValueError(f"eval split {data.eval_split!r} of {data.name!r} is empty")
  rng = np.random.default_rng([seed, 1])
  indices = rng.choice(len(source), num, replace=num > len(source))
  size = int(data.image_size)
  frames, labels = [], []
  for index in indices:
    example = source[int(index)]
    labels.append(int(example["label"]))
    video = np.asarray(example["video"])
    frame = video[0] if video.ndim == 4 else video
    if frame.shape[:2] != (size, size):
      frame = np.clip(np.round(sources.resize_frames(frame[None].astype(np.float32), size, size)[0]), 0, 255)
    frames.append(frame.astype(np.uint8))
  return np.stack(frames), np.asarray(labels, np.int64)


def _config_with_data_dir(config, data_dir: str):
  config = config_lib.from_json(config_lib.to_json(config))
  if data_dir:
    config.data.data_dir = data_dir
  return config


def _one_device_mesh(config):
  """The config's mesh axes on the first local device: the model's logical constraints resolve,
  and nothing is split."""
  mesh_config = config_lib.from_json(config_lib.to_json(config)).mesh
  mesh_config.shape = [-1] + [1] * (len(mesh_config.axes) - 1)
  return sharding.make_mesh(mesh_config, devices=jax.local_devices()[:1]), sharding.logical_rules(mesh_config)


def held_out_loss(export, *, data_dir: str = "", batches: int = 0) -> dict:
  """The task's held-out metrics (eval_fn + summarize_eval) over `batches` (default
  train.eval_batches) batches of the eval split: the loop's fixed eval set (same seed, same noise),
  so the numbers compare with the run's eval/*."""
  from diffusion_jax.train import loop  # pylint: disable=g-import-not-at-top

  config = _config_with_data_dir(export.config, data_dir)
  task = loop.TASKS[config.task]
  model, schedule = task.build_model(config), task.make_schedule(config)
  mesh, rules = _one_device_mesh(config)
  source = iter(task.make_dataset(config, split=config.data.eval_split, process_index=0, process_count=1,
                                  seed=config.data.shuffle_seed))
  eval_batch = jax.jit(lambda params, batch, index: task.eval_fn(params, model, schedule, batch, index, config))
  auxes = []
  with sharding.activate(mesh, rules):
    for index in range(batches or int(config.train.get("eval_batches", 1))):
      batch = {k: v for k, v in next(source).items() if k not in ("captions", "skipped")}
      auxes.append(jax.device_get(eval_batch(export.params, batch, np.int32(index))))
  return task.summarize_eval(auxes)


# --------------------------------------------------------------------------- evaluate

def _classifier_features(classifier_export):
  from diffusion_jax.train import classifier_task  # pylint: disable=g-import-not-at-top

  def features(frames):
    return classifier_task.classify(classifier_export, frames)[1]

  features.__name__ = f"classifier_penultimate:{classifier_export.path}"
  return features


def _evaluate_dit(export, out_dir, *, num_samples, seed, classifier, feature_extractor, data_dir) -> dict:
  from diffusion_jax.train import classifier_task, dit_task  # pylint: disable=g-import-not-at-top

  config = export.config
  num_classes = int(config.model.num_classes)
  labels = np.arange(num_samples) % num_classes
  sample_config = config.get("sample", {})
  sampler, steps = sample_config.get("sampler", "ddim"), int(sample_config.get("steps", 50))
  cfg_scale, eta = float(sample_config.get("cfg_scale", 1.0)), float(sample_config.get("eta", 0.0))
  mesh, rules = _one_device_mesh(config)
  with sharding.activate(mesh, rules):
    samples = dit_task.sample(dit_task.build_model(config), export.params, config, labels,
                              jax.random.PRNGKey(seed), sampler=sampler, steps=steps, eta=eta,
                              cfg_scale=cfg_scale)
  metrics = dict(sampler=sampler, sample_steps=steps, cfg_scale=cfg_scale)
  files = write_samples(samples, labels, out_dir, num_classes)

  classifier_export = export_lib.load_export(classifier) if classifier else None
  real, real_labels = real_frames(config, num_samples, seed=seed, data_dir=data_dir)
  if classifier_export is not None:
    predicted = np.argmax(classifier_task.classify(classifier_export, samples)[0], axis=-1)
    metrics["classifier_accuracy"] = float(np.mean(predicted == labels))
    # The same classifier on real frames of this size: the ceiling the samples are held to.
    real_predicted = np.argmax(classifier_task.classify(classifier_export, real)[0], axis=-1)
    metrics["classifier_accuracy_real"] = float(np.mean(real_predicted == real_labels))
    metrics["classifier"] = classifier_export.path
  if feature_extractor is None and classifier_export is not None:
    feature_extractor = _classifier_features(classifier_export)
  if feature_extractor is not None:
    real_features = np.asarray(feature_extractor(real), np.float64)
    fake_features = np.asarray(feature_extractor(samples), np.float64)
    if real_features.shape[0] != len(real) or fake_features.shape[0] != len(samples) or real_features.ndim != 2:
      raise ValueError(f"feature_extractor must map [N, ...] frames to [N, D]; got {real_features.shape} for "
                       f"{len(real)} real and {fake_features.shape} for {len(samples)} generated frames")
    metrics["feature_space"] = getattr(feature_extractor, "__name__", type(feature_extractor).__name__)
    metrics["feature_dim"] = int(real_features.shape[1])
    metrics["fd"] = frechet_distance(real_features, fake_features)
    metrics["kid"], metrics["kid_std"] = kernel_inception_distance(real_features, fake_features, seed=seed)
  else:
    metrics["feature_space"] = "none (no classifier export and no feature_extractor: FD and KID skipped)"
  files.append(save_grid(real[np.argsort(real_labels, kind="stable")], os.path.join(out_dir, "real.png"),
                         columns=max(-(-num_samples // num_classes), 1)))
  metrics.update(held_out_loss(export, data_dir=data_dir))
  return metrics, files


def _evaluate_vae(export, out_dir, *, num_samples, seed, data_dir) -> dict:
  """Held-out reconstruction metrics of a VAE export over the loop's fixed eval batches (the
  eval set is fixed by data.shuffle_seed; `seed` does not change it)."""
  del seed
  from diffusion_jax.train import vae_task  # pylint: disable=g-import-not-at-top

  config = _config_with_data_dir(export.config, data_dir)
  batches = -(-num_samples // int(config.train.global_batch))
  metrics = held_out_loss(export, data_dir=data_dir, batches=batches)
  metrics["eval_clips"] = batches * int(config.train.global_batch)

  batch = next(iter(vae_task.make_dataset(config, split=config.data.eval_split, seed=config.data.shuffle_seed)))
  video = np.asarray(batch["video"])[:num_samples]
  model = vae_task.build_model(config)
  mesh, rules = _one_device_mesh(config)
  with sharding.activate(mesh, rules):
    recon, _, _ = jax.jit(lambda p, v: model.apply({"params": p}, v, sample_posterior=False))(
        export.params["vae"], video.astype(np.float32) / 127.5 - 1.0)
  recon = np.asarray(np.clip((np.asarray(recon) + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
  pairs = np.stack([video[:, 0], recon[:, 0]], axis=1).reshape((-1,) + video.shape[2:])
  files = [save_grid(pairs, os.path.join(out_dir, "reconstructions.png"), columns=2)]
  if video.shape[1] > 1:
    for i in range(len(video)):
      files.append(save_gif(np.concatenate([video[i], recon[i]], axis=2),
                            os.path.join(out_dir, f"reconstruction_{i:04d}.gif")))
  return metrics, files


def _evaluate_video_dit(export, out_dir, *, num_samples, seed, classifier, feature_extractor, data_dir) -> dict:
  """Text-to-video (or -image) on held-out captions: num_samples videos for the
  captions of the eval split's video clips (at each clip's own size,
  sample.frames frames; a fixed-size image model: its images at its size),
  then per video: the classifier's majority vote over its frames against the
  caption's digit (the example's label), the measured motion against the
  caption's direction (captions of bouncing digits are left out of that count),
  and FD/KID between the generated and real frames in the feature space."""
  from diffusion_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.train import classifier_task, dit_task  # pylint: disable=g-import-not-at-top

  config = _config_with_data_dir(export.config, data_dir)
  if config.get("latent", None) is not None and config.latent.get("vae", "") and not os.path.isabs(config.latent.vae):
    config.latent.vae = os.path.join(export.path, config.latent.vae)  # the VAE bundled in the export
  gen = sample_lib.with_conditioners(config, dit_task.build_model(config), export.params, int(export.info["step"]))
  source = sources.open_source(config.data.name, config.data.eval_split, config.data.data_dir,
                               **pipeline.builder_kwargs(config.data))
  rng = np.random.default_rng([seed, 2])
  order = rng.permutation(len(source))
  makes_video = "image_size" not in config.data
  chosen = []
  for index in order:
    example = source[int(index)]
    shape = np.asarray(example["source_shape"]) if "source_shape" in example else np.asarray(example["video"]).shape
    if shape[0] > 1 or not makes_video:
      chosen.append(example)
    if len(chosen) == num_samples:
      break
  if len(chosen) < 2:
    kind = "video clips" if makes_video else "examples"
    raise ValueError(f"the eval split of {config.data.name} has fewer than 2 {kind} to take captions from")
  frames = int(config.sample.frames)
  requests, labels, directions = [], [], []
  for example in chosen:
    caption = example["caption"].decode() if isinstance(example["caption"], bytes) else str(example["caption"])
    shape = np.asarray(example["source_shape"])
    requests.append(sample_lib.Request(caption, (int(shape[1]), int(shape[2])), min(frames, int(shape[0]))))
    labels.append(int(example["label"]))
    directions.append(sources.caption_direction(caption))
  sampler = str(config.sample.sampler)
  steps, cfg_scale = int(config.sample.steps), float(config.sample.cfg_scale)
  videos, notes = sample_lib.sample_requests(gen, requests, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                             rows_per_call=int(config.sample.get("rows_per_call", 4)), seed=seed)
  sample_lib.write_outputs(videos, requests, notes, out_dir, gen=gen, sampler=sampler, steps=steps,
                           cfg_scale=cfg_scale, seed=seed)
  files = [os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.startswith("sample_")]
  metrics = dict(sampler=sampler, sample_steps=steps, cfg_scale=cfg_scale, videos=len(videos))

  real_clips = [clip[:len(video)] for clip, video in zip(_source_clips(config, chosen), videos)]

  def motion_agreement(clips):
    agrees = [direction_agrees(d, *motion_direction(c)) for c, d in zip(clips, directions) if d is not None]
    return (float(np.mean(agrees)) if agrees else float("nan")), len(agrees)

  metrics["motion_agreement"], metrics["motion_checked"] = motion_agreement(videos)
  metrics["motion_agreement_real"], _ = motion_agreement(real_clips)  # the check's ceiling on real clips
  size = 32  # frames are compared at one size (the classifier resizes anyway)

  def frames_at(clips):
    return np.concatenate([np.clip(np.round(sources.resize_frames(c.astype(np.float32), size, size)), 0, 255)
                           .astype(np.uint8) for c in clips])

  generated, real = frames_at(videos), frames_at(real_clips)
  classifier_export = export_lib.load_export(classifier) if classifier else None
  if classifier_export is not None:
    def majority(clip):
      return int(np.bincount(np.argmax(classifier_task.classify(classifier_export, clip)[0], -1), minlength=10).argmax())
    predicted = [majority(v) for v in videos]
    metrics["classifier_accuracy"] = float(np.mean(np.asarray(predicted) == np.asarray(labels)))
    metrics["classifier_accuracy_real"] = float(np.mean([majority(c) == l for c, l in zip(real_clips, labels)]))
    metrics["classifier"] = classifier_export.path
    if feature_extractor is None:
      feature_extractor = _classifier_features(classifier_export)
  if feature_extractor is not None:
    real_features = np.asarray(feature_extractor(real), np.float64)
    fake_features = np.asarray(feature_extractor(generated), np.float64)
    metrics["feature_space"] = getattr(feature_extractor, "__name__", type(feature_extractor).__name__)
    metrics["fd"] = frechet_distance(real_features, fake_features)
    metrics["kid"], metrics["kid_std"] = kernel_inception_distance(real_features, fake_features, seed=seed)
  metrics.update(held_out_loss(export, data_dir=data_dir))
  return metrics, files


def _source_clips(config, examples) -> list[np.ndarray]:
  """The real clips behind eval examples, uint8 [T, H, W, C] each: their pixels, or for an
  encoded latent dataset the original clips of its source dataset, found by id."""
  if all("video" in ex for ex in examples):
    return [np.asarray(ex["video"]) for ex in examples]
  from diffusion_jax import encode  # pylint: disable=g-import-not-at-top

  meta = encode.encoded_metadata(str(config.data.name))
  origin = meta["source"]
  split = meta["splits"][config.data.eval_split]["source_split"]
  opened = sources.open_source(origin["name"], split, origin["data_dir"], **(origin.get("builder_kwargs") or {}))
  by_id = {int(opened[i]["id"]): i for i in range(len(opened))}
  clips = [np.asarray(opened[by_id[int(ex["id"])]]["video"]) for ex in examples]
  return [clip if clip.ndim == 4 else clip[None] for clip in clips]


def evaluate(export_dir: str, out_dir: str, *, num_samples: int, seed: int = 0, classifier: str = "",
             feature_extractor=None, data_dir: str = "") -> dict:
  """Evaluates an export; writes OUT_DIR/metrics.json and pictures; returns the metrics.

  classifier: a classifier export (configs/classifier_digits.py, exported) for
  conditional accuracy and the default feature space; feature_extractor: a
  callable frames -> [N, D] (see the module docstring) replacing it for FD/KID.
  data_dir overrides the export's data.data_dir (where the eval split lives).
  """
  if num_samples < 2:
    raise ValueError(f"num_samples={num_samples}: FD and KID need at least 2 samples")
  export = export_lib.load_export(export_dir)
  os.makedirs(out_dir, exist_ok=True)
  task = export.config.task
  common = dict(num_samples=num_samples, seed=seed, data_dir=data_dir)
  from diffusion_jax.train import dit_task  # pylint: disable=g-import-not-at-top

  if task == "dit" and dit_task.samples_from_prompts(export.config):
    metrics, files = _evaluate_video_dit(export, out_dir, classifier=classifier, feature_extractor=feature_extractor,
                                         **common)
  elif task == "dit":
    metrics, files = _evaluate_dit(export, out_dir, classifier=classifier, feature_extractor=feature_extractor,
                                   **common)
  elif task == "vae":
    metrics, files = _evaluate_vae(export, out_dir, **common)
  else:
    raise ValueError(f"evaluate knows tasks 'dit' and 'vae'; {export_dir} is task {task!r}")
  metrics = dict(metrics, export=export.path, task=task, step=export.info["step"], num_samples=num_samples,
                 seed=seed, files=sorted(os.path.basename(f) for f in files))
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1, sort_keys=True)
    f.write("\n")
  return metrics
