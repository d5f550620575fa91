"""The built-in tfds datasets (one module each) and how the pipeline opens them.

Every dataset is a TFDS `GeneratorBasedBuilder` stored as ArrayRecord, so it needs no TensorFlow
and Grain reads it by random access (`tfds.data_source`). All of them write one feature layout,
the one the pipeline decodes (imaging.video_features: video uint8 [T, H, W, 3], label, caption, id).

  digits_canvas.py  scikit-learn's 8x8 digits on a coloured square canvas, as one-frame videos
  moving_digits.py  the same digits moving and bouncing, at native sizes and durations, with
                    motion captions (and the caption vocabulary: compose, parse, expand)
  image_pans.py     camera pans and zooms across scikit-image's photographs
  video_folder.py   the user's own folder of videos, decoded by ffmpeg

A builder registers with tfds under its class name (MovingDigits -> moving_digits) when its module
is imported; this module imports them all.
"""
import os

import tensorflow_datasets as tfds

from diffusion_jax import paths
from diffusion_jax.data import digits_canvas, image_pans, moving_digits, video_folder


def default_data_dir() -> str:
  """$DIFFUSION_JAX_DATA, else ~/.cache/diffusion_jax/data."""
  return os.environ.get("DIFFUSION_JAX_DATA") or os.path.expanduser("~/.cache/diffusion_jax/data")


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  return os.fspath(data_dir) if data_dir else default_data_dir()


# Built-in builders by tfds name; later video datasets join this table.
BUILDERS = {
    "digits_canvas": digits_canvas.DigitsCanvas,
    "moving_digits": moving_digits.MovingDigits,
    "image_pans": image_pans.ImagePans,
    "video_folder": video_folder.VideoFolder,
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
  max_side, fps, validation_fraction). data_dir "" means default_data_dir(). Offline: the
  built-in datasets download nothing.
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
