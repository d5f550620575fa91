"""Image helpers the built-in tfds builders share: their feature layout, resizing, scikit-learn's digits.

resize_frames is also the package's one antialiased resize of clips outside the builders (pipeline,
evaluate, sample, the tasks).
"""
import numpy as np
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds


def video_features() -> tfds.features.FeaturesDict:
  """The feature layout every built-in dataset writes, the one the pipeline decodes:

    video    uint8 [T, H, W, 3]  an image is a one-frame video (T = 1)
    label    int64, ClassLabel(10)
    caption  text (bytes when read back), written from the generator's metadata
    id       int64, unique index of the example inside its split
  """
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


def digit_images():
  """(images float64 [1797, 8, 8] in [0, 1], labels int64 [1797]): scikit-learn's hand-written digits."""
  digits = load_digits()
  return digits.images.astype(np.float64) / 16.0, digits.target.astype(np.int64)


def split_digit_images(seed: int, salt: int, validation_images: int):
  """((train images, labels), (validation images, labels)): sklearn's digits split by a seeded permutation.

  Each builder passes its own salt, so their splits are independent.
  """
  images, labels = digit_images()
  order = np.random.default_rng([seed, salt]).permutation(len(images))
  val_idx, train_idx = order[:validation_images], order[validation_images:]
  return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])
