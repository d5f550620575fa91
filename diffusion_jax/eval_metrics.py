"""The metric maths of evaluation, model-free: distances between feature sets, motion, clip attributes.

Distances (the feature space is the caller's): frechet_distance, kernel_inception_distance (KID,
unbiased MMD^2 with the cubic polynomial kernel over random subsets).

Motion (the video DiT's prompt-following check): motion_direction(frames) -> (dx, dy) and
direction_agrees(prompt_direction, dx, dy).

Clip attributes (model-free but for the digit, whose classifier the caller passes): clip_truth(example)
reads what a moving_digits caption asks for (the generator's metadata, else its caption);
measure_clip(video, truth) checks digit, digit colour, background colour, direction, speed class
and digit count; seam_score(videos) compares frame changes across the causal VAE's latent-frame
boundaries with those within.

Temporal consistency (what frame-by-frame generation lacks): temporal_consistency(video, classify)
gives identity (the fraction of frames showing the clip's majority digit), path_roughness (the
mean second difference of the per-frame ink centre of mass over the frame side) and
frame_change (mean frame-to-frame change); temporal_rates pools them over clips.

evaluate.py runs them per task on an export's samples.
"""
import math

import numpy as np

from diffusion_jax.data import digits_canvas, encoded, moving_digits

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
  if prompt_direction not in moving_digits.DIRECTIONS:
    raise ValueError(f"unknown direction {prompt_direction!r}; known: {sorted(moving_digits.DIRECTIONS)}")
  if not (math.isfinite(dx) and math.isfinite(dy)):
    return False
  speed = math.hypot(dx, dy)
  if prompt_direction == "still":
    return speed < min_speed
  if speed < min_speed:
    return False
  uy, ux = moving_digits.DIRECTIONS[prompt_direction]
  cosine = (dx * ux + dy * uy) / (speed * math.hypot(ux, uy))
  return cosine >= math.cos(math.radians(max_angle_deg)) - 1e-9


# --------------------------------------------------------------------------- clip attributes
#
# Per-clip checks of what a moving_digits caption asks for, shared by generated clips, the real
# clips of the same captions and VAE reconstructions of those (the ceilings): the truth comes from
# clip_truth (the generator's metadata, else its caption), the measurement from measure_clip.

ATTRIBUTES = ("digit", "digit_colour", "background", "direction", "speed", "count")
TEMPORAL_FACTOR = encoded.TEMPORAL_FACTOR  # the causal video VAE: frame 0 alone, then 4 frames per latent frame


def nearest_colour(rgb, palette: dict) -> str:
  """The name in palette ({name: (r, g, b)}) nearest to rgb (Euclidean in RGB)."""
  names = list(palette)
  distances = np.linalg.norm(np.asarray([palette[n] for n in names], np.float64) - np.asarray(rgb, np.float64), axis=1)
  return names[int(np.argmin(distances))]


def speed_classes(short_side: int) -> dict:
  """{SPEEDS name: px per frame} of a digit on a canvas whose shorter side is short_side px, as
  render_moving_digits moves it (a fraction of the side, at least 0.5 px)."""
  return {name: max(0.5, fraction * short_side) for name, fraction in moving_digits.SPEEDS.items()}


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
  return max((d for d in moving_digits.DIRECTIONS if d != "still"),
             key=lambda d: (dy * moving_digits.DIRECTIONS[d][0] + dx * moving_digits.DIRECTIONS[d][1]))


def clip_truth(example) -> dict | None:
  """What a moving_digits example's caption asks for, per digit: {"digits", "colours", "background",
  "directions", "speeds", "bounced", "count", "short_side"} (see moving_digits.caption_attributes).

  Digits, their number and directions come from the generator's metadata where the example
  holds it (labels, velocities), colour names, speed names and bounces from the caption, read
  with the generator's vocabulary (moving_digits.caption_attributes); short_side is the source
  canvas's shorter side (speeds scale with it). None when the caption is not of that form.
  """
  caption = example["caption"]
  caption = caption.decode() if isinstance(caption, bytes) else str(caption)
  truth = moving_digits.caption_attributes(caption)
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


def _border_pixels(video: np.ndarray) -> np.ndarray:
  """[T, 2H + 2W, 3] each frame's outermost rows and columns (where the background shows)."""
  return np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)


def _centre_of_mass(weight: np.ndarray) -> np.ndarray:
  """[T, 2] (y, x) centre of mass of per-pixel weights [T, H, W]; nan rows where a frame weighs 0."""
  mass = weight.sum(axis=(1, 2))
  present = mass > 0
  track = np.full((weight.shape[0], 2), np.nan)
  ys, xs = np.arange(weight.shape[1]), np.arange(weight.shape[2])
  track[present, 0] = (weight.sum(axis=2) @ ys)[present] / mass[present]
  track[present, 1] = (weight.sum(axis=1) @ xs)[present] / mass[present]
  return track


def _foreground(video: np.ndarray):
  """(background rgb [3], distance [T, H, W] of each pixel's colour from it, its robust peak) of a
  float clip [T, H, W, 3]: the background is the median colour of the clip's border pixels."""
  background = np.median(_border_pixels(video).reshape(-1, 3), axis=0)
  distance = np.linalg.norm(video - background, axis=-1)
  return background, distance, float(np.percentile(distance, 99.9))


def digit_count(video, *, min_alpha: float = 0.7, max_residual: float = 0.15, min_fraction: float = 0.1) -> int:
  """How many digits a clip [T, H, W, 3] shows, told apart by colour (the generator gives the
  digits of a clip different colours, so digits that touch or overlap still count apart).

  Each pixel is read as the background (median border colour) blended towards one colour c of
  digits_canvas.DIGIT_COLOURS: alpha = its projection on the line background -> c, residual = its
  distance from that line over |c - background|. A pixel counts for the colour of least
  residual among those it reaches with alpha > min_alpha, if that residual is < max_residual
  (so antialiased edges and the mixed pixels where two digits overlap count for none). A
  frame's count is the number of colours holding at least min_fraction of its largest colour's
  pixels; the clip's count is the most common frame count (0 when nothing is in the palette).
  """
  video = np.asarray(video, np.float64)
  background, _, _ = _foreground(video)
  towards = np.asarray(list(digits_canvas.DIGIT_COLOURS.values()), np.float64) - background  # [K, 3]
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
  if peak <= 0:
    return np.full((video.shape[0], 2), np.nan)
  return _centre_of_mass(np.where(distance > threshold * peak, distance, 0.0))


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
  median border colour, nearest of digits_canvas.BACKGROUND_COLOURS; the digit is the mean colour of
  the pixels farthest from it (distance over `threshold` x the clip's peak, so antialiased edges
  are left out), read against digits_canvas.DIGIT_COLOURS by blended_colour."""
  video = np.asarray(video, np.float64)
  background, distance, peak = _foreground(video)
  background_name = nearest_colour(background, digits_canvas.BACKGROUND_COLOURS)
  if peak <= 0:
    return "", background_name
  digit = video[distance >= threshold * peak].mean(axis=0)
  return blended_colour(digit, background, digits_canvas.DIGIT_COLOURS), background_name


def frame_changes(video) -> np.ndarray:
  """[T - 1] mean |pixel difference| of each step t -> t+1 of a clip [T, H, W(, C)], in its own units."""
  video = np.asarray(video, np.float64)
  return np.abs(np.diff(video, axis=0)).mean(axis=tuple(range(1, video.ndim)))


def temporal_seam(video) -> tuple[float, float]:
  """(mean |frame change| across latent-frame boundaries, mean |frame change| within latent frames)
  of a clip [T, H, W, C]: the causal VAE codes frame 0 alone and frames 4k+1..4k+4 together, so
  the boundaries are the steps 4k -> 4k+1. nan where a clip has no step of a kind (T < 3)."""
  change = frame_changes(video)  # step t -> t+1
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


# --------------------------------------------------------------------------- temporal consistency
#
# What an image model run once per frame (the naive baseline of evaluate's --baseline=frames) lacks
# and a spacetime model should have: the same digit in every frame, a centre of mass that moves
# along a smooth path, and small changes from frame to frame. Clips are uint8 or float in uint8
# levels (0..255), [T, H, W, 3].

TEMPORAL = ("identity", "path_roughness", "frame_change")
INK_THRESHOLD = 0.25  # of a frame's largest distance from its background: antialiased edges count less
MIN_INK_CONTRAST = 24.0  # uint8 levels (Euclidean RGB): a frame whose pixels all lie closer shows no ink


def _levels(video) -> np.ndarray:
  """float64 [T, H, W, 3] of a uint8 clip or a float one in uint8 levels; a clear error otherwise."""
  array = np.asarray(video)
  if array.ndim != 4 or array.shape[-1] != 3:
    raise ValueError(f"a clip must be [T, H, W, 3], got shape {array.shape}")
  array = array.astype(np.float64)
  if array.size and (array.min() < 0 or array.max() > 255):
    raise ValueError(f"a float clip must be in uint8 levels [0, 255], got values in [{array.min():.3g}, "
                     f"{array.max():.3g}]")
  return array


def frame_backgrounds(video) -> np.ndarray:
  """[T, 3] each frame's background colour: the median colour of its border pixels (outermost rows
  and columns). Per frame, not per clip: a frame-by-frame generation may give each frame its own
  background, and a digit seldom covers most of a frame's border."""
  video = _levels(video)
  return np.median(_border_pixels(video), axis=1)


def ink_track(video, *, threshold: float = INK_THRESHOLD, min_contrast: float = MIN_INK_CONTRAST) -> np.ndarray:
  """[T, 2] (y, x) each frame's ink centre of mass in pixels. A pixel's ink weight is its colour
  distance from its frame's background (frame_backgrounds), kept where it exceeds both `threshold`
  x that frame's largest distance and `min_contrast` levels. nan rows for frames without ink."""
  video = _levels(video)
  distance = np.linalg.norm(video - frame_backgrounds(video)[:, None, None, :], axis=-1)  # [T, H, W]
  floor = np.maximum(threshold * distance.max(axis=(1, 2)), min_contrast)[:, None, None]
  return _centre_of_mass(np.where(distance > floor, distance, 0.0))


def identity_consistency(predictions) -> float:
  """The fraction of frames whose predicted digit is the clip's majority prediction (ties: the
  smaller digit): 1 when every frame shows the same digit. predictions: int labels [T], T >= 1."""
  predictions = np.asarray(predictions)
  if predictions.ndim != 1 or len(predictions) == 0 or not np.issubdtype(predictions.dtype, np.integer):
    raise ValueError(f"predictions must be integer labels [T >= 1], got {predictions.dtype} {predictions.shape}")
  if predictions.min() < 0:
    raise ValueError(f"predictions must be labels >= 0, got {predictions.min()}")
  majority = np.bincount(predictions).argmax()
  return float(np.mean(predictions == majority))


def path_roughness(video) -> float:
  """The centre-of-mass path's roughness (lower is smoother): the mean magnitude of the second
  difference c[t+1] - 2 c[t] + c[t-1] of the ink track (ink_track), over the triples of
  consecutive frames that all show ink, divided by the frame's shorter side. 0 for a digit at
  constant velocity; about 0.89 (sqrt(pi / 2) x sqrt(6 / 12), a Rayleigh mean) for positions drawn
  uniformly over a square frame, less for a digit kept inside it (a bounce off a wall adds one
  spike). nan when no triple has ink (fewer than 3 frames, or blank frames)."""
  video = _levels(video)
  track = ink_track(video)
  second = track[2:] - 2.0 * track[1:-1] + track[:-2]
  second = second[np.isfinite(second).all(axis=1)]
  if len(second) == 0:
    return float("nan")
  return float(np.linalg.norm(second, axis=1).mean() / min(video.shape[1], video.shape[2]))


def mean_frame_change(video) -> float:
  """The mean |pixel difference| between consecutive frames as a fraction of the uint8 range
  (frame_changes / 255): 0 for a still clip, larger for flicker. nan for one frame."""
  video = _levels(video)
  return float(frame_changes(video).mean() / 255.0) if len(video) > 1 else float("nan")


def temporal_consistency(video, *, classify=None) -> dict:
  """{"identity", "path_roughness", "frame_change"} of one clip [T, H, W, 3]; "identity" needs
  `classify` (frames -> predicted digits [T]) and is left out without it."""
  out = dict(path_roughness=path_roughness(video), frame_change=mean_frame_change(video))
  if classify is not None:
    out["identity"] = identity_consistency(np.asarray(classify(np.asarray(video))))
  return out


def temporal_rates(videos, truths, *, classify=None) -> tuple[dict, dict]:
  """({name: mean over clips (nan when none qualifies)}, {name: clips}) of temporal_consistency over
  clips of >= 2 frames. identity and path_roughness cover only the clips whose caption does not
  ask for several digits (truth None or count 1): a single-digit classifier and one centre of
  mass mean little for two digits. nan values (no ink) are left out of the means."""
  values = {name: [] for name in TEMPORAL}
  for video, truth in zip(videos, truths):
    if len(video) < 2:
      continue
    single = truth is None or truth["count"] == 1
    measured = temporal_consistency(video, classify=classify if single else None)
    for name, value in measured.items():
      if name == "path_roughness" and not single:
        continue
      if math.isfinite(value):
        values[name].append(value)
  rates = {name: float(np.mean(v)) if v else float("nan") for name, v in values.items()}
  return rates, {name: len(v) for name, v in values.items()}
