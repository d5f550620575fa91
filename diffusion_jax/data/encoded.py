"""The encoded-dataset format: what `encode` writes and the pipeline, sampling and evaluation read.

An encoded dataset is an ArrayRecord tfds dataset (Tensor features, no TensorFlow) with one
example per source example (`features`):

  id             int64                      the source example's id
  label          int64                      the source example's label
  caption        text (bytes when read)     the source caption
  text           float16 [n_tokens, D]      the text encoder's last hidden states of the caption, its
                                            n_tokens = text_length real tokens ([CLS] ... [SEP]), no padding
  text_length    int32                      n_tokens (<= text_max_length)
  source_shape   int32 [3]                  (frames, height, width) of the source clip, before any trim or crop
with a VAE:
  latent_mean    float32 [T', H', W', z]    posterior mean and log-variance of the trimmed, cropped clip
  latent_logvar  float32 [T', H', W', z]
without a VAE:
  video          uint8 [T, H, W, C]         the source clip unchanged (a pixel dataset that carries text)

A latent clip is the source clip trimmed to 1 + 4k frames (`trimmed_frames`, the causal
video VAE's rule) and centre-cropped to multiples of the VAE's spatial factor (`trim_and_crop`).
`metadata.json` records the source, the text encoder and the VAE with its latent statistics
(`encoded_metadata`); `latent_stats` gives the pipeline the per-channel normalisation and
`record_conditioners` writes into a diffusion run's config what it decodes and conditions with.
The writer and the directory layout are diffusion_jax/encode.py.
"""
import json

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax import paths

TEMPORAL_FACTOR = 4  # the causal video VAE keeps frame 0 and folds each next 4 frames into one
FORMAT_VERSION = "1.0.0"


def trimmed_frames(frames: int) -> int:
  """1 + 4*floor((T-1)/4): the longest 1 + 4k prefix of a T-frame clip."""
  return 1 + TEMPORAL_FACTOR * ((frames - 1) // TEMPORAL_FACTOR)


def trim_and_crop(video: np.ndarray, spatial_factor: int) -> np.ndarray:
  """The first 1 + 4k frames of [T, H, W, C], centre-cropped to multiples of spatial_factor."""
  frames, height, width = video.shape[:3]
  out_h, out_w = height - height % spatial_factor, width - width % spatial_factor
  if out_h == 0 or out_w == 0:
    raise ValueError(f"a {height}x{width} clip is smaller than the VAE's spatial factor {spatial_factor}")
  top, left = (height - out_h) // 2, (width - out_w) // 2
  return video[:trimmed_frames(frames), top:top + out_h, left:left + out_w]


def features(text_dim: int, latent_channels: int | None) -> tfds.features.FeaturesDict:
  """The tfds features of an encoded dataset (the table above): latents with latent_channels, else pixels."""
  spec = {
      "id": tfds.features.Scalar(dtype=np.int64),
      "label": tfds.features.Scalar(dtype=np.int64),
      "caption": tfds.features.Text(),
      "text": tfds.features.Tensor(shape=(None, text_dim), dtype=np.float16, encoding="zlib"),
      "text_length": tfds.features.Scalar(dtype=np.int32),
      "source_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
  }
  if latent_channels is None:
    spec["video"] = tfds.features.Tensor(shape=(None, None, None, None), dtype=np.uint8, encoding="zlib")
  else:
    for key in ("latent_mean", "latent_logvar"):
      spec[key] = tfds.features.Tensor(shape=(None, None, None, latent_channels), dtype=np.float32,
                                       encoding="zlib")
  return tfds.features.FeaturesDict(spec)


def read_json(path: str):
  return json.loads(paths.read_text(path))


def complete_splits(path: str) -> list[str]:
  """Splits of the dataset at `path` that are readable (listed in its dataset_info.json)."""
  info_path = paths.join(path, "dataset_info.json")
  if not paths.isfile(info_path):
    return []
  return sorted(s["name"] for s in read_json(info_path).get("splits", []))


def encoded_metadata(path: str) -> dict:
  """The dataset-level metadata of an encoded dataset (metadata.json; see the module docstring)."""
  meta_path = paths.join(path, "metadata.json")
  if not paths.isfile(meta_path):
    raise ValueError(f"{path} is not a finished encoded dataset (no metadata.json)")
  return read_json(meta_path)


def latent_stats(data_config) -> dict | None:
  """The per-channel latent {mean, std} a latent dataset was encoded with, or None for pixels.

  A latent dataset whose channel count differs from data.channels is a
  config error naming both sides (a VAE of another latent width).
  """
  if not paths.isfile(paths.join(str(data_config.name), "metadata.json")):
    return None
  meta = encoded_metadata(str(data_config.name))
  if not meta or meta.get("content") != "latents":
    return None
  vae = meta["vae"]
  if int(vae["latent_channels"]) != int(data_config.channels):
    raise ValueError(
        f"data.channels={data_config.channels} but the latent dataset {data_config.name} holds "
        f"{vae['latent_channels']}-channel latents of the VAE {vae['path']}; set data.channels="
        f"{vae['latent_channels']}")
  stats = vae.get("latent_stats") or {}
  if "mean" not in stats or "std" not in stats:
    raise ValueError(f"the latent dataset {data_config.name} has no latent_stats (mean, std) in its metadata")
  return {"mean": [float(x) for x in stats["mean"]], "std": [float(x) for x in stats["std"]]}


def record_conditioners(config) -> None:
  """Writes into the config what a model trained on an encoded dataset decodes and conditions with:
  latent.{vae, mean, std} (the VAE and the per-channel statistics the pipeline
  normalises latents with) and text.{encoder_dir, max_length}. The checkpoint
  keeps the config, so sampling and export undo exactly the normalisation
  training used."""
  stats = latent_stats(config.data)
  if stats is None and not paths.isfile(paths.join(str(config.data.name), "metadata.json")):
    return
  meta = encoded_metadata(str(config.data.name))
  text = meta.get("text_encoder") or {}
  # a VAE or classifier trained on an encoded dataset has no model.text_dim
  if text and int(config.model.get("text_dim", 0)) not in (0, int(text["dim"])):
    raise ValueError(f"model.text_dim={config.model.text_dim} but {config.data.name} holds {text['dim']}-wide "
                     f"caption embeddings of {text['name']}")
  with config.unlocked():
    if stats is not None:
      config.latent = ml_collections.ConfigDict(
          dict(vae=meta["vae"]["path"], mean=tuple(stats["mean"]), std=tuple(stats["std"])))
    if text:
      config.text = ml_collections.ConfigDict(dict(encoder_dir=text["path"], max_length=int(text["max_length"])))
