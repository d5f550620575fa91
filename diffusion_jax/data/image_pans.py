"""`image_pans`: camera pans and zooms across scikit-image's photographs, at native sizes and
durations, captioned with the move and the subject.
"""
import dataclasses

import numpy as np
import skimage.data
import tensorflow_datasets as tfds

from diffusion_jax.data import imaging


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
    features = dict(imaging.video_features())
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
      size = round(image.shape[0] * shrink), round(image.shape[1] * shrink)
      photos.append(imaging.resize_frames(image[None], *size)[0])
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
    video[t] = imaging.resize_frames(photo[None, top:top + h, left:left + w], height, width)[0]
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
