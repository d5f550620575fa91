"""Metrics and sample grids from an export (export.py): what a trained model is worth.

  evaluate(export_dir, out_dir, num_samples=..., classifier=CLASSIFIER_EXPORT)

writes OUT_DIR/metrics.json, sample grids (PNG, one row per class) and, for
video samples, one GIF per sample. By the export's task:

  dit  generate num_samples images over the classes (sample.sample_classes with the
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
(inference.classify on the `classifier` export). To use Inception, wrap
a local weights file in such a callable; nothing is downloaded here.

Motion (model-free, for the video DiT's prompt-following check):
motion_direction(frames) -> (dx, dy) and direction_agrees(prompt_direction, dx, dy).

Clip attributes (model-free but for the digit): clip_truth(example) reads what a
moving_digits caption asks for (the generator's metadata, else its caption);
measure_clip(video, truth) checks digit, digit colour, background colour,
direction, speed class and digit count; seam_score(videos) compares frame
changes across the causal VAE's latent-frame boundaries with those within.

Everything is reproducible for a seed: the same seed gives the same samples,
the same real subset and the same KID subsets, hence the same metrics.
"""
import dataclasses
import functools
import json
import math
import os

import jax
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import export as export_lib
from diffusion_jax import media
from diffusion_jax import paths
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


# --------------------------------------------------------------------------- clip attributes
#
# Per-clip checks of what a moving_digits caption asks for, shared by generated clips, the real
# clips of the same captions and VAE reconstructions of those (the ceilings): the truth comes from
# clip_truth (the generator's metadata, else its caption), the measurement from measure_clip.

ATTRIBUTES = ("digit", "digit_colour", "background", "direction", "speed", "count")
TEMPORAL_FACTOR = 4  # the causal video VAE: frame 0 alone, then 4 frames per latent frame


def nearest_colour(rgb, palette: dict) -> str:
  """The name in palette ({name: (r, g, b)}) nearest to rgb (Euclidean in RGB)."""
  names = list(palette)
  distances = np.linalg.norm(np.asarray([palette[n] for n in names], np.float64) - np.asarray(rgb, np.float64), axis=1)
  return names[int(np.argmin(distances))]


def speed_classes(short_side: int) -> dict:
  """{SPEEDS name: px per frame} of a digit on a canvas whose shorter side is short_side px, as
  render_moving_digits moves it (a fraction of the side, at least 0.5 px)."""
  return {name: max(0.5, fraction * short_side) for name, fraction in sources.SPEEDS.items()}


def speed_class(speed: float, short_side: int) -> str | None:
  """The SPEEDS name nearest (in log speed) to a measured speed in px/frame; None for nan."""
  if not math.isfinite(speed):
    return None
  classes = speed_classes(short_side)
  return min(classes, key=lambda name: abs(math.log(max(speed, 1e-3) / classes[name])))


def velocity_direction(dy: float, dx: float) -> str:
  """The DIRECTIONS key of a (dy, dx) velocity: 'still' for zero, else the nearest by angle."""
  if math.hypot(dy, dx) < 1e-6:
    return "still"
  return max((d for d in sources.DIRECTIONS if d != "still"),
             key=lambda d: (dy * sources.DIRECTIONS[d][0] + dx * sources.DIRECTIONS[d][1]))


def clip_truth(example) -> dict | None:
  """What a moving_digits example's caption asks for, per digit: {"digits", "colours", "background",
  "directions", "speeds", "bounced", "count", "short_side"} (see sources.caption_attributes).

  Digits, their number and directions come from the generator's metadata where the example
  holds it (labels, velocities), colour names, speed names and bounces from the caption, read
  with the generator's vocabulary (sources.caption_attributes); short_side is the source
  canvas's shorter side (speeds scale with it). None when the caption is not of that form.
  """
  caption = example["caption"]
  caption = caption.decode() if isinstance(caption, bytes) else str(caption)
  truth = sources.caption_attributes(caption)
  if truth is None:
    return None
  if "labels" in example:
    truth["digits"] = [int(x) for x in np.asarray(example["labels"])]
  if "velocities" in example and len(np.asarray(example["velocities"])) == len(truth["digits"]):
    moving = [d is not None for d in truth["directions"]]  # one frame: no motion stated
    truth["directions"] = [velocity_direction(float(v[0]), float(v[1])) if m else None
                           for v, m in zip(np.asarray(example["velocities"]), moving)]
  shape = np.asarray(example["source_shape"]) if "source_shape" in example else np.asarray(example["video"]).shape
  truth["count"] = len(truth["digits"])
  truth["short_side"] = int(min(shape[-3], shape[-2])) if len(shape) == 4 else int(min(shape[1], shape[2]))
  return truth


def _foreground(video: np.ndarray):
  """(background rgb [3], distance [T, H, W] of each pixel's colour from it, its robust peak) of a
  float clip [T, H, W, 3]: the background is the median colour of the clip's border pixels."""
  border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1).reshape(-1, 3)
  background = np.median(border, axis=0)
  distance = np.linalg.norm(video - background, axis=-1)
  return background, distance, float(np.percentile(distance, 99.9))


def digit_count(video, *, min_alpha: float = 0.7, max_residual: float = 0.15, min_fraction: float = 0.1) -> int:
  """How many digits a clip [T, H, W, 3] shows, told apart by colour (the generator gives the
  digits of a clip different colours, so digits that touch or overlap still count apart).

  Each pixel is read as the background (median border colour) blended towards one colour c of
  sources.DIGIT_COLOURS: alpha = its projection on the line background -> c, residual = its
  distance from that line over |c - background|. A pixel counts for the colour of least
  residual among those it reaches with alpha > min_alpha, if that residual is < max_residual
  (so antialiased edges and the mixed pixels where two digits overlap count for none). A
  frame's count is the number of colours holding at least min_fraction of its largest colour's
  pixels; the clip's count is the most common frame count (0 when nothing is in the palette).
  """
  video = np.asarray(video, np.float64)
  background, _, _ = _foreground(video)
  towards = np.asarray(list(sources.DIGIT_COLOURS.values()), np.float64) - background  # [K, 3]
  lengths = np.linalg.norm(towards, axis=1)
  offset = video - background  # [T, H, W, 3]
  alpha = np.clip(np.einsum("thwc,kc->thwk", offset, towards) / lengths ** 2, 0.0, 1.0)
  residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * towards, axis=-1) / lengths
  residual = np.where(alpha > min_alpha, residual, np.inf)
  nearest, kept = residual.argmin(axis=-1), residual.min(axis=-1) < max_residual
  counts = []
  for t in range(len(video)):
    pixels = np.bincount(nearest[t][kept[t]], minlength=len(lengths))
    counts.append(int(np.sum((pixels >= min_fraction * pixels.max()) & (pixels > 0))))
  return int(np.bincount(counts).argmax())


def centroid_track(video, *, threshold: float = 0.25) -> np.ndarray:
  """[T, 2] (y, x) foreground centre of mass per frame (weights as in motion_direction, from the
  border's background colour); nan rows where a frame shows no foreground."""
  video = np.asarray(video, np.float64)
  _, distance, _ = _foreground(video)
  peak = distance.max()
  track = np.full((video.shape[0], 2), np.nan)
  if peak <= 0:
    return track
  weight = np.where(distance > threshold * peak, distance, 0.0)
  mass = weight.sum(axis=(1, 2))
  ys, xs = np.arange(video.shape[1]), np.arange(video.shape[2])
  present = mass > 0
  track[present, 0] = (weight.sum(axis=2) @ ys)[present] / mass[present]
  track[present, 1] = (weight.sum(axis=1) @ xs)[present] / mass[present]
  return track


def clip_speed(video) -> float:
  """A digit's speed in px/frame: hypot of the mean absolute frame-to-frame step of its centroid
  along y and along x. A bounce off a wall flips a step's sign, not its size, so this holds for
  bouncing digits too (the least-squares slope of motion_direction does not). nan for < 2 frames."""
  track = centroid_track(video)
  steps = np.abs(np.diff(track, axis=0))
  steps = steps[np.isfinite(steps).all(axis=1)]
  if len(steps) == 0:
    return float("nan")
  return float(np.hypot(*steps.mean(axis=0)))


def blended_colour(rgb, background, palette: dict) -> str:
  """The name in palette whose blend line from `background` passes nearest to rgb: a digit's
  colour read as background + alpha (colour - background), alpha in [0, 1], so a faint or thin
  digit (whose strongest pixels never reach its full colour) still reads as its own colour."""
  names = list(palette)
  towards = np.asarray([palette[n] for n in names], np.float64) - np.asarray(background, np.float64)
  offset = np.asarray(rgb, np.float64) - np.asarray(background, np.float64)
  alpha = np.clip(towards @ offset / np.maximum((towards ** 2).sum(axis=1), 1e-9), 0.0, 1.0)
  return names[int(np.argmin(np.linalg.norm(offset - alpha[:, None] * towards, axis=1)))]


def clip_colours(video, *, threshold: float = 0.7) -> tuple[str, str]:
  """(digit colour name, background colour name) of a clip [T, H, W, 3]: the background is the
  median border colour, nearest of sources.BACKGROUND_COLOURS; the digit is the mean colour of
  the pixels farthest from it (distance over `threshold` x the clip's peak, so antialiased edges
  are left out), read against sources.DIGIT_COLOURS by blended_colour."""
  video = np.asarray(video, np.float64)
  background, distance, peak = _foreground(video)
  background_name = nearest_colour(background, sources.BACKGROUND_COLOURS)
  if peak <= 0:
    return "", background_name
  digit = video[distance >= threshold * peak].mean(axis=0)
  return blended_colour(digit, background, sources.DIGIT_COLOURS), background_name


def temporal_seam(video) -> tuple[float, float]:
  """(mean |frame change| across latent-frame boundaries, mean |frame change| within latent frames)
  of a clip [T, H, W, C]: the causal VAE codes frame 0 alone and frames 4k+1..4k+4 together, so
  the boundaries are the steps 4k -> 4k+1. nan where a clip has no step of a kind (T < 3)."""
  video = np.asarray(video, np.float64)
  change = np.abs(np.diff(video, axis=0)).mean(axis=tuple(range(1, video.ndim)))  # step t -> t+1
  boundary = (np.arange(len(change)) % TEMPORAL_FACTOR) == 0
  across = float(change[boundary].mean()) if boundary.any() else float("nan")
  within = float(change[~boundary].mean()) if (~boundary).any() else float("nan")
  return across, within


def seam_score(videos) -> float:
  """Temporal seam score of a set of clips: the mean change across latent-frame boundaries over
  the mean change within latent frames (temporal_seam, pooled over clips of >= 3 frames). About 1
  for real motion; above 1 when frames jump where latent frames meet. nan without such clips."""
  pairs = np.asarray([temporal_seam(v) for v in videos if len(v) >= 3], np.float64).reshape(-1, 2)
  if len(pairs) == 0 or pairs[:, 1].mean() <= 0:
    return float("nan")
  return float(pairs[:, 0].mean() / pairs[:, 1].mean())


def measure_clip(video, truth: dict, *, classify=None) -> dict:
  """Per-attribute agreement of one clip uint8 [T, H, W, 3] with its caption's truth (clip_truth):
  {attribute: bool} for the checks that apply (ATTRIBUTES), so a rate is a mean over clips.

  digit        the classifier's majority over frames is the caption's digit (one-digit
               captions; needs `classify`: frames -> predicted labels [T])
  digit_colour the digit's measured colour (clip_colours) is the caption's (one-digit captions)
  background   the measured background colour is the caption's
  direction    motion_direction agrees with the stated direction (one digit, > 1 frame, no bounce)
  speed        the measured speed's class (speed_class, for the source canvas's side) is the
               caption's (one moving digit, > 1 frame; bounces allowed)
  count        digit_count is the caption's number of digits
  """
  video = np.asarray(video)
  single = truth["count"] == 1
  out = {}
  colour, background = clip_colours(video)
  out["background"] = background == truth["background"]
  out["count"] = digit_count(video) == truth["count"]
  if single:
    out["digit_colour"] = colour == truth["colours"][0]
    if classify is not None:
      out["digit"] = int(np.bincount(np.asarray(classify(video)), minlength=10).argmax()) == truth["digits"][0]
    direction, speed = truth["directions"][0], truth["speeds"][0]
    if len(video) > 1 and direction is not None and not truth["bounced"][0]:
      out["direction"] = direction_agrees(direction, *motion_direction(video))
    if len(video) > 1 and speed is not None:
      out["speed"] = speed_class(clip_speed(video), truth["short_side"]) == speed
  return out


def attribute_rates(videos, truths, *, classify=None) -> dict:
  """({attribute: agreement rate (nan when no clip qualifies)} plus "seam": seam_score of all the
  clips, {attribute: clips checked}); the attributes over clips with a truth (clip_truth not None)."""
  checks = [measure_clip(v, t, classify=classify) for v, t in zip(videos, truths) if t is not None]
  rates, counts = {}, {}
  for name in ATTRIBUTES:
    values = [c[name] for c in checks if name in c]
    rates[name] = float(np.mean(values)) if values else float("nan")
    counts[name] = len(values)
  rates["seam"] = seam_score(videos)  # any video, captioned or not
  return rates, counts


# --------------------------------------------------------------------------- pictures

def write_samples(samples, labels, out_dir: str, num_classes: int) -> list[str]:
  """samples.png (rows by class) for images [N, H, W, C]; for videos [N, T, H, W, C] also a
  first-frame grid and sample_{i:04d}_class{c}.gif each. Returns the files written."""
  samples, labels = np.asarray(samples), np.asarray(labels)
  order = np.argsort(labels, kind="stable")
  per_class = max(int(np.bincount(labels, minlength=num_classes).max()), 1)
  files = []
  if samples.ndim == 5:
    for i, (video, label) in enumerate(zip(samples, labels)):
      files.append(media.save_gif(video, os.path.join(out_dir, f"sample_{i:04d}_class{int(label)}.gif")))
    samples = samples[:, 0]
  files.append(media.save_grid(samples[order], os.path.join(out_dir, "samples.png"), columns=per_class))
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
  model, objective = task.build_model(config), task.make_objective(config)
  mesh, rules = _one_device_mesh(config)
  source = iter(task.make_dataset(config, split=config.data.eval_split, process_index=0, process_count=1,
                                  seed=config.data.shuffle_seed))
  eval_batch = jax.jit(lambda params, batch, index: task.eval_fn(params, model, objective, batch, index, config))
  auxes = []
  with sharding.activate(mesh, rules):
    for index in range(batches or int(config.train.get("eval_batches", 1))):
      batch = {k: v for k, v in next(source).items() if k not in ("captions", "skipped")}
      auxes.append(jax.device_get(eval_batch(export.params, batch, np.int32(index))))
  return task.summarize_eval(auxes)


# --------------------------------------------------------------------------- evaluate

def _classifier_features(classifier_export):
  from diffusion_jax import inference  # pylint: disable=g-import-not-at-top

  def features(frames):
    return inference.classify(classifier_export, frames)[1]

  features.__name__ = f"classifier_penultimate:{classifier_export.path}"
  return features


def _evaluate_dit(export, out_dir, *, num_samples, seed, classifier, feature_extractor, data_dir) -> dict:
  from diffusion_jax import inference, sample as sample_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.train import dit_task  # pylint: disable=g-import-not-at-top

  config = export.config
  num_classes = int(config.model.num_classes)
  labels = np.arange(num_samples) % num_classes
  sampler, steps = str(config.sample.sampler), int(config.sample.steps)
  cfg_scale = float(config.sample.cfg_scale)
  gen = inference.with_conditioners(config, dit_task.build_model(config), export.params, int(export.info["step"]))
  mesh, rules = _one_device_mesh(config)
  with sharding.activate(mesh, rules):
    samples = sample_lib.sample_classes(gen, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed)
  metrics = dict(sampler=sampler, sample_steps=steps, cfg_scale=cfg_scale)
  files = write_samples(samples, labels, out_dir, num_classes)

  classifier_export = export_lib.load_export(classifier) if classifier else None
  real, real_labels = real_frames(config, num_samples, seed=seed, data_dir=data_dir)
  if classifier_export is not None:
    predicted = np.argmax(inference.classify(classifier_export, samples)[0], axis=-1)
    metrics["classifier_accuracy"] = float(np.mean(predicted == labels))
    # The same classifier on real frames of this size: the ceiling the samples are held to.
    real_predicted = np.argmax(inference.classify(classifier_export, real)[0], axis=-1)
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
  files.append(media.save_grid(real[np.argsort(real_labels, kind="stable")], os.path.join(out_dir, "real.png"),
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
  files = [media.save_grid(pairs, os.path.join(out_dir, "reconstructions.png"), columns=2)]
  if video.shape[1] > 1:
    for i in range(len(video)):
      files.append(media.save_gif(np.concatenate([video[i], recon[i]], axis=2),
                            os.path.join(out_dir, f"reconstruction_{i:04d}.gif")))
  return metrics, files


def _evaluate_video_dit(export, out_dir, *, num_samples, seed, classifier, feature_extractor, data_dir) -> dict:
  """Text-to-video (or -image) on held-out captions: num_samples videos for the
  captions of the eval split's video clips (at each clip's own size,
  sample.frames frames; a pixel model: scaled to fit one row as training
  scales such a clip; a fixed-size image model: its images at its size),
  then the per-clip attribute checks of measure_clip against each caption
  (clip_truth: digit by the classifier's majority over frames, digit and
  background colour, motion direction, speed class, number of digits) and the
  temporal seam score, as check/<name>/generated, and the same checks on the
  real clips of those captions (check/<name>/real, the checks' own ceiling) and
  on VAE reconstructions of them (check/<name>/vae, the latent model's ceiling;
  latent models only); check/<name>/clips is how many clips each check covers.
  Then FD/KID between the generated and real frames in the feature space."""
  from diffusion_jax import inference, sample as sample_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.train import dit_task  # pylint: disable=g-import-not-at-top

  config = _config_with_data_dir(export.config, data_dir)
  gen = inference.with_conditioners(config, dit_task.build_model(config), export.params, int(export.info["step"]))
  source = sources.open_source(config.data.name, config.data.eval_split, config.data.data_dir,
                               **pipeline.builder_kwargs(config.data))
  rng = np.random.default_rng([seed, 2])
  order = rng.permutation(len(source))
  makes_video = "image_size" not in config.data
  chosen = []
  for index in order:
    example = source[int(index)]
    if _clip_shape(example)[0] > 1 or not makes_video:
      chosen.append(example)
    if len(chosen) == num_samples:
      break
  if len(chosen) < 2:
    kind = "video clips" if makes_video else "examples"
    raise ValueError(f"the eval split of {config.data.name} has fewer than 2 {kind} to take captions from")
  frames = int(config.sample.frames)
  requests = []
  for example in chosen:
    caption = example["caption"].decode() if isinstance(example["caption"], bytes) else str(example["caption"])
    shape = _clip_shape(example)  # a pixel dataset's examples hold the clip itself, no source_shape
    requests.append(_fit_to_row(gen, sample_lib.Request(caption, (shape[1], shape[2]), min(frames, shape[0]))))
  sampler = str(config.sample.sampler)
  steps, cfg_scale = int(config.sample.steps), float(config.sample.cfg_scale)
  videos, notes = sample_lib.sample_requests(gen, requests, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                             rows_per_call=int(config.sample.get("rows_per_call", 4)), seed=seed)
  sample_lib.write_outputs(videos, requests, notes, out_dir, gen=gen, sampler=sampler, steps=steps,
                           cfg_scale=cfg_scale, seed=seed)
  files = [os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.startswith("sample_")]
  metrics = dict(sampler=sampler, sample_steps=steps, cfg_scale=cfg_scale, videos=len(videos))

  originals = _source_examples(config, chosen)
  truths = [clip_truth(original) for original in originals]
  real_clips = [_as_clip(original["video"])[:len(video)] for original, video in zip(originals, videos)]
  reconstructions = reconstruct(gen.vae, real_clips) if gen.vae is not None else None
  size = 32  # frames are compared at one size (the classifier resizes anyway)

  def frames_at(clips):
    return np.concatenate([np.clip(np.round(sources.resize_frames(c.astype(np.float32), size, size)), 0, 255)
                           .astype(np.uint8) for c in clips])

  generated, real = frames_at(videos), frames_at(real_clips)
  classifier_export = export_lib.load_export(classifier) if classifier else None
  classify = None
  if classifier_export is not None:
    classify = functools.partial(classify_frames, classifier_export)
    metrics["classifier"] = classifier_export.path
    if feature_extractor is None:
      feature_extractor = _classifier_features(classifier_export)
  # The same checks on generated clips, on VAE reconstructions of the real clips (what the
  # latent model can at best give back) and on the real clips (what the checks can at best score).
  sets = dict(generated=videos, vae=reconstructions, real=real_clips)
  for which, clips in sets.items():
    if clips is None:
      continue
    rates, counts = attribute_rates(clips, truths, classify=classify)
    for name, rate in rates.items():
      metrics[f"check/{name}/{which}"] = rate
    if which == "real":
      metrics.update({f"check/{name}/clips": count for name, count in counts.items()})
  if feature_extractor is not None:
    real_features = np.asarray(feature_extractor(real), np.float64)
    fake_features = np.asarray(feature_extractor(generated), np.float64)
    metrics["feature_space"] = getattr(feature_extractor, "__name__", type(feature_extractor).__name__)
    metrics["fd"] = frechet_distance(real_features, fake_features)
    metrics["kid"], metrics["kid_std"] = kernel_inception_distance(real_features, fake_features, seed=seed)
  metrics.update(held_out_loss(export, data_dir=data_dir))
  return metrics, files


def classify_frames(classifier_export, frames, *, chunk: int = 64) -> np.ndarray:
  """Predicted digits [T] of uint8 frames [T, H, W, 3] of any size, brought to the classifier's
  data.image_size as it was trained (classifier_task.SingleDigitFrame: a locating classifier's
  frames are first padded to a square with their background) and classified in chunks of
  `chunk` frames, so one compilation serves every clip size and length."""
  from diffusion_jax import inference  # pylint: disable=g-import-not-at-top
  from diffusion_jax.train import classifier_task  # pylint: disable=g-import-not-at-top

  config = classifier_export.config
  squarer = classifier_task.SingleDigitFrame(size=int(config.data.image_size),
                                             pad_square=bool(config.model.get("locate", False)))
  frames = [squarer.random_map({"video": frame, "label": 0}, None)["frames"] for frame in np.asarray(frames)]
  count = len(frames)
  frames = np.stack(frames + [np.zeros_like(frames[0])] * (-count % chunk))
  logits, _ = inference.classify(classifier_export, frames, batch_size=chunk)
  return np.argmax(logits[:count], axis=-1)


def _fit_to_row(gen, request):
  """A pixel model's request scaled down (aspect kept, then frames cut) to fit one row of
  data.tokens_per_row tokens, as the training pipeline fits a clip of that size
  (pipeline.plan_shape); a request that fits, or a latent model's, unchanged."""
  data = gen.config.data
  if gen.vae is not None or "image_size" in data:
    return request
  patch = tuple(int(p) for p in data.patch)
  plan = pipeline.plan_shape(request.frames, *request.size, patch=patch, tokens_per_row=int(data.tokens_per_row),
                             max_area=int(data.get("max_area", 0)), max_frames=int(data.get("max_frames", 0)),
                             min_side=int(data.get("min_side", 4 * max(patch[1:]))))
  if plan is None:
    return request  # sample_requests names the request that cannot fit
  return dataclasses.replace(request, frames=plan[0], size=(plan[1], plan[2]))


def _clip_shape(example) -> tuple[int, int, int]:
  """(frames, height, width) of an eval example's source clip: an encoded example's source_shape,
  else the shape of its clip."""
  if "source_shape" in example:
    return tuple(int(x) for x in np.asarray(example["source_shape"]))
  return tuple(int(x) for x in _as_clip(example["video"]).shape[:3])


def _as_clip(video) -> np.ndarray:
  video = np.asarray(video)
  return video if video.ndim == 4 else video[None]


def _source_examples(config, examples) -> list[dict]:
  """The source examples behind eval examples (their clip under "video", uint8 [T, H, W, C], and
  the generator's metadata): the examples themselves, or for an encoded latent dataset the
  examples of its source dataset, found by id."""
  if all("video" in ex for ex in examples):
    return list(examples)
  from diffusion_jax import encode  # pylint: disable=g-import-not-at-top

  meta = encode.encoded_metadata(str(config.data.name))
  origin = meta["source"]
  split = meta["splits"][config.data.eval_split]["source_split"]
  opened = sources.open_source(origin["name"], split, origin["data_dir"], **(origin.get("builder_kwargs") or {}))
  by_id = {int(opened[i]["id"]): i for i in range(len(opened))}
  return [opened[by_id[int(ex["id"])]] for ex in examples]


def reconstruct(vae, clips) -> list[np.ndarray]:
  """VAE reconstructions (posterior mean, decoded) of uint8 clips [T, H, W, C], each first trimmed
  to 1 + 4k frames and centre-cropped to multiples of the VAE's spatial factor (as the encode
  step does), one clip at a time; uint8 like the input."""
  from diffusion_jax import encode  # pylint: disable=g-import-not-at-top

  out = []
  for clip in clips:
    clip = encode.trim_and_crop(_as_clip(clip), vae.spatial_factor)
    mean, _ = vae.encode(clip[None].astype(np.float32) / 127.5 - 1.0)
    decoded = vae.decode(mean)[0]
    out.append(np.clip(np.round((decoded + 1.0) * 127.5), 0, 255).astype(np.uint8))
  return out


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
  task = export.config.task
  if task not in ("dit", "vae"):
    raise ValueError(f"evaluate knows tasks 'dit' and 'vae'; {export_dir} is task {task!r}")
  common = dict(num_samples=num_samples, seed=seed, data_dir=data_dir)
  from diffusion_jax.train import dit_task  # pylint: disable=g-import-not-at-top

  with paths.local_dir(out_dir) as local_out:  # a bucket gets the files when they are all written
    if task == "dit" and dit_task.samples_from_prompts(export.config):
      metrics, files = _evaluate_video_dit(export, local_out, classifier=classifier,
                                           feature_extractor=feature_extractor, **common)
    elif task == "dit":
      metrics, files = _evaluate_dit(export, local_out, classifier=classifier, feature_extractor=feature_extractor,
                                     **common)
    else:
      metrics, files = _evaluate_vae(export, local_out, **common)
    metrics = dict(metrics, export=export.path, task=task, step=export.info["step"], num_samples=num_samples,
                   seed=seed, files=sorted(os.path.basename(f) for f in files))
    with open(os.path.join(local_out, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=1, sort_keys=True)
      f.write("\n")
  return metrics
