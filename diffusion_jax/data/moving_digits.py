"""`moving_digits`: scikit-learn's digits, 1-3 of them, moving (and bouncing off the walls) on
canvases of many native sizes and aspect ratios, for 1 (an image), 5, 9, 17 or 33 frames.

The caption is written from the generator's own motion metadata, which is stored next to the clip
(see MovingDigits); the same vocabulary reads captions back (caption_attributes) and expands short
prompts into them (expand_caption).
"""
import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import digits_canvas, imaging


# Unit (dy, dx) steps; image rows grow downwards, so "down" is +y.
DIRECTIONS = {
    "still": (0.0, 0.0),
    "left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0),
    "up-left": (-0.7071, -0.7071), "up-right": (-0.7071, 0.7071),
    "down-left": (0.7071, -0.7071), "down-right": (0.7071, 0.7071),
}
# Speed as a fraction of the canvas's shorter side per frame.
SPEEDS = {"slowly": 0.02, "steadily": 0.045, "quickly": 0.09}

# The quickstart's build (its VAE, DiT, captioner and evaluation all read these clips). One digit per
# clip keeps a prompt's digit unambiguous for the classifier's check; digits half to 70% of the
# canvas side (the default is 30-55%) span 3-7 latent pixels of the x4 VAE.
QUICKSTART_DATA = dict(min_side=24, max_side=40, max_digits=1, durations=(1, 5, 9), digit_scale=(0.5, 0.7),
                       train_examples=3000, validation_examples=200)


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
  # "dense": the generator's caption of digits, colours, motion and background; "short": alt-text
  # like "a 3" (the same clips), the captions a recaptioner is for (BENCHMARKS.md, recaptioning).
  captions: str = "dense"


CAPTION_STYLES = ("dense", "short")


def short_caption(digits) -> str:
  """'a 3', 'a 3 and a 7': what a clip's alt text might say, nothing of colour or motion."""
  return " and ".join(f"a {int(d)}" for d in digits)


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
  if cfg.captions not in CAPTION_STYLES:
    raise ValueError(f"moving_digits captions must be one of {CAPTION_STYLES}, got {cfg.captions!r}")
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
    if cfg.captions != default.captions:
      cfg.name += f"_{cfg.captions}"
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
               digit_scale=None, seed=None, train_examples=None, validation_examples=None, captions=None,
               **kwargs):
    if config is None:  # always explicit: tfds would otherwise guess from what is on disk
      given = dict(min_side=min_side, max_side=max_side, max_digits=max_digits, durations=durations,
                   digit_scale=digit_scale, seed=seed, train_examples=train_examples,
                   validation_examples=validation_examples, captions=captions)
      config = _moving_digits_config(**{k: v for k, v in given.items() if v is not None})
      config = self.builder_configs.get(config.name, config)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = dict(imaging.video_features())
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
    train, validation = imaging.split_digit_images(cfg.seed, 11, cfg.validation_images)
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
      if cfg.captions == "short":
        example["caption"] = short_caption(example["labels"])
      yield index, {**example, "id": index}


def _reflect(x: np.ndarray, high: float):
  """Positions x folded into [0, high] by reflection off both walls; also whether any bounced."""
  if high <= 0:
    return np.zeros_like(x), False
  folded = np.mod(x, 2 * high)
  folded = np.where(folded > high, 2 * high - folded, folded)
  return folded, bool((np.floor(x / high) != np.floor(x[0] / high)).any())


def motion_phrase(direction: str, speed: str, bounced: bool, finite: bool) -> str:
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
  """The moving_digits caption of digits (int) in colours (digits_canvas.DIGIT_COLOURS keys) on a
  background (a digits_canvas.BACKGROUND_COLOURS key); `motions` holds one (direction, speed, bounced)
  per digit for a video (the first digit's phrase "moving ...", the others' "moves ..."), None for an
  image."""
  nouns = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {d}" for d, c in zip(digits, colours)]
  if motions is None:
    caption = " and ".join(nouns)
  else:
    clauses = [f"{noun} {motion_phrase(direction, speed, bounced, finite=i > 0)}"
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

  Deterministic: each digit (0-9 or zero..nine) is a subject, the digits_canvas.DIGIT_COLOURS word
  right before it its colour; the words after it (up to the next subject) its motion: left/right and
  up/down words (or rising, falling, ...) make the direction, both a diagonal, still/static "still";
  slow/steady/fast words the speed; "bounc" bouncing. A background is "on (a) X (background)" or
  "X background" for X of digits_canvas.BACKGROUND_COLOURS. What the prompt leaves unsaid takes
  EXPAND_DEFAULTS (white, black background, moving steadily to the right); a one-frame request gets
  no motion.
  A generator caption expands to itself. A prompt without a digit is an error.
  """
  text = " " + prompt.lower().replace("grey", "gray").strip() + " "
  backgrounds = "|".join(sorted(digits_canvas.BACKGROUND_COLOURS, key=len, reverse=True))
  background = EXPAND_DEFAULTS["background"]
  found = re.search(rf"\b(?:on|against) (?:an? |the )?({backgrounds})(?: background)?\b|\b({backgrounds}) background\b",
                    text)
  if found:
    background = found.group(1) or found.group(2)
    text = text[:found.start()] + " " + text[found.end():]
  colours = "|".join(sorted(digits_canvas.DIGIT_COLOURS, key=len, reverse=True))
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
  """The DIRECTIONS key a one-digit caption states (the inverse of motion_phrase), or None
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
  (digits_canvas.DIGIT_COLOURS and BACKGROUND_COLOURS, SPEEDS, motion_phrase): the inverse of its
  captions.

  Returns {"digits": [int], "colours": [str], "background": str, "directions": [str | None],
  "speeds": [str | None], "bounced": [bool]}, one entry per digit in caption order; a digit's
  direction is the DIRECTIONS key its motion phrase names (its starting direction when it
  bounces; None when the caption names no motion, as for one frame), its speed a SPEEDS key
  (None when still or without motion). None for a caption that is not of this form.
  """
  colours = "|".join(sorted(digits_canvas.DIGIT_COLOURS, key=len, reverse=True))
  backgrounds = "|".join(sorted(digits_canvas.BACKGROUND_COLOURS, key=len, reverse=True))
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
  background_name = str(rng.choice(sorted(digits_canvas.BACKGROUND_COLOURS)))
  colour_names = rng.choice(sorted(digits_canvas.DIGIT_COLOURS), size=num,
                            replace=num > len(digits_canvas.DIGIT_COLOURS))
  background = np.asarray(digits_canvas.BACKGROUND_COLOURS[background_name], np.float32)
  canvas = np.broadcast_to(background, (frames, height, width, 3)).copy()
  centers = np.zeros((frames, num, 2), np.float32)
  velocities = np.zeros((num, 2), np.float32)
  digit_labels, motions = [], []
  time = np.arange(frames, dtype=np.float64)
  for d in range(num):
    pick = int(rng.integers(len(images)))
    side = max(8, min(short, int(round(rng.uniform(*digit_scale) * short))))
    alpha = np.clip(imaging.bilinear_resize(images[pick], side, side), 0.0, 1.0).astype(np.float32)[..., None]
    colour = np.asarray(digits_canvas.DIGIT_COLOURS[colour_names[d]], np.float32)
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
