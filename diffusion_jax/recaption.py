"""The `recaption` step: a dataset of clips -> the same dataset with the captioner's captions.

DALL-E 3 (Betker et al., 2023), which Sora's report follows, retrains on
captions written by a captioner trained for the purpose, dense where the
originals were short or missing. `recaption_dataset` reads one split of a
prepared tfds dataset (a built-in one of diffusion_jax.data.sources, or any
prepared tfds directory with a `video` [T, H, W, 3] or `image` [H, W, 3]
uint8 feature) and writes every example again, with every source feature
kept, except:

  caption           the captioner's caption (configs/captioner.py, greedy or beam decoding)
  original_caption  the source's caption ("" when it had none); a source that already has an
                    original_caption (a recaptioned dataset) keeps it, so it stays the first one

The writing is encode.py's: one shard per process written under a temporary
name and renamed when complete, a done marker per shard, the tfds metadata
written only once every shard of the split is done. A run killed midway
leaves no split that reads as complete, and a rerun skips what is done.
`sources.open_source(out_dir, split)` and the training pipelines read the result.
"""
import os
import re
import time

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax import config as config_lib
from diffusion_jax import encode
from diffusion_jax.data import sources

FORMAT_VERSION = "1.0.0"


def _clip_feature(features) -> str:
  for key in ("video", "image"):
    if key in features:
      return key
  raise ValueError(f"the dataset has no video to caption: its features are {sorted(features)}; recaption reads "
                   "a uint8 `video` [T, H, W, 3] (or `image` [H, W, 3]) feature")


def output_features(source_features) -> tfds.features.FeaturesDict:
  """The source's features, with caption and original_caption as text."""
  features = dict(source_features)
  features["caption"] = tfds.features.Text()
  features["original_caption"] = tfds.features.Text()
  return tfds.features.FeaturesDict(features)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def recaption_examples(examples, captioner, clip_key: str, beams: int, batch_size: int) -> list[dict]:
  """The output rows of a list of decoded source examples."""
  captions = captioner.caption([np.asarray(ex[clip_key]) for ex in examples], beams=beams, batch_size=batch_size)
  rows = []
  for ex, caption in zip(examples, captions):
    row = dict(ex)
    row["original_caption"] = _text(ex.get("original_caption", ex.get("caption", "")))
    row["caption"] = caption
    rows.append(row)
  return rows


def recaption_dataset(source_name: str, split: str, data_dir: str, out_dir: str, *, captioner, beams: int = 1,
                      process_index: int = 0, process_count: int = 1, builder_kwargs: dict | None = None,
                      batch_size: int = 32) -> str:
  """Recaptions one split of `source_name` into the dataset directory `out_dir`; returns out_dir.

  source_name, data_dir, builder_kwargs: as sources.open_source. captioner: a
  train.captioner_task.LoadedCaptioner (inference.load_captioner(path)). beams: 1 =
  greedy decoding, else beam search with that many beams. batch_size: clips
  captioned together (one compiled program serves every batch). Process i of
  process_count writes examples i::n into its own shard, as encode does.
  Raises ValueError before writing anything when the source has no video.
  """
  if not split or not re.fullmatch(r"[A-Za-z0-9_]+", split):
    raise ValueError(f"split must be a plain split name (letters, digits, _), no slicing; got {split!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
  if batch_size < 1 or beams < 1:
    raise ValueError(f"batch_size and beams must be >= 1, got {batch_size}, {beams}")
  if not out_dir:
    raise ValueError("out_dir must name the directory of the recaptioned dataset")
  builder_kwargs = dict(builder_kwargs or {})
  out_dir = os.path.abspath(out_dir)
  source = sources.open_source(source_name, split, data_dir, **builder_kwargs)
  source_features = source.dataset_info.features
  clip_key = _clip_feature(source_features)  # before anything is written
  features = output_features(source_features)
  builtin = source_name in sources.BUILDERS
  settings = {
      "format_version": FORMAT_VERSION,
      "content": "recaptioned",
      "source": {
          "name": source_name if builtin else os.path.abspath(source_name),
          "data_dir": os.path.abspath(data_dir or sources.default_data_dir()) if builtin else "",
          "builder_kwargs": dict(builder_kwargs),
      },
      "captioner": {"step": int(captioner.step), "config_hash": config_lib.config_hash(captioner.config)},
      "decoding": {"beams": int(beams), "max_length": int(captioner.max_length)},
  }
  base = os.path.basename(os.path.normpath(settings["source"]["name"]))
  name = re.sub(r"[^a-z0-9_]+", "_", f"{base}_recaptioned".lower()).strip("_")
  description = f"{settings['source']['name']} with captions by a diffusion_jax captioner (recaption)"

  def write(path, indices):
    def rows():
      for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        began = time.time()
        yield from recaption_examples(source.__getitems__(chunk), captioner, clip_key, beams, batch_size)
        logging.info("recaption: %s: %d / %d examples (%.1fs)", os.path.basename(path), start + len(chunk),
                     len(indices), time.time() - began)

    return encode.write_records(path, features, rows())

  encode.write_split(out_dir, settings, features, split, process_index, process_count, len(source), name=name,
                     description=description, write=write)
  return out_dir
