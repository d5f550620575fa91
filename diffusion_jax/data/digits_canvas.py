"""`digits_canvas`: scikit-learn's 8x8 digits (1797 real hand-written images, 17 grey levels),
upscaled bilinearly to a random size and placed at a random spot on a square canvas, in a named
colour on a dark background; one-frame videos of the shared layout (imaging.video_features).
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.data import imaging


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
        features=imaging.video_features(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the digits ship with scikit-learn
    cfg = self.builder_config
    train, validation = imaging.split_digit_images(cfg.seed, 7, cfg.validation_images)
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
  alpha = np.clip(imaging.bilinear_resize(image, side, side), 0.0, 1.0)[..., None]
  background = np.asarray(BACKGROUND_COLOURS[background_name], np.float64)
  colour = np.asarray(DIGIT_COLOURS[digit_name], np.float64)
  canvas = np.broadcast_to(background, (size, size, 3)).copy()
  canvas[top:top + side, left:left + side] = background * (1 - alpha) + colour * alpha
  caption = f"a {digit_name} {label} on a {background_name} background"
  return np.round(canvas).astype(np.uint8), caption
