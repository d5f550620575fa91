"""The project's own digit classifier: a small CNN trained in the one loop on real frames.

Evaluation uses it twice: its logits say whether a sample of class 3 looks
like a 3 (conditional accuracy), and its penultimate features are the default
feature space of the Fréchet distance and KID (evaluate.py). It plays the
role Inception-v3 plays for FID on ImageNet, for the built-in digits.

Batches are fixed-shape (one example per row, not packed): frames uint8
[B, S, S, 3] at data.image_size and int32 labels [B]. The network resizes
any frame to model.input_size inside (bilinear, antialiased), so one
classifier serves samples of every size.

Task interface: see the TASKS comment in train/loop.py.
"""
import dataclasses

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.config import ConfigError
from diffusion_jax.data import imaging, pipeline, sources


def digit_window(x, *, threshold: float = 0.5, margin: float = 1.25):
  """Where each frame's foreground is: (x - background, background [N, 3], top [N], left [N], side [N],
  weights [N, H, W]).

  x: float frames [N, H, W, 3]. The background is the median colour of the
  frame's border pixels; the foreground is where the colour distance from it
  exceeds `threshold` x the frame's largest distance (`weights` is that
  distance there, 0 elsewhere); the window is the foreground's bounding box,
  squared on its longer side and widened by `margin`, centred on the box. A
  frame with no foreground keeps its whole extent (a square around its centre).
  """
  n, h, w, _ = x.shape
  border = jnp.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # [N, 2W + 2H, 3]
  background = jnp.median(border, axis=1)
  x = x - background[:, None, None, :]
  distance = jnp.sqrt(jnp.sum(x * x, axis=-1))  # [N, H, W]
  peak = distance.max(axis=(1, 2), keepdims=True)
  mask = (distance > threshold * peak) & (peak > 1e-3)

  def extent(any_along, size):  # [N, size] bool -> (first, one past the last) index, whole range if none
    found = any_along.any(axis=1)
    first = jnp.argmax(any_along, axis=1)
    last = size - jnp.argmax(any_along[:, ::-1], axis=1)
    return jnp.where(found, first, 0).astype(jnp.float32), jnp.where(found, last, size).astype(jnp.float32)

  y0, y1 = extent(mask.any(axis=2), h)
  x0, x1 = extent(mask.any(axis=1), w)
  side = jnp.maximum(jnp.maximum(y1 - y0, x1 - x0) * margin, 4.0)
  top, left = (y0 + y1) / 2 - side / 2, (x0 + x1) / 2 - side / 2
  return x, background, top, left, side, jnp.where(mask, distance, 0.0)


def resample_window(x, top, left, side, size: int):
  """The square windows (top, left, side) of frames x [N, H, W, C], resampled to size x size
  (antialiased bilinear; outside the frame is 0)."""
  scale = size / side

  def resample(frame, s, t, l):
    return jax.image.scale_and_translate(frame, (size, size, frame.shape[-1]), (0, 1), jnp.stack([s, s]),
                                         jnp.stack([-t * s, -l * s]), "linear", antialias=True)

  return jax.vmap(resample)(x, scale, top, left)


def locate_digit(x, input_size: int, *, threshold: float = 0.5, margin: float = 1.25):
  """A square window around each frame's foreground (digit_window), resampled to input_size x input_size.

  Returns x - background resampled over the window (outside the frame is
  background, 0). So a digit reads the same at any canvas size, aspect and position.
  """
  x, _, top, left, side, _ = digit_window(x, threshold=threshold, margin=margin)
  return resample_window(x, top, left, side, input_size)


class DigitClassifier(nn.Module):
  """Conv stages (3x3 conv, ReLU, 2x2 max pool) -> flatten -> Dense features (ReLU) -> logits.

  Input: frames [N, H, W, 3], uint8 (0..255) or float in [-1, 1] (the data
  pipeline's convention). Each frame is brought to input_size x input_size:
  with `locate` (the moving_digits classifier) a square window around its
  foreground is resampled (locate_digit: any canvas size, aspect and digit
  position reads alike), else the whole frame is resized (square canvases of
  digits_canvas). Then it is standardised (its own mean and std over pixels
  and channels), which makes the net indifferent to the canvas's colours and
  brightness and lets a short run learn fast. Flattening (not a global mean)
  keeps where the strokes are. Returns (logits [N, num_classes], features [N, features]).
  """

  num_classes: int = 10
  input_size: int = 24
  widths: tuple = (16, 32, 64)
  features: int = 64
  locate: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, frames):
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f"DigitClassifier wants frames [N, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.dtype == jnp.uint8:
      x = frames.astype(jnp.float32) / 127.5 - 1.0
    else:
      x = frames.astype(jnp.float32)
    n = x.shape[0]
    if self.locate:
      x = locate_digit(x, self.input_size)
    else:
      x = jax.image.resize(x, (n, self.input_size, self.input_size, 3), "bilinear", antialias=True)
    x = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / (x.std(axis=(1, 2, 3), keepdims=True) + 1e-3)
    x = x.astype(self.dtype)
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), dtype=self.dtype, name=f"conv_{i}")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(n, -1)
    features = nn.relu(nn.Dense(self.features, dtype=self.dtype, name="features")(x))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features)
    return logits.astype(jnp.float32), features.astype(jnp.float32)


# --------------------------------------------------------------------------- task interface

def validate(config) -> None:
  data, model = config.data, config.model
  if data.channels != 3:
    raise ConfigError(f"data.channels={data.channels}: the digit classifier reads RGB frames (3 channels)")
  if int(data.image_size) < 8:
    raise ConfigError(f"data.image_size={data.image_size} must be >= 8 px")
  if int(model.input_size) < 8 or int(model.input_size) % (2 ** len(model.widths)):
    raise ConfigError(f"model.input_size={model.input_size} must be >= 8 and divisible by 2^{len(model.widths)} "
                      f"(one 2x pooling per entry of model.widths={tuple(model.widths)})")
  if int(model.num_classes) < 2:
    raise ConfigError(f"model.num_classes={model.num_classes} must be >= 2")


def build_model(config) -> DigitClassifier:
  return DigitClassifier(
      num_classes=int(config.model.num_classes), input_size=int(config.model.input_size),
      widths=tuple(int(w) for w in config.model.widths), features=int(config.model.features),
      locate=bool(config.model.locate), dtype=jnp.dtype(config.train.compute_dtype))


def init_params(model, config, rng):
  size = int(config.data.image_size)
  return model.init(rng, jnp.zeros((1, size, size, 3), jnp.uint8))["params"]


def make_objective(config):
  del config  # no diffusion objective: loss_fn holds the whole loss
  return None


def loss_fn(params, model, objective, batch, rng, config, *, train=True):
  """Mean softmax cross-entropy over the batch; aux has loss and accuracy."""
  del objective, rng, config, train  # deterministic network: no dropout, no noise
  logits, _ = model.apply({"params": params}, batch["frames"])
  labels = batch["labels"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, {"loss": loss, "accuracy": accuracy}


def eval_fn(params, model, objective, batch, index, config) -> dict:
  """Sums (not means) over the batch, so summarize_eval weighs every example alike."""
  del objective, index, config
  logits, _ = model.apply({"params": params}, batch["frames"])
  labels = batch["labels"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"loss_sum": losses.sum(), "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
          "count": jnp.asarray(labels.shape[0], jnp.float32)}


def summarize_eval(auxes: list[dict]) -> dict:
  count = sum(float(a["count"]) for a in auxes)
  return {"eval/loss": sum(float(a["loss_sum"]) for a in auxes) / max(count, 1.0),
          "eval/accuracy": sum(float(a["correct"]) for a in auxes) / max(count, 1.0),
          "eval/examples": count}


# --------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class SingleDigitFrame(grain.transforms.RandomMap):
  """tfds example -> {"frames": uint8 [S, S, 3], "labels": int32}: one random frame, resized to S.

  digits_canvas examples are one-frame videos; a moving_digits clip gives one
  of its frames (single-digit clips only: make_dataset filters the others).
  With pad_square, a non-square frame is first padded to a square with its
  border's median colour (the canvas background), so the aspect is kept.
  """

  size: int
  pad_square: bool = False

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    video = np.asarray(element["video"])
    frame = video[int(rng.integers(0, video.shape[0]))] if video.ndim == 4 else video
    height, width = frame.shape[:2]
    if self.pad_square and height != width:
      border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
      side = max(height, width)
      square = np.broadcast_to(np.median(border, axis=0).astype(np.uint8), (side, side, 3)).copy()
      top, left = (side - height) // 2, (side - width) // 2
      square[top:top + height, left:left + width] = frame
      frame = square
    if frame.shape[:2] != (self.size, self.size):
      resized = imaging.resize_frames(frame[None].astype(np.float32), self.size, self.size)[0]
      frame = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    return {"frames": frame, "labels": np.int32(element["label"])}


def _single_digit(element: dict) -> bool:
  """moving_digits clips may hold 2-3 digits; their `label` is the first one's only."""
  return "labels" not in element or len(element["labels"]) == 1


def make_dataset(config, *, split: str, process_index: int = 0, process_count: int = 1, seed: int = 0,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """This process's fixed-shape batches of one split, shuffled, repeated num_epochs (None: forever)."""
  data = config.data
  global_batch = int(config.train.global_batch)
  if global_batch % process_count:
    raise ValueError(f"train.global_batch={global_batch} is not divisible by process_count={process_count}")
  source = sources.open_source(data.name, split, data.data_dir, **pipeline.builder_kwargs(data))
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if data.name == "moving_digits":
    ds = ds.filter(_single_digit)
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  pad_square = bool(config.model.locate)  # the net finds the digit: keep its aspect
  ds = ds.random_map(SingleDigitFrame(size=int(data.image_size), pad_square=pad_square), seed=seed)
  return ds.to_iter_dataset(pipeline.read_options(data)).batch(global_batch // process_count, drop_remainder=True)
