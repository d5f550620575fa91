"""Built-in tfds datasets and how the pipeline opens them.

Every dataset is a TFDS `GeneratorBasedBuilder` stored as ArrayRecord, so it
needs no TensorFlow and Grain reads it by random access (`tfds.data_source`).
All of them share one feature layout, the one the pipeline decodes:

  video    uint8 [T, H, W, 3]  an image is a one-frame video (T = 1)
  label    int64, ClassLabel(10)
  caption  text (bytes when read back), written from the generator's metadata
  id       int64, unique index of the example inside its split

`digits_canvas`: scikit-learn's 8x8 digits (1797 real hand-written images, 17
grey levels), upscaled bilinearly to a random size and placed at a random spot
on a square canvas, in a named colour on a dark background.

`moving_digits`: the same digits, 1-3 of them, moving (and bouncing off the
walls) on canvases of many native sizes and aspect ratios, for 1 (an image),
5, 9, 17 or 33 frames. The caption is written from the generator's own motion
metadata, which is stored next to the clip (see MovingDigits).

`image_pans`: camera pans and zooms across scikit-image's photographs, at
native sizes and durations, captioned with the move and the subject.

`video_folder`: the user's own folder of videos (decoded by the ffmpeg that the
imageio-ffmpeg wheel ships), with optional caption side files, split into train
and validation by a hash of each file's path; unusable files are skipped and
counted by reason in the metadata.
"""
import dataclasses
import hashlib
import logging
import os
import re

import imageio_ffmpeg
import numpy as np
import skimage.data
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds

from diffusion_jax import paths


def default_data_dir() -> str:
  """$DIFFUSION_JAX_DATA, else ~/.cache/diffusion_jax/data."""
  return os.environ.get("DIFFUSION_JAX_DATA") or os.path.expanduser("~/.cache/diffusion_jax/data")


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  return os.fspath(data_dir) if data_dir else default_data_dir()


def _features() -> tfds.features.FeaturesDict:
  """The feature layout shared by every built-in dataset (see module docstring)."""
  return tfds.features.FeaturesDict({
      # Several unknown dims need an explicit encoding; zlib keeps files small.
      "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"),
      "label": tfds.features.ClassLabel(num_classes=10),
      "caption": tfds.features.Text(),
      "id": tfds.features.Scalar(dtype=np.int64),
  })


def bilinear_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear resize of a [H, W] array with half-pixel centres (PIL / jax.image convention).

  Written as two interpolation matrices, out = Wr @ image @ Wc^T, which is exact
  bilinear interpolation with edge clamping.
  """

  def weights(n_in, n_out):
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] += 1.0 - frac
    w[np.arange(n_out), hi] += frac
    return w

  h, w = image.shape
  return weights(h, out_h) @ image @ weights(w, out_w).T


# --------------------------------------------------------------------------- digits_canvas

DIGIT_COLOURS = {
    "red": (230, 40, 40),
    "green": (50, 205, 70),
    "blue": (70, 120, 255),
    "yellow": (240, 220, 40),
    "cyan": (40, 220, 230),
    "magenta": (225, 55, 225),
    "orange": (255, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUND_COLOURS = {
    "black": (0, 0, 0),
    "dark gray": (48, 48, 48),
    "navy": (12, 22, 72),
    "dark green": (12, 52, 24),
}


@dataclasses.dataclass
class DigitsCanvasConfig(tfds.core.BuilderConfig):
  """image_size: canvas side in px; seed: placements, colours and the held-out split."""

  image_size: int = 32
  seed: int = 0
  train_copies: int = 6  # placements of each training image -> ~9.6k examples
  validation_copies: int = 5  # placements of each held-out image -> 1k examples
  validation_images: int = 200  # held out of the 1797 digits


def _digits_config(image_size: int, seed: int) -> DigitsCanvasConfig:
  if image_size < 8:
    raise ValueError(f"digits_canvas image_size must be >= 8 px, got {image_size}")
  name = f"{image_size}px" if seed == 0 else f"{image_size}px_seed{seed}"
  return DigitsCanvasConfig(
      name=name, image_size=image_size, seed=seed,
      description=f"{image_size}x{image_size} canvas, seed {seed}")


class DigitsCanvas(tfds.core.GeneratorBasedBuilder):
  """Real 8x8 digits, upscaled to 55-85% of a square canvas at a random position.

  Train uses 1597 of the 1797 digits, each `train_copies` times with different
  placements and colours; validation uses the other 200 digits. Every random
  choice comes from a generator seeded by (seed, split, example index), so a
  build is deterministic for a seed whatever order tfds writes in.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [_digits_config(16, 0), _digits_config(32, 0), _digits_config(64, 0)]
  DEFAULT_CONFIG_NAME = "32px"

  def __init__(self, *, image_size: int | None = None, seed: int | None = None, config=None, **kwargs):
    if config is None:  # always explicit: tfds would otherwise guess from what is on disk
      config = _digits_config(32 if image_size is None else image_size, seed or 0)
      config = self.builder_configs.get(config.name, config)  # reuse the listed object
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn digits placed on a coloured canvas, as one-frame videos.",
        features=_features(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the digits ship with scikit-learn
    cfg = self.builder_config
    train, validation = _split_digits(cfg.seed, 7, cfg.validation_images)
    return {
        "train": self._generate_examples(*train, cfg.train_copies, 0),
        "validation": self._generate_examples(*validation, cfg.validation_copies, 1),
    }

  def _generate_examples(self, images, labels, copies, split_code):
    cfg = self.builder_config
    index = 0
    for _ in range(copies):
      for image, label in zip(images, labels):
        rng = np.random.default_rng([cfg.seed, split_code, index])
        video, caption = render_digit(image, int(label), cfg.image_size, rng)
        yield index, {"video": video[None], "label": int(label), "caption": caption, "id": index}
        index += 1


def _load_digits():
  digits = load_digits()
  return digits.images.astype(np.float64) / 16.0, digits.target.astype(np.int64)



def _split_digits(seed: int, salt: int, validation_images: int):
  """((train images, labels), (validation images, labels)): sklearn's digits split by a seeded permutation.

  Each builder passes its own salt, so their splits are independent.
  """
  images, labels = _load_digits()
  order = np.random.default_rng([seed, salt]).permutation(len(images))
  val_idx, train_idx = order[:validation_images], order[validation_images:]
  return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])

def render_digit(image: np.ndarray, label: int, size: int, rng: np.random.Generator):
  """Draws one 8x8 digit (intensities in [0, 1]) on a size x size canvas.

  Returns (uint8 [size, size, 3], caption). The digit side is 55-85% of the
  canvas; its intensity blends the background colour into the digit colour.
  """
  side = int(round(rng.uniform(0.55, 0.85) * size))
  side = max(8, min(side, size))
  top, left = rng.integers(0, size - side + 1, size=2)
  digit_name = rng.choice(sorted(DIGIT_COLOURS))
  background_name = rng.choice(sorted(BACKGROUND_COLOURS))
  alpha = np.clip(bilinear_resize(image, side, side), 0.0, 1.0)[..., None]
  background = np.asarray(BACKGROUND_COLOURS[background_name], np.float64)
  colour = np.asarray(DIGIT_COLOURS[digit_name], np.float64)
  canvas = np.broadcast_to(background, (size, size, 3)).copy()
  canvas[top:top + side, left:left + side] = background * (1 - alpha) + colour * alpha
  caption = f"a {digit_name} {label} on a {background_name} background"
  return np.round(canvas).astype(np.uint8), caption


# --------------------------------------------------------------------------- moving_digits

# Unit (dy, dx) steps; image rows grow downwards, so "down" is +y.
DIRECTIONS = {
    "still": (0.0, 0.0),
    "left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0),
    "up-left": (-0.7071, -0.7071), "up-right": (-0.7071, 0.7071),
    "down-left": (0.7071, -0.7071), "down-right": (0.7071, 0.7071),
}
# Speed as a fraction of the canvas's shorter side per frame.
SPEEDS = {"slowly": 0.02, "steadily": 0.045, "quickly": 0.09}


@dataclasses.dataclass
class MovingDigitsConfig(tfds.core.BuilderConfig):
  """Canvas sides in [min_side, max_side] px (height and width drawn apart), clip
  lengths from `durations`, 1..max_digits digits, each digit's square side a fraction
  in `digit_scale` of the canvas's shorter side; seed fixes every random choice."""

  min_side: int = 24
  max_side: int = 96
  max_digits: int = 3
  durations: tuple[int, ...] = (1, 5, 9, 17, 33)
  digit_scale: tuple[float, float] = (0.3, 0.55)
  seed: int = 0
  train_examples: int = 2000
  validation_examples: int = 200
  validation_images: int = 200  # digits held out of the 1797 for validation


def _moving_digits_config(**kwargs) -> MovingDigitsConfig:
  cfg = MovingDigitsConfig(name="tmp", **kwargs)
  if not 8 <= cfg.min_side <= cfg.max_side:
    raise ValueError(f"moving_digits needs 8 <= min_side <= max_side, got {cfg.min_side}, {cfg.max_side}")
  if cfg.max_digits < 1 or not cfg.durations or min(cfg.durations) < 1:
    raise ValueError(f"moving_digits needs max_digits >= 1 and durations >= 1, got "
                     f"{cfg.max_digits}, {cfg.durations}")
  if min(cfg.train_examples, cfg.validation_examples) < 1:
    raise ValueError("moving_digits needs train_examples and validation_examples >= 1")
  cfg.durations = tuple(int(d) for d in cfg.durations)
  cfg.digit_scale = tuple(float(f) for f in cfg.digit_scale)
  if len(cfg.digit_scale) != 2 or not 0 < cfg.digit_scale[0] <= cfg.digit_scale[1] <= 1:
    raise ValueError(f"moving_digits needs digit_scale (low, high) with 0 < low <= high <= 1, got {cfg.digit_scale}")
  default = MovingDigitsConfig(name="default")
  if all(getattr(cfg, f) == getattr(default, f) for f in kwargs):
    cfg.name, cfg.description = "default", "24-96 px sides, 1-33 frames, 1-3 digits, seed 0"
  else:
    cfg.name = (f"s{cfg.min_side}-{cfg.max_side}_d{cfg.max_digits}_t{'-'.join(map(str, cfg.durations))}"
                f"_n{cfg.train_examples}-{cfg.validation_examples}_seed{cfg.seed}")
    if cfg.digit_scale != default.digit_scale:
      cfg.name += "_z{:g}-{:g}".format(*cfg.digit_scale)
    cfg.description = "moving_digits with " + cfg.name
  return cfg


class MovingDigits(tfds.core.GeneratorBasedBuilder):
  """Real 8x8 digits moving and bouncing on canvases of native sizes and durations.

  Features, beyond the shared layout (`label` is the first digit's class):
    labels      int64 [n]         class of each of the n digits, in drawing order
    centers     float32 [T, n, 2] (y, x) centre of each digit's square in every frame, px
    velocities  float32 [n, 2]    (dy, dx) px per frame at the first frame (0 for "still")
  A digit reflects off the canvas walls; the caption says so ("... and bouncing").
  Every random choice comes from a generator seeded by (seed, split, example
  index), so a build is deterministic for a seed. Validation draws from 200
  digit images that train never sees.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [_moving_digits_config()]
  DEFAULT_CONFIG_NAME = "default"

  def __init__(self, *, config=None, min_side=None, max_side=None, max_digits=None, durations=None,
               digit_scale=None, seed=None, train_examples=None, validation_examples=None, **kwargs):
    if config is None:  # always explicit: tfds would otherwise guess from what is on disk
      given = dict(min_side=min_side, max_side=max_side, max_digits=max_digits, durations=durations,
                   digit_scale=digit_scale, seed=seed, train_examples=train_examples,
                   validation_examples=validation_examples)
      config = _moving_digits_config(**{k: v for k, v in given.items() if v is not None})
      config = self.builder_configs.get(config.name, config)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = dict(_features())
    features.update(
        labels=tfds.features.Tensor(shape=(None,), dtype=np.int64),
        centers=tfds.features.Tensor(shape=(None, None, 2), dtype=np.float32, encoding="zlib"),
        velocities=tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
    )
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn digits moving on canvases of many sizes, with motion captions.",
        features=tfds.features.FeaturesDict(features),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the digits ship with scikit-learn
    cfg = self.builder_config
    train, validation = _split_digits(cfg.seed, 11, cfg.validation_images)
    return {
        "train": self._generate_examples(*train, cfg.train_examples, 0),
        "validation": self._generate_examples(*validation, cfg.validation_examples, 1),
    }

  def _generate_examples(self, images, labels, count, split_code):
    cfg = self.builder_config
    for index in range(count):
      rng = np.random.default_rng([cfg.seed, split_code, index])
      example = render_moving_digits(images, labels, rng, min_side=cfg.min_side, max_side=cfg.max_side,
                                     max_digits=cfg.max_digits, durations=cfg.durations,
                                     digit_scale=cfg.digit_scale)
      yield index, {**example, "id": index}


def _reflect(x: np.ndarray, high: float):
  """Positions x folded into [0, high] by reflection off both walls; also whether any bounced."""
  if high <= 0:
    return np.zeros_like(x), False
  folded = np.mod(x, 2 * high)
  folded = np.where(folded > high, 2 * high - folded, folded)
  return folded, bool((np.floor(x / high) != np.floor(x[0] / high)).any())


def _motion_phrase(direction: str, speed: str, bounced: bool, finite: bool) -> str:
  """'moving slowly to the left' (finite: 'moves slowly to the left'), 'falling quickly', ..."""
  if direction == "still":
    return "stands still" if finite else "standing still"
  move, fall, rise = ("moves", "falls", "rises") if finite else ("moving", "falling", "rising")
  if direction in ("left", "right"):
    phrase = f"{move} {speed} to the {direction}"
  elif direction == "down":
    phrase = f"{fall} {speed}"
  elif direction == "up":
    phrase = f"{rise} {speed}"
  else:
    vertical, horizontal = direction.split("-")
    phrase = f"{move} {speed} {vertical} and to the {horizontal}"
  if bounced:
    phrase += " and bounces" if finite else " and bouncing"
  return phrase


def compose_caption(digits, colours, background: str, motions=None) -> str:
  """The moving_digits caption of digits (int) in colours (DIGIT_COLOURS keys) on a background
  (a BACKGROUND_COLOURS key); `motions` holds one (direction, speed, bounced) per digit for a
  video (the first digit's phrase "moving ...", the others' "moves ..."), None for an image."""
  nouns = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {d}" for d, c in zip(digits, colours)]
  if motions is None:
    caption = " and ".join(nouns)
  else:
    clauses = [f"{noun} {_motion_phrase(direction, speed, bounced, finite=i > 0)}"
               for i, (noun, (direction, speed, bounced)) in enumerate(zip(nouns, motions))]
    caption = clauses[0] + (" while " + " and ".join(clauses[1:]) if len(clauses) > 1 else "")
  return caption + f" on a {background} background"


# The prompt expander's defaults for what a short prompt leaves unsaid.
EXPAND_DEFAULTS = dict(colour="white", background="black", direction="right", speed="steadily")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SPEED_WORDS = {"slowly": ("slowly", "slow"), "steadily": ("steadily", "steady", "moderately"),
                "quickly": ("quickly", "quick", "fast", "rapidly")}
_VERTICAL_WORDS = {"up": ("up", "upward", "upwards", "rising", "rises", "rise"),
                   "down": ("down", "downward", "downwards", "falling", "falls", "fall", "dropping", "drops")}


def expand_caption(prompt: str, frames: int = 9) -> str:
  """A short prompt ("a red 3 falling fast", "7 on navy") as the dense caption the generator writes
  (compose_caption), so a model trained on those captions reads it as it learned them.

  Deterministic: each digit (0-9 or zero..nine) is a subject, the DIGIT_COLOURS word right before
  it its colour; the words after it (up to the next subject) its motion: left/right and up/down
  words (or rising, falling, ...) make the direction, both a diagonal, still/static "still";
  slow/steady/fast words the speed; "bounc" bouncing. A background is "on (a) X (background)" or
  "X background" for X of BACKGROUND_COLOURS. What the prompt leaves unsaid takes EXPAND_DEFAULTS
  (white, black background, moving steadily to the right); a one-frame request gets no motion.
  A generator caption expands to itself. A prompt without a digit is an error.
  """
  text = " " + prompt.lower().replace("grey", "gray").strip() + " "
  backgrounds = "|".join(sorted(BACKGROUND_COLOURS, key=len, reverse=True))
  background = EXPAND_DEFAULTS["background"]
  found = re.search(rf"\b(?:on|against) (?:an? |the )?({backgrounds})(?: background)?\b|\b({backgrounds}) background\b",
                    text)
  if found:
    background = found.group(1) or found.group(2)
    text = text[:found.start()] + " " + text[found.end():]
  colours = "|".join(sorted(DIGIT_COLOURS, key=len, reverse=True))
  numbers = r"\d" if re.search(r"\b\d\b", text) else "|".join(_DIGIT_WORDS)  # "one red 3": 3 is the digit
  nouns = list(re.finditer(rf"(?:\b(?:an?|the) )?(?:\b({colours}) )?\b({numbers})\b", text))
  if not nouns:
    raise ValueError(f"cannot expand prompt {prompt!r}: it names no digit (0-9 or zero..nine); the expander "
                     "writes moving_digits captions, whose subjects are digits")
  digits, digit_colours, motions = [], [], []
  for i, noun in enumerate(nouns):
    word = noun.group(2)
    digits.append(int(word) if word.isdigit() else _DIGIT_WORDS.index(word))
    digit_colours.append(noun.group(1) or EXPAND_DEFAULTS["colour"])
    words = set(re.findall(r"[a-z]+", text[noun.end():nouns[i + 1].start() if i + 1 < len(nouns) else len(text)]))
    vertical = next((v for v, names in _VERTICAL_WORDS.items() if words & set(names)), None)
    horizontal = next((h for h in ("left", "right") if h in words), None)
    if words & {"still", "static", "stationary", "motionless"}:
      direction = "still"
    elif vertical and horizontal:
      direction = f"{vertical}-{horizontal}"
    else:
      direction = vertical or horizontal or EXPAND_DEFAULTS["direction"]
    speed = next((s for s, names in _SPEED_WORDS.items() if words & set(names)), EXPAND_DEFAULTS["speed"])
    motions.append((direction, speed, any(w.startswith("bounc") for w in words) and direction != "still"))
  return compose_caption(digits, digit_colours, background, motions if frames > 1 else None)


def caption_direction(caption: str) -> str | None:
  """The DIRECTIONS key a one-digit caption states (the inverse of _motion_phrase), or None
  when the digit bounces (its path is not one direction) or the caption names no motion."""
  if "bounc" in caption:
    return None
  if "still" in caption:
    return "still"
  for vertical in ("up", "down"):
    for horizontal in ("left", "right"):
      if f" {vertical} and to the {horizontal}" in caption:
        return f"{vertical}-{horizontal}"
  for horizontal in ("left", "right"):
    if f"to the {horizontal}" in caption:
      return horizontal
  if "falling" in caption or "falls" in caption:
    return "down"
  if "rising" in caption or "rises" in caption:
    return "up"
  return None


def caption_attributes(caption: str) -> dict | None:
  """What a moving_digits (or digits_canvas) caption states, read with the generator's own vocabulary
  (DIGIT_COLOURS, BACKGROUND_COLOURS, SPEEDS, _motion_phrase): the inverse of its captions.

  Returns {"digits": [int], "colours": [str], "background": str, "directions": [str | None],
  "speeds": [str | None], "bounced": [bool]}, one entry per digit in caption order; a digit's
  direction is the DIRECTIONS key its motion phrase names (its starting direction when it
  bounces; None when the caption names no motion, as for one frame), its speed a SPEEDS key
  (None when still or without motion). None for a caption that is not of this form.
  """
  colours = "|".join(sorted(DIGIT_COLOURS, key=len, reverse=True))
  backgrounds = "|".join(sorted(BACKGROUND_COLOURS, key=len, reverse=True))
  tail = re.search(rf" on an? ({backgrounds}) background$", caption.strip())
  if tail is None:
    return None
  body = caption.strip()[:tail.start()]
  nouns = list(re.finditer(rf"(?:^|\b)an? ({colours}) (\d)\b", body))
  if not nouns:
    return None
  out = dict(digits=[], colours=[], background=tail.group(1), directions=[], speeds=[], bounced=[])
  for i, noun in enumerate(nouns):
    phrase = " " + body[noun.end():nouns[i + 1].start() if i + 1 < len(nouns) else len(body)]
    out["digits"].append(int(noun.group(2)))
    out["colours"].append(noun.group(1))
    out["bounced"].append("bounc" in phrase)
    direction = caption_direction(phrase.replace("bounc", ""))
    out["directions"].append(direction)
    out["speeds"].append(next((s for s in SPEEDS if f" {s}" in phrase), None) if direction != "still" else None)
  return out


def render_moving_digits(images, labels, rng: np.random.Generator, *, min_side: int, max_side: int,
                         max_digits: int, durations, digit_scale=MovingDigitsConfig.digit_scale) -> dict:
  """One clip of 1..max_digits digits from `images` (8x8 in [0, 1]) moving on a canvas.

  Returns the feature dict (video, label, caption, labels, centers, velocities).
  """
  height, width = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
  frames = int(rng.choice(durations))
  num = int(rng.integers(1, max_digits + 1))
  short = min(height, width)
  background_name = str(rng.choice(sorted(BACKGROUND_COLOURS)))
  colour_names = rng.choice(sorted(DIGIT_COLOURS), size=num, replace=num > len(DIGIT_COLOURS))
  background = np.asarray(BACKGROUND_COLOURS[background_name], np.float32)
  canvas = np.broadcast_to(background, (frames, height, width, 3)).copy()
  centers = np.zeros((frames, num, 2), np.float32)
  velocities = np.zeros((num, 2), np.float32)
  digit_labels, motions = [], []
  time = np.arange(frames, dtype=np.float64)
  for d in range(num):
    pick = int(rng.integers(len(images)))
    side = max(8, min(short, int(round(rng.uniform(*digit_scale) * short))))
    alpha = np.clip(bilinear_resize(images[pick], side, side), 0.0, 1.0).astype(np.float32)[..., None]
    colour = np.asarray(DIGIT_COLOURS[colour_names[d]], np.float32)
    direction = str(rng.choice(list(DIRECTIONS))) if frames > 1 else "still"
    speed = str(rng.choice(list(SPEEDS)))
    step = np.asarray(DIRECTIONS[direction]) * max(0.5, SPEEDS[speed] * short)
    start = rng.uniform(0, [height - side, width - side])
    top, bounced_y = _reflect(start[0] + step[0] * time, height - side)
    left, bounced_x = _reflect(start[1] + step[1] * time, width - side)
    top, left = np.round(top).astype(int), np.round(left).astype(int)
    for t in range(frames):
      patch = canvas[t, top[t]:top[t] + side, left[t]:left[t] + side]
      patch[...] = patch * (1 - alpha) + colour * alpha
    centers[:, d, 0] = top + side / 2
    centers[:, d, 1] = left + side / 2
    velocities[d] = step
    digit_labels.append(int(labels[pick]))
    motions.append((direction, speed, bounced_y or bounced_x))
  caption = compose_caption(digit_labels, [str(c) for c in colour_names], background_name,
                            motions if frames > 1 else None)
  return dict(video=np.round(canvas).astype(np.uint8), label=digit_labels[0], caption=caption,
              labels=np.asarray(digit_labels, np.int64), centers=centers, velocities=velocities)


# --------------------------------------------------------------------------- image_pans

# skimage.data photographs that ship with scikit-image (no download); label = index.
PHOTOS = (
    ("astronaut", "an astronaut"),
    ("camera", "a man with a camera"),
    ("chelsea", "a cat"),
    ("coffee", "a cup of coffee"),
    ("rocket", "a rocket on its launch pad"),
    ("coins", "old coins"),
    ("moon", "the surface of the moon"),
    ("hubble_deep_field", "galaxies in deep space"),
    ("immunohistochemistry", "stained tissue under a microscope"),
    ("colorwheel", "a colour wheel"),
)
CAMERA_MOVES = ("pan left", "pan right", "pan up", "pan down", "zoom in", "zoom out")


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] triangle-filter weights, widened when shrinking (antialiased, as PIL does)."""
  ratio = n_in / n_out
  support = max(1.0, ratio)
  centres = (np.arange(n_out) + 0.5) * ratio - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_frames(video: np.ndarray, height: int, width: int) -> np.ndarray:
  """Float video [T, H, W, C] -> [T, height, width, C], antialiased bilinear per frame."""
  rows = resize_weights(video.shape[1], height)
  cols = resize_weights(video.shape[2], width)
  channels_first = np.ascontiguousarray(np.moveaxis(video, -1, 1))  # [T, C, H, W]: two plain matmuls
  return np.moveaxis(rows @ channels_first @ cols.T, 1, -1)


@dataclasses.dataclass
class ImagePansConfig(tfds.core.BuilderConfig):
  """Output sides in [min_side, max_side] px, clip lengths from `durations`; seed fixes all choices."""

  min_side: int = 24
  max_side: int = 96
  durations: tuple[int, ...] = (1, 5, 9, 17, 33)
  seed: int = 0
  train_examples: int = 400
  validation_examples: int = 50


def _image_pans_config(**kwargs) -> ImagePansConfig:
  cfg = ImagePansConfig(name="tmp", **kwargs)
  if not 8 <= cfg.min_side <= cfg.max_side:
    raise ValueError(f"image_pans needs 8 <= min_side <= max_side, got {cfg.min_side}, {cfg.max_side}")
  if not cfg.durations or min(cfg.durations) < 1 or min(cfg.train_examples, cfg.validation_examples) < 1:
    raise ValueError("image_pans needs durations >= 1 and train_examples, validation_examples >= 1")
  cfg.durations = tuple(int(d) for d in cfg.durations)
  default = ImagePansConfig(name="default")
  if all(getattr(cfg, f) == getattr(default, f) for f in kwargs):
    cfg.name, cfg.description = "default", "24-96 px sides, 1-33 frames, seed 0"
  else:
    cfg.name = (f"s{cfg.min_side}-{cfg.max_side}_t{'-'.join(map(str, cfg.durations))}"
                f"_n{cfg.train_examples}-{cfg.validation_examples}_seed{cfg.seed}")
    cfg.description = "image_pans with " + cfg.name
  return cfg


class ImagePans(tfds.core.GeneratorBasedBuilder):
  """Camera pans and zooms across scikit-image's photographs, at native sizes and durations.

  `label` is the photograph (PHOTOS index), the caption names the move and the
  subject ("a slow pan to the left across a cup of coffee"). Extra feature:
    boxes  float32 [T, 4]  (top, left, height, width) of each frame's window, in px of the
                           photo shrunk to <= 320 px a side (the renderer's copy)
  The window keeps the output's aspect ratio; every random choice comes from
  a generator seeded by (seed, split, example index).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [_image_pans_config()]
  DEFAULT_CONFIG_NAME = "default"

  def __init__(self, *, config=None, min_side=None, max_side=None, durations=None, seed=None,
               train_examples=None, validation_examples=None, **kwargs):
    if config is None:  # always explicit: tfds would otherwise guess from what is on disk
      given = dict(min_side=min_side, max_side=max_side, durations=durations, seed=seed,
                   train_examples=train_examples, validation_examples=validation_examples)
      config = _image_pans_config(**{k: v for k, v in given.items() if v is not None})
      config = self.builder_configs.get(config.name, config)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = dict(_features())
    features["boxes"] = tfds.features.Tensor(shape=(None, 4), dtype=np.float32)
    return tfds.core.DatasetInfo(
        builder=self, description="Pans and zooms across scikit-image photographs, with captions.",
        features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager  # the photographs ship with scikit-image
    cfg = self.builder_config
    return {"train": self._generate_examples(cfg.train_examples, 0),
            "validation": self._generate_examples(cfg.validation_examples, 1)}

  def _generate_examples(self, count, split_code):
    photos = []
    for name, _ in PHOTOS:
      image = np.asarray(getattr(skimage.data, name)(), np.float32)
      image = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
      shrink = min(1.0, 320 / max(image.shape[:2]))  # outputs are <= ~100 px: smaller photos render faster
      photos.append(resize_frames(image[None], round(image.shape[0] * shrink), round(image.shape[1] * shrink))[0])
    cfg = self.builder_config
    for index in range(count):
      rng = np.random.default_rng([cfg.seed, split_code, index])
      yield index, {**render_pan(photos, rng, cfg.min_side, cfg.max_side, cfg.durations), "id": index}


def render_pan(photos, rng: np.random.Generator, min_side: int, max_side: int, durations) -> dict:
  """One clip of a window moving over (or zooming into) a photo, resized to a drawn output size."""
  label = int(rng.integers(len(photos)))
  photo = photos[label]
  height, width = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
  frames = int(rng.choice(durations))
  ph, pw = photo.shape[:2]
  aspect = width / height
  max_h = min(ph, pw / aspect)  # the tallest window of the output's aspect inside the photo
  move = str(rng.choice(CAMERA_MOVES)) if frames > 1 else "still"
  speed = str(rng.choice(["slow", "fast"]))
  travel = 1.0 if speed == "fast" else 0.4  # fraction of the free room crossed over the clip
  progress = np.linspace(0.0, travel, frames) if frames > 1 else np.zeros(1)
  if move.startswith("zoom"):
    big, small = max_h * rng.uniform(0.8, 1.0), max_h * rng.uniform(0.3, 0.45)
    sizes = big + (small - big) * progress if move == "zoom in" else small + (big - small) * progress
    centre = np.array([ph, pw]) / 2 + rng.uniform(-0.1, 0.1, 2) * np.array([ph, pw])
    win_h = sizes
    tops = np.clip(centre[0] - win_h / 2, 0, ph - win_h)
    lefts = np.clip(centre[1] - win_h * aspect / 2, 0, pw - win_h * aspect)
  else:
    win_h = np.full(frames, max_h * rng.uniform(0.4, 0.7))
    room_y, room_x = ph - win_h[0], pw - win_h[0] * aspect
    start_y, start_x = rng.uniform(0, room_y), rng.uniform(0, room_x)
    tops, lefts = np.full(frames, start_y), np.full(frames, start_x)
    if move in ("pan left", "pan right"):  # the camera moves; the picture slides the other way
      lefts = progress * room_x if move == "pan right" else room_x * (1 - progress)
    elif move in ("pan up", "pan down"):
      tops = progress * room_y if move == "pan down" else room_y * (1 - progress)
  boxes = np.stack([tops, lefts, win_h, win_h * aspect], -1).astype(np.float32)
  video = np.zeros((frames, height, width, 3), np.float32)
  for t, (top, left, h, w) in enumerate(boxes):
    top, left = int(round(top)), int(round(left))
    h, w = max(1, min(int(round(h)), ph - top)), max(1, min(int(round(w)), pw - left))
    video[t] = resize_frames(photo[None, top:top + h, left:left + w], height, width)[0]
  subject = PHOTOS[label][1]
  if move == "still":
    caption = f"a photo of {subject}"
  elif move.startswith("pan"):
    direction = move.split()[1]
    caption = f"a {speed} pan {'to the ' if direction in ('left', 'right') else ''}{direction} across {subject}"
  else:
    caption = f"a {speed} zoom {move.split()[1]} on {subject}"
  return dict(video=np.clip(np.round(video), 0, 255).astype(np.uint8), label=label, caption=caption,
              boxes=boxes)


# --------------------------------------------------------------------------- video_folder

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
        features=_features(), metadata=tfds.core.MetadataDict())

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


# --------------------------------------------------------------------------- opening datasets

# Built-in builders by tfds name; later video datasets join this table.
BUILDERS = {
    "digits_canvas": DigitsCanvas,
    "moving_digits": MovingDigits,
    "image_pans": ImagePans,
    "video_folder": VideoFolder,
}


def _builder(name: str, data_dir: str, builder_kwargs: dict) -> tfds.core.DatasetBuilder:
  if name not in BUILDERS:
    raise ValueError(f"unknown built-in dataset {name!r}; known: {sorted(BUILDERS)}")
  return BUILDERS[name](data_dir=data_dir, file_format="array_record", **builder_kwargs)


def ensure_dataset(name: str, data_dir: str = "", **builder_kwargs) -> None:
  """Builds the built-in dataset `name` under data_dir unless it is there already.

  builder_kwargs go to the builder (digits_canvas: image_size, seed; moving_digits:
  min_side, max_side, max_digits, durations, seed, train_examples,
  validation_examples; image_pans: min_side, max_side, durations, seed,
  train_examples, validation_examples; video_folder: folder, max_frames,
  max_side, fps, validation_fraction). data_dir "" means default_data_dir(). Offline: the built-in datasets download nothing.
  A `name` that is a prepared tfds dataset directory is left as it is.
  """
  if name not in BUILDERS and paths.isfile(paths.join(name, "dataset_info.json")):
    return
  builder = _builder(name, _resolve_data_dir(data_dir), builder_kwargs)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )


def open_source(name: str, split: str, data_dir: str = "", **builder_kwargs):
  """A random-access source (len / getitem) of one split of a prepared tfds dataset.

  `name` is a built-in dataset (looked up under data_dir with builder_kwargs,
  as ensure_dataset built it) or the path of a prepared tfds dataset directory
  (the one holding dataset_info.json). Raises ValueError naming what was looked
  for when there is no prepared dataset or no such split.
  """
  if name in BUILDERS:
    builder_dir = os.fspath(_builder(name, _resolve_data_dir(data_dir), builder_kwargs).data_dir)
  elif paths.isdir(name):
    builder_dir = name
  else:
    raise ValueError(
        f"dataset {name!r} is neither a built-in dataset ({sorted(BUILDERS)}) "
        "nor a directory holding a prepared tfds dataset")
  if not paths.isfile(paths.join(builder_dir, "dataset_info.json")):
    raise ValueError(
        f"{builder_dir} is not a prepared tfds dataset directory (no dataset_info.json); "
        + (f"build it with ensure_dataset({name!r}, ...)" if name in BUILDERS else
           "pass the <data_dir>/<name>/[<config>/]<version> directory"))
  builder = tfds.builder_from_directory(builder_dir)
  splits = sorted(builder.info.splits.keys())
  if split.split("[")[0] not in splits:
    raise ValueError(f"split {split!r} not found in {builder_dir}; available splits: {splits}")
  return builder.as_data_source(split=split)
